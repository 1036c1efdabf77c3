"""Training and evaluation of a classifier on in-memory splits."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
import tf_keras as keras

from insect_exp.callbacks import BatchStats, EpochMetrics, MetricSink, Validation
from insect_exp.data.pipeline import Data, ImageSplit, make_dataset


@dataclass
class History:
    """Per-epoch metrics (loss, accuracy, val_loss, val_accuracy) and per-batch training stats."""

    epochs: dict[str, list[float]] = field(default_factory=dict)
    batch_loss: list[float] = field(default_factory=list)
    batch_accuracy: list[float] = field(default_factory=list)
    # The final model's logits on the validation split, from the last epoch's validation.
    val_logits: np.ndarray | None = None
    # The final model's logits on a test split that is not the validation split, when training
    # had them anyway (the cached-feature recipe); None: the model must predict them.
    test_logits: np.ndarray | None = None

    def extend(self, other: History) -> None:
        for key, values in other.epochs.items():
            self.epochs.setdefault(key, []).extend(values)
        self.batch_loss += other.batch_loss
        self.batch_accuracy += other.batch_accuracy
        # A later stage changed the model: earlier logits are stale.
        self.val_logits, self.test_logits = other.val_logits, other.test_logits

    @property
    def num_epochs(self) -> int:
        return len(self.epochs.get("loss", []))


def train(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    val_split: ImageSplit,
    *,
    epochs: int,
    num_train: int,
    batch_size: int,
    sink: MetricSink | None = None,
    first_epoch: int = 0,
    verbose: int | str = "auto",
) -> History:
    """Fit a compiled model; each epoch's metrics go to `sink` as soon as the epoch ends."""
    validation = Validation(make_dataset(val_split, batch_size), val_split.labels)
    stats = BatchStats(batch_size, num_train)
    callbacks: list[keras.callbacks.Callback] = [validation, stats]  # validation first: see class
    if sink is not None:
        callbacks.append(EpochMetrics(sink, step_offset=first_epoch))
    fitted = model.fit(train_ds, epochs=epochs, callbacks=callbacks, verbose=verbose)
    epochs_seen = {k: [float(v) for v in vs] for k, vs in fitted.history.items() if k != "lr"}
    return History(epochs_seen, stats.losses, stats.accuracies, validation.logits)


def fit_images(
    model: keras.Model,
    train_split: ImageSplit,
    val_split: ImageSplit,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    shuffle_buffer: int | None = None,
    sink: MetricSink | None = None,
) -> History:
    """Train a compiled image classifier end to end on decoded splits."""
    train_ds = make_dataset(train_split, batch_size, True, seed, shuffle_buffer)
    return train(
        model,
        train_ds,
        val_split,
        epochs=epochs,
        num_train=len(train_split),
        batch_size=batch_size,
        sink=sink,
    )


def predict_logits(model: keras.Model, split: ImageSplit, batch_size: int) -> np.ndarray:
    """Logits for every image of a split, in order."""
    return model.predict(make_dataset(split, batch_size), verbose=0)


def test_logits(model: keras.Model, history: History, data: Data, batch_size: int) -> np.ndarray:
    """Logits on the test split (val without one): those training already computed, if it did."""
    if data.test is None or data.val_is_test:
        if history.val_logits is not None:
            return history.val_logits
        return predict_logits(model, data.val, batch_size)
    if history.test_logits is not None:
        return history.test_logits
    return predict_logits(model, data.test, batch_size)
