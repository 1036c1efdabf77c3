"""Model builders and their training recipes, chosen by the `model` config group."""

from omegaconf import DictConfig, OmegaConf

import tf_keras as keras

from insect_exp.callbacks import MetricSink
from insect_exp.data.pipeline import Data
from insect_exp.fit import History, fit_images
from insect_exp.models.cnn import build_cnn
from insect_exp.models.common import ServingModule, build_optimizer, compile_classifier

__all__ = ["ServingModule", "build_model", "fit_model", "optimizer_from_config"]


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


def optimizer_from_config(cfg: DictConfig) -> keras.optimizers.Optimizer:
    """A Keras optimizer from the `optimizer` config node."""
    options = OmegaConf.to_container(cfg)
    return build_optimizer(options.pop("name"), options.pop("learning_rate"), **options)


def fit_model(model: keras.Model, cfg: DictConfig, data: Data, sink: MetricSink) -> History:
    """Compile and train `model` with the recipe its config asks for."""
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
