"""Any tf_keras.applications backbone (EfficientNetB0, ResNet50V2, MobileNetV3Small, ...) by name.

`model.weights` is `imagenet` (Keras downloads them once to ~/.keras/models, or finds them there),
a local weights file of the backbone without its top, or null for random initialisation. The
backbone's own `preprocess_input` runs inside the model, so it takes raw 0..255 pixels like every
other model here. Training, feature caching and fine-tuning are the shared backbone recipe.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import numpy as np
import tf_keras as keras

from insect_exp import UserError
from insect_exp.config import KerasAppConfig
from insect_exp.errors import first_line
from insect_exp.models.backbone import BackboneRecipe, backbone_of
from insect_exp.models.feature_cache import weights_digest
from insect_exp.models.handles import socket_timeout

log = logging.getLogger(__name__)


class KerasAppError(UserError):
    """The backbone name or its weights cannot be used."""


def application(name: str):
    """The tf_keras.applications constructor of that name, or a KerasAppError listing them."""
    constructor = getattr(keras.applications, name, None)
    if not callable(constructor) or not name[:1].isupper():
        known = sorted(n for n in dir(keras.applications) if n[:1].isupper())
        raise KerasAppError(
            f"model.backbone={name!r} is not a tf_keras.applications model; choose one of "
            f"{', '.join(known)}"
        )
    return constructor


class AppPreprocessing(keras.layers.Layer):
    """The application's own `preprocess_input` (scaling, channel order) as a layer."""

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        module = importlib.import_module(application(backbone).__module__)
        self._preprocess = module.preprocess_input

    def call(self, images):
        return self._preprocess(images)

    def get_config(self) -> dict:
        return {**super().get_config(), "backbone": self.backbone}


class KerasAppRecipe(BackboneRecipe):
    """A tf_keras.applications model without its top, average-pooled, with a logits head."""

    cfg: KerasAppConfig

    def __init__(self, cfg: KerasAppConfig):
        super().__init__(cfg)
        self._app: keras.Model | None = None

    def prepare(self) -> None:
        self._app = self._load()

    def _load(self) -> keras.Model:
        c = self.cfg
        constructor = application(c.backbone)
        weights = c.weights
        if weights not in (None, "imagenet"):
            weights = str(Path(weights).expanduser())
            if not Path(weights).is_file():
                raise KerasAppError(
                    f"model.weights={c.weights!r} is not a file (imagenet, a weights file of "
                    f"{c.backbone} without its top, or null for random initialisation)"
                )
        height, width = (int(v) for v in c.image_size)
        try:
            # Keras downloads with no timeout of its own; offline this fails fast instead of
            # hanging on a stalled connection.
            with socket_timeout(c.load_timeout_s):
                return constructor(
                    include_top=False,
                    weights=weights,
                    input_shape=(height, width, 3),
                    pooling="avg",
                )
        except Exception as err:  # Keras raises a bare Exception for a failed download
            reason = first_line(err, limit=None)
            if weights == "imagenet":
                raise KerasAppError(
                    f"cannot get the ImageNet weights of {c.backbone} ({reason}). Without "
                    "network, copy them into ~/.keras/models, set model.weights=/path/to/"
                    "weights.h5, or model.weights=null for random initialisation"
                ) from err
            raise KerasAppError(
                f"cannot build {c.backbone} at {height}x{width} with weights {c.weights!r}: "
                f"{reason}"
            ) from err

    def backbone(self) -> tuple[list[keras.layers.Layer], keras.layers.Layer]:
        app = self._app or self._load()
        self._app = None  # a second build gets fresh layers
        layer = keras.Model(app.inputs, app.outputs, name="backbone")
        # The wrapper's own flag is what Keras (and the feature cache) read.
        layer.trainable = app.trainable = self.cfg.trainable
        return [AppPreprocessing(self.cfg.backbone, name="preprocessing")], layer

    def describe(self) -> str:
        return f"model.backbone={self.cfg.backbone!r}"

    def feature_key(self, model: keras.Model) -> str:
        return weights_digest(self.cfg.backbone, backbone_of(model).get_weights())

    def unfreeze(self, model: keras.Model, top_layers: int | None) -> int:
        backbone = backbone_of(model)
        backbone.trainable = True
        if top_layers is not None:
            with_weights = [layer for layer in backbone.layers if layer.weights]
            for layer in with_weights[: max(0, len(with_weights) - top_layers)]:
                layer.trainable = False
        return int(sum(np.prod(w.shape) for w in backbone.trainable_weights))
