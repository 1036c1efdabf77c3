"""Training a classifier on in-memory splits: optimizer, loss, schedule, early stopping, fit."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
import tf_keras as keras

from insect_exp.callbacks import (
    BatchStats,
    EpochMetrics,
    LearningRateLog,
    MetricSink,
    Validation,
)
from insect_exp.config import (
    ClassWeight,
    Config,
    EarlyStoppingConfig,
    OptimizerConfig,
    Schedule,
)
from insect_exp.data.pipeline import ImageSplit, make_dataset


@dataclass(frozen=True)
class FitSettings:
    """Everything about training that is not the model: the typed config nodes fit needs."""

    epochs: int
    batch_size: int
    seed: int
    optimizer: OptimizerConfig
    shuffle_buffer: int | None = None
    label_smoothing: float = 0.0
    class_weight: ClassWeight = ClassWeight.none
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)

    @classmethod
    def from_config(cls, cfg: Config) -> FitSettings:
        return cls(
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            optimizer=cfg.optimizer,
            shuffle_buffer=cfg.dataset.shuffle_buffer,
            label_smoothing=cfg.loss.label_smoothing,
            class_weight=cfg.dataset.class_weight,
            early_stopping=cfg.train.early_stopping,
        )


@dataclass
class History:
    """Per-epoch metrics (loss, accuracy, val_*, lr) and per-batch training stats."""

    epochs: dict[str, list[float]] = field(default_factory=dict)
    batch_loss: list[float] = field(default_factory=list)
    batch_accuracy: list[float] = field(default_factory=list)
    # Early stopping: the epoch training stopped after (None: ran every epoch) and the best one.
    stopped_epoch: int | None = None
    best_epoch: int | None = None

    def extend(self, other: History) -> None:
        for key, values in other.epochs.items():
            self.epochs.setdefault(key, []).extend(values)
        self.batch_loss += other.batch_loss
        self.batch_accuracy += other.batch_accuracy
        self.stopped_epoch = other.stopped_epoch
        self.best_epoch = other.best_epoch if other.best_epoch is not None else self.best_epoch

    @property
    def num_epochs(self) -> int:
        return len(self.epochs.get("loss", []))


@dataclass
class Fitted:
    """What one call of `fit` leaves: its history, and the final model's validation logits."""

    history: History
    # None when the final weights are not those the last validation saw (best weights restored).
    val_logits: np.ndarray | None


def make_optimizer(
    cfg: OptimizerConfig, learning_rate: float | None = None
) -> keras.optimizers.Optimizer:
    """The Keras optimizer a config node names, with its options (or another learning rate)."""
    optimizer_class = getattr(keras.optimizers, cfg.keras_class)
    rate = cfg.learning_rate if learning_rate is None else learning_rate
    return optimizer_class(learning_rate=rate, **cfg.options())


class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy on logits against integer labels with label smoothing.

    tf_keras's sparse cross-entropy has no label_smoothing; its categorical one does: targets
    become (1 - s) * one_hot + s / num_classes.
    """

    def __init__(self, label_smoothing: float, name: str = "smoothed_sparse_crossentropy"):
        super().__init__(name=name)
        self.label_smoothing = label_smoothing

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
        one_hot = tf.one_hot(labels, tf.shape(y_pred)[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            one_hot, y_pred, from_logits=True, label_smoothing=self.label_smoothing
        )


def compile_classifier(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, label_smoothing: float = 0.0
) -> None:
    """Cross-entropy on logits (label-smoothed if asked) and accuracy: the training objective."""
    if label_smoothing > 0:
        loss = SmoothedSparseCrossentropy(label_smoothing)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


def class_weights(labels: np.ndarray, num_classes: int, mode: ClassWeight) -> dict[int, float]:
    """Loss weight per class; balanced: n / (n_classes * n_c), so every class weighs the same."""
    if mode is ClassWeight.none:
        return {}
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1))
    return {c: float(w) for c, w in enumerate(weights)}


def epoch_learning_rate(cfg: OptimizerConfig, epochs: int) -> Callable[[int], float] | None:
    """The learning rate of each epoch (0-based) for per-epoch schedules; None otherwise."""
    base, floor = cfg.learning_rate, cfg.min_learning_rate
    if cfg.schedule is Schedule.cosine:
        warmup = min(cfg.warmup_epochs, epochs - 1)

        def cosine(epoch: int) -> float:
            if epoch < warmup:
                return base * (epoch + 1) / (warmup + 1)
            progress = (epoch - warmup) / max(1, epochs - warmup)
            return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * progress))

        return cosine
    if cfg.schedule is Schedule.step:
        return lambda epoch: max(floor, base * cfg.decay_factor ** (epoch // cfg.decay_epochs))
    return None


def _schedule_callbacks(cfg: OptimizerConfig, epochs: int) -> list[keras.callbacks.Callback]:
    if cfg.schedule is Schedule.reduce_on_plateau:
        return [
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss",
                factor=cfg.decay_factor,
                patience=cfg.plateau_patience,
                min_lr=cfg.min_learning_rate,
            )
        ]
    rate = epoch_learning_rate(cfg, epochs)
    if rate is None:
        return []
    return [keras.callbacks.LearningRateScheduler(lambda epoch, _lr: rate(epoch))]


def fit(
    model: keras.Model,
    train_split: ImageSplit,
    val_split: ImageSplit,
    settings: FitSettings,
    sink: MetricSink | None = None,
    *,
    epochs: int | None = None,
    first_epoch: int = 0,
    seed: int | None = None,
    schedule: bool = True,
    verbose: int | str = "auto",
) -> Fitted:
    """Train a compiled classifier on decoded splits; each epoch's metrics go to `sink` at once.

    Args:
        epochs: epochs of this stage (default settings.epochs).
        first_epoch: the step the first epoch is logged at (a later stage goes on numbering).
        seed: the shuffle seed (default settings.seed; a later stage takes another).
        schedule: apply the configured learning-rate schedule and early stopping (first stage).
    """
    epochs = settings.epochs if epochs is None else epochs
    train_ds = make_dataset(
        train_split,
        settings.batch_size,
        shuffle=True,
        seed=settings.seed if seed is None else seed,
        shuffle_buffer=settings.shuffle_buffer,
    )
    num_classes = int(model.output_shape[-1])
    validation = Validation(
        make_dataset(val_split, settings.batch_size), val_split.labels, settings.label_smoothing
    )
    stats = BatchStats(settings.batch_size, len(train_split))
    # Order matters: validation adds val_* to the epoch logs before anything reads them, and the
    # learning rate is read after the schedule set it.
    callbacks: list[keras.callbacks.Callback] = [validation, stats]
    stopper = None
    if schedule:
        callbacks += _schedule_callbacks(settings.optimizer, epochs)
        es = settings.early_stopping
        if es.enabled:
            stopper = keras.callbacks.EarlyStopping(
                monitor=es.monitor.value,
                mode=es.monitor.mode,
                patience=es.patience,
                restore_best_weights=es.restore_best,
            )
            callbacks.append(stopper)
    callbacks.append(LearningRateLog())
    if sink is not None:
        callbacks.append(EpochMetrics(sink, step_offset=first_epoch))
    weights = class_weights(train_split.labels, num_classes, settings.class_weight)
    fitted = model.fit(
        train_ds,
        epochs=epochs,
        callbacks=callbacks,
        class_weight=weights or None,
        verbose=verbose,
    )
    history = History(
        {k: [float(v) for v in vs] for k, vs in fitted.history.items()},
        stats.losses,
        stats.accuracies,
    )
    val_logits = validation.logits
    if stopper is not None:
        history.best_epoch = first_epoch + stopper.best_epoch
        if stopper.stopped_epoch > 0:
            history.stopped_epoch = first_epoch + stopper.stopped_epoch
        if es.restore_best and stopper.best_epoch != history.num_epochs - 1:
            val_logits = None  # the model now holds an earlier epoch's weights
    return Fitted(history, val_logits)


def predict_logits(model: keras.Model, split: ImageSplit, batch_size: int) -> np.ndarray:
    """Logits for every image of a split, in order."""
    return model.predict(make_dataset(split, batch_size), verbose=0)
