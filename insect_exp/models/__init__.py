"""Model builders and their training recipes, chosen by the `model` config group."""

import functools

import tf_keras as keras
from omegaconf import DictConfig, OmegaConf

from insect_exp.callbacks import MetricSink
from insect_exp.data.pipeline import Data
from insect_exp.fit import History, fit_images
from insect_exp.models.cnn import build_cnn
from insect_exp.models.common import ServingModule, build_optimizer, compile_classifier

__all__ = [
    "ServingModule",
    "build_model",
    "check_sources",
    "fit_model",
    "optimizer_from_config",
]


def build_model(cfg: DictConfig, num_classes: int) -> keras.Model:
    """Build the model that `cfg` (the `model` config node) names."""
    augment = OmegaConf.to_container(cfg.augment)
    if cfg.name == "cnn":
        return build_cnn(
            cfg.image_size, num_classes, cfg.filters, cfg.dense_units, cfg.dropout, augment
        )
    if cfg.name == "hub_mobilenet":
        from insect_exp.models.hub import build_hub_classifier

        return build_hub_classifier(
            cfg.handle,
            cfg.image_size,
            num_classes,
            dropout=cfg.dropout,
            trainable=cfg.trainable,
            augment=augment,
            load_timeout_s=cfg.load_timeout_s,
        )
    raise ValueError(f"unknown model {cfg.name!r}")


def check_sources(cfg: DictConfig) -> None:
    """Fail fast, before any image is decoded, when a model's weights cannot be had (offline)."""
    if cfg.name == "hub_mobilenet":
        from insect_exp.models.hub import CLASSIFIER_SETTING, resolve_handle

        # A download lands in TF Hub's cache, so building the model later finds it at once.
        resolve_handle(cfg.handle, cfg.load_timeout_s)
        if cfg.preview.enabled:
            resolve_handle(cfg.preview.handle, cfg.load_timeout_s, CLASSIFIER_SETTING)


def optimizer_from_config(
    cfg: DictConfig, learning_rate: float | None = None
) -> keras.optimizers.Optimizer:
    """A Keras optimizer from the `optimizer` config node (another learning rate if given)."""
    options = OmegaConf.to_container(cfg)
    configured = options.pop("learning_rate")
    rate = configured if learning_rate is None else learning_rate
    return build_optimizer(options.pop("name"), rate, **options)


def fit_model(model: keras.Model, cfg: DictConfig, data: Data, sink: MetricSink) -> History:
    """Compile and train `model` with the recipe its config asks for."""
    if cfg.model.name == "hub_mobilenet":
        return _fit_hub(model, cfg, data, sink)
    compile_classifier(model, optimizer_from_config(cfg.optimizer))
    return fit_images(
        model,
        data.train,
        data.val,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        shuffle_buffer=cfg.dataset.shuffle_buffer,
        sink=sink,
    )


def _fit_hub(model: keras.Model, cfg: DictConfig, data: Data, sink: MetricSink) -> History:
    """Head on cached backbone features when the backbone is frozen, then optional fine-tuning."""
    from insect_exp.models.hub import fit_hub

    m = cfg.model
    return fit_hub(
        model,
        data,
        functools.partial(optimizer_from_config, cfg.optimizer),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        shuffle_buffer=cfg.dataset.shuffle_buffer,
        feature_cache=m.feature_cache,
        feature_cache_dir=m.feature_cache_dir,
        feature_cache_max_memory_mb=m.feature_cache_max_memory_mb,
        fine_tune_epochs=m.fine_tune.epochs if m.fine_tune.enabled else 0,
        fine_tune_learning_rate=m.fine_tune.learning_rate,
        fine_tune_top_layers=m.fine_tune.top_layers,
        sink=sink,
    )
