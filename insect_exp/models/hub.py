"""TF Hub transfer learning: the post's MobileNetV2 feature vector with a logits head.

The handle resolves to a local SavedModel (models/handles.py); training, the feature cache and
fine-tuning are the shared backbone recipe (models/backbone.py); the ImageNet preview of one batch
is models/preview.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_hub as hub
import tf_keras as keras

from insect_exp import plots
from insect_exp.config import HubModelConfig
from insect_exp.data.pipeline import Data
from insect_exp.models.backbone import BackboneRecipe, backbone_of
from insect_exp.models.feature_cache import saved_model_digest
from insect_exp.models.handles import read_labels, resolve_handle, resolve_preview


class HubBackbone(hub.KerasLayer):
    """hub.KerasLayer that remembers its SavedModel directory and can unfreeze only its top part."""

    def __init__(self, source_dir: Path, trainable: bool = False, **kwargs):
        super().__init__(str(source_dir), trainable=trainable, **kwargs)
        self.source_dir = Path(source_dir)
        # None: every variable trains when the layer is trainable; N: only the top N layers' ones.
        self.top_layers: int | None = None

    def _top(self, weights: list[tf.Variable]) -> list[tf.Variable]:
        # SavedModels name variables "<layer path>/<variable>:0" in build order; the last N
        # distinct layer paths are the top N layers.
        layers = list(dict.fromkeys(w.name.rpartition("/")[0] for w in weights))
        keep = set(layers[-self.top_layers :]) if self.top_layers else set()
        return [w for w in weights if w.name.rpartition("/")[0] in keep]

    @property
    def trainable_weights(self) -> list[tf.Variable]:
        weights = super().trainable_weights
        return weights if self.top_layers is None else self._top(weights)

    @property
    def non_trainable_weights(self) -> list[tf.Variable]:
        if not self.trainable or self.top_layers is None:
            return super().non_trainable_weights
        top = {id(w) for w in self.trainable_weights}
        frozen = [w for w in super().trainable_weights if id(w) not in top]
        return frozen + super().non_trainable_weights


class HubRecipe(BackboneRecipe):
    """A TF Hub feature-vector backbone, scaled to [0, 1] inside the model."""

    cfg: HubModelConfig

    def __init__(self, cfg: HubModelConfig):
        super().__init__(cfg)
        self._labels: list[str] | None = None  # the preview's ImageNet class names

    def prepare(self) -> None:
        # A download lands in TF Hub's cache, so building the model later finds it at once.
        timeout = self.cfg.load_timeout_s
        resolve_handle(self.cfg.handle, timeout)
        preview = self.cfg.preview
        if preview.enabled:
            _, self._labels = resolve_preview(preview.handle, preview.labels, timeout)

    def backbone(self) -> tuple[list[keras.layers.Layer], keras.layers.Layer]:
        source = resolve_handle(self.cfg.handle, self.cfg.load_timeout_s)
        # A SavedModel computes in the dtypes it was saved with, whatever Keras's precision policy.
        layer = HubBackbone(source, self.cfg.trainable, name="backbone", dtype="float32")
        return [keras.layers.Rescaling(1.0 / 255, name="rescaling")], layer

    def describe(self) -> str:
        return f"the SavedModel at {self.cfg.handle!r} (model.handle: use a feature_vector one)"

    def feature_key(self, model: keras.Model) -> str:
        return saved_model_digest(backbone_of(model).source_dir)

    def unfreeze(self, model: keras.Model, top_layers: int | None) -> int:
        layer = backbone_of(model)
        layer.trainable = True
        layer.top_layers = top_layers
        return int(sum(np.prod(w.shape) for w in layer.trainable_weights))

    def artifacts(self, data: Data, seed: int) -> dict[str, Any]:
        """The post's "ImageNet predictions" grid and table, when model.preview.enabled."""
        preview = self.cfg.preview
        if not preview.enabled:
            return {}
        from insect_exp.models.preview import imagenet_preview

        split = data.train
        idx = np.sort(
            np.random.default_rng(seed).choice(
                len(split), size=min(preview.num_images, len(split)), replace=False
            )
        )
        labels = self._labels or read_labels(preview.labels, self.cfg.load_timeout_s)
        names = imagenet_preview(preview.handle, labels, split.images[idx], self.cfg.load_timeout_s)
        cols = min(5, len(idx))
        figure = plots.prediction_grid(
            split.images[idx],
            np.arange(len(idx)),
            names,
            title="ImageNet predictions",
            rows=-(-len(idx) // cols),
            cols=cols,
        )
        rows = [(split.paths[i], n) for i, n in zip(idx, names, strict=True)]
        return {
            "plots/imagenet_predictions.png": figure,
            "imagenet_predictions.tsv": (["path", "imagenet_label"], rows),
        }
