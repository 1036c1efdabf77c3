"""Models behind one seam: a recipe per model prepares, builds, trains and predicts.

The `model` config node names its recipe class in `_target_` (see insect_exp/config.py), so adding
a model is one module with a Recipe subclass, one YAML in conf/model/ and its schema dataclass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import tf_keras as keras

    from insect_exp.callbacks import MetricSink
    from insect_exp.config import ModelConfig
    from insect_exp.data.pipeline import Data, ImageSplit
    from insect_exp.fit import FitSettings, History


class Recipe:
    """How one kind of model is made and trained; this base trains end to end on images.

    Subclasses override `build`, and `prepare`, `fit`, `predict`, `artifacts` where they differ.
    """

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        # The validation split and the trained model's logits on it, kept for `predict`.
        self._val: tuple[ImageSplit, np.ndarray] | None = None

    def prepare(self) -> None:
        """Make sure the weights can be had (fail fast offline) before any image is decoded."""

    def build(self, num_classes: int) -> keras.Model:
        """The untrained model: raw 0..255 RGB images of cfg.image_size in, logits out."""
        raise NotImplementedError

    def fit(
        self, model: keras.Model, data: Data, settings: FitSettings, sink: MetricSink | None
    ) -> History:
        """Compile and train `model`; metrics go to `sink` as each epoch ends."""
        from insect_exp import fit

        fit.compile_classifier(
            model,
            fit.make_optimizer(settings.optimizer),
            settings.label_smoothing,
            settings.multilabel_threshold,
        )
        fitted = fit.fit(model, data.train, data.val, settings, sink)
        self.remember_validation(data.val, fitted.val_logits)
        return fitted.history

    def predict(self, model: keras.Model, split: ImageSplit, batch_size: int) -> np.ndarray:
        """The trained model's logits on every image of `split`, in order."""
        if self._val is not None and self._val[0] is split:
            return self._val[1]  # the last validation already ran the final model on it
        from insect_exp.fit import predict_logits

        return predict_logits(model, split, batch_size)

    def artifacts(self, data: Data, seed: int) -> dict[str, Any]:
        """Extra artifacts of this model: path -> Figure, text, or a (header, rows) table."""
        return {}

    def remember_validation(self, split: ImageSplit, logits: np.ndarray | None) -> None:
        self._val = None if logits is None else (split, logits)


def recipe_for(cfg: ModelConfig) -> Recipe:
    """The recipe that the model config's `_target_` names, made from that config."""
    from hydra.utils import get_class

    return get_class(cfg._target_)(cfg)
