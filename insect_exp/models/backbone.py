"""Transfer learning on a pretrained backbone: the recipe of the hub and Keras-application models.

The model is raw 0..255 images -> [augmentation] -> the backbone's preprocessing -> backbone
(layer "backbone", always in inference mode) -> head (nested model "head": [Dropout], logits).
With the backbone frozen and no augmentation, each image's features are computed once (or reused
from the disk cache) and the head trains on them in the same batches and order as it would on
images; an optional second stage fine-tunes the backbone on images.
"""

from __future__ import annotations

import logging

import numpy as np
import tf_keras as keras

from insect_exp import UserError, fit
from insect_exp.callbacks import MetricSink
from insect_exp.config import BackboneConfig, FeatureCache
from insect_exp.data.pipeline import Data, ImageSplit
from insect_exp.errors import first_line
from insect_exp.fit import FitSettings, History
from insect_exp.models import Recipe
from insect_exp.models.feature_cache import (
    FeatureStore,
    cached_features,
    disk_store,
    shared_by_workers,
)
from insect_exp.models.layers import augmentation_layers, classification_head

log = logging.getLogger(__name__)


def backbone_of(model: keras.Model) -> keras.layers.Layer:
    return model.get_layer("backbone")


def feature_extractor(model: keras.Model) -> keras.Model:
    """The part of a classifier that maps raw images to backbone features."""
    # The backbone's output in the classifier's graph: a functional backbone (a Keras application)
    # also has an output of its own inner graph, which is not connected to model.input.
    features = backbone_of(model).get_output_at(-1)
    return keras.Model(model.input, features, name="feature_extractor")


def choose_cache(
    mode: FeatureCache, num_images: int, feature_dim: int, max_mb: int
) -> FeatureCache:
    """auto: memory while the features of every image fit in max_mb, else disk."""
    if mode is not FeatureCache.auto:
        return mode
    megabytes = num_images * feature_dim * 4 / 2**20
    return FeatureCache.memory if megabytes <= max_mb else FeatureCache.disk


class BackboneRecipe(Recipe):
    """A pretrained backbone with a logits head; subclasses say where the backbone comes from."""

    cfg: BackboneConfig

    def __init__(self, cfg: BackboneConfig):
        super().__init__(cfg)
        # The test split and the head's logits on it, when its features were computed anyway.
        self._test: tuple[ImageSplit, np.ndarray] | None = None

    # What a subclass provides

    def backbone(self) -> tuple[list[keras.layers.Layer], keras.layers.Layer]:
        """Preprocessing layers (raw 0..255 pixels in) and the backbone layer named "backbone"."""
        raise NotImplementedError

    def feature_key(self, model: keras.Model) -> str:
        """A digest that changes whenever the backbone's function does (disk cache key)."""
        raise NotImplementedError

    def unfreeze(self, model: keras.Model, top_layers: int | None) -> int:
        """Make the backbone (or its top N layers) trainable; return its trainable parameters."""
        raise NotImplementedError

    def describe(self) -> str:
        """The backbone, for error messages."""
        return f"the {self.cfg.name} backbone"

    # The shared recipe

    def build(self, num_classes: int) -> keras.Model:
        preprocessing, backbone = self.backbone()
        height, width = (int(v) for v in self.cfg.image_size)
        images = keras.Input(shape=(height, width, 3), name="images")
        x = images
        for layer in [*augmentation_layers(self.cfg.augment), *preprocessing]:
            x = layer(x)
        try:
            # training=False keeps BatchNorm on its moving statistics even while fine-tuning (the
            # Keras transfer-learning advice), which also makes frozen features a pure function.
            features = backbone(x, training=False)
        except (ValueError, TypeError) as err:
            raise UserError(
                f"{self.describe()} does not take {height}x{width} RGB images (set "
                f"model.image_size to its input size): {first_line(err, limit=None)}"
            ) from err
        if features.shape.rank != 2:
            raise UserError(
                f"{self.describe()} outputs shape {features.shape}, not a feature vector "
                "[batch, features]"
            )
        head = classification_head(int(features.shape[-1]), num_classes, self.cfg.dropout)
        return keras.Model(images, head(features), name=f"{self.cfg.name}_classifier")

    def can_cache_features(self, model: keras.Model) -> bool:
        """True when training cannot change the features: frozen backbone, no augmentation."""
        return not backbone_of(model).trainable and not self.cfg.augment.enabled

    def fit(
        self, model: keras.Model, data: Data, settings: FitSettings, sink: MetricSink | None
    ) -> History:
        """Train the head (on cached backbone features when possible), then optionally fine-tune."""
        c = self.cfg
        resume = settings.resume_from
        if c.fine_tune.enabled and resume is not None and resume.stage == "fine_tune":
            # The checkpoint is of the second stage: the head stage is behind us.
            return self._fine_tune(model, data, settings, resume.stage_start, sink)
        dim = int(backbone_of(model).output.shape[-1])
        num_images = len(data.train) + len(data.val)
        mode = choose_cache(c.feature_cache, num_images, dim, c.feature_cache_max_memory_mb)
        # Mixed images have features of their own: a mix of two images' features is not one.
        mixing = settings.mixing.enabled
        if mode is not FeatureCache.off and self.can_cache_features(model) and not mixing:
            store = None
            # Several workers share one extraction through the disk store (cached_features).
            if mode is FeatureCache.disk or shared_by_workers(model):
                key = self.feature_key(model)
                store = disk_store(c.feature_cache_dir, key, c.feature_cache_max_disk_gb)
            history = self._fit_head_on_features(model, data, settings, store, sink)
        else:
            if mode is not FeatureCache.off:
                log.info("no feature cache: the backbone trains, or augmentation or mixing runs")
            history = super().fit(model, data, settings, sink)
        if c.fine_tune.enabled:
            history.extend(self._fine_tune(model, data, settings, history.num_epochs, sink))
        return history

    def predict(self, model: keras.Model, split: ImageSplit, batch_size: int) -> np.ndarray:
        if self._test is not None and self._test[0] is split:
            return self._test[1]
        return super().predict(model, split, batch_size)

    def _fit_head_on_features(
        self,
        model: keras.Model,
        data: Data,
        settings: FitSettings,
        store: FeatureStore | None,
        sink: MetricSink | None,
    ) -> History:
        """Compute each image's backbone features once (or reuse stored ones); train the head."""
        extractor = feature_extractor(model)
        batch_size = settings.batch_size
        timeout = settings.worker_timeout_s
        train_f, train_new = cached_features(extractor, data.train, batch_size, store, timeout)
        val_f, val_new = cached_features(extractor, data.val, batch_size, store, timeout)
        computed = train_new + val_new
        reused = len(data.train) + len(data.val) - computed
        log.info("backbone features: %d computed, %d reused", computed, reused)
        if sink is not None:
            sink({"backbone_images_computed": computed, "backbone_images_reused": reused}, 0)
        head = model.get_layer("head")
        optimizer = fit.make_optimizer(settings.optimizer)
        fit.compile_classifier(
            head, optimizer, settings.label_smoothing, settings.multilabel_threshold
        )
        # Same shuffle seed, buffer and batches as on images: the head sees the same batches.
        fitted = fit.fit(head, train_f, val_f, settings, sink)
        self.remember_validation(data.val, fitted.val_logits)
        # A test split apart from validation: its features through the head alone give its logits.
        if data.test is not None and not data.val_is_test:
            test_f, _ = cached_features(extractor, data.test, batch_size, store, timeout)
            self._test = (data.test, fit.predict_logits(head, test_f, batch_size))
        return fitted.history

    def _fine_tune(
        self,
        model: keras.Model,
        data: Data,
        settings: FitSettings,
        first_epoch: int,
        sink: MetricSink | None,
    ) -> History:
        """Second stage: the backbone (or its top layers) unfrozen, at its own learning rate."""
        ft = self.cfg.fine_tune
        trainable = self.unfreeze(model, ft.top_layers)
        log.info("fine-tuning %d backbone parameters for %d epochs", trainable, ft.epochs)
        optimizer = fit.make_optimizer(settings.optimizer, ft.learning_rate)
        fit.compile_classifier(
            model, optimizer, settings.label_smoothing, settings.multilabel_threshold
        )
        self._test = None  # the model changes: logits from the first stage are stale
        fitted = fit.fit(
            model,
            data.train,
            data.val,
            settings,
            sink,
            fit.Stage(
                "fine_tune",
                epochs=ft.epochs,
                first_epoch=first_epoch,
                # A new seed so that the second stage does not replay the first one's batch order.
                seed=settings.seed + first_epoch,
                schedule=False,
            ),
        )
        self.remember_validation(data.val, fitted.val_logits)
        return fitted.history
