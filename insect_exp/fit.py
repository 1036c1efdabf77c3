"""Training and evaluation of a classifier on in-memory splits."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
import tf_keras as keras

from insect_exp.callbacks import BatchStats, EpochMetrics, MetricSink
from insect_exp.data.pipeline import ImageSplit, make_dataset


@dataclass
class History:
    """Per-epoch metrics (loss, accuracy, val_loss, val_accuracy) and per-batch training stats."""

    epochs: dict[str, list[float]] = field(default_factory=dict)
    batch_loss: list[float] = field(default_factory=list)
    batch_accuracy: list[float] = field(default_factory=list)
    # The final model's logits on the test split (val without one) when training had them anyway,
    # as the cached-feature recipe has; None: the model must predict them.
    test_logits: np.ndarray | None = None

    def extend(self, other: History) -> None:
        for key, values in other.epochs.items():
            self.epochs.setdefault(key, []).extend(values)
        self.batch_loss += other.batch_loss
        self.batch_accuracy += other.batch_accuracy
        self.test_logits = other.test_logits  # a later stage changed the model

    @property
    def num_epochs(self) -> int:
        return len(self.epochs.get("loss", []))


def train(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset,
    *,
    epochs: int,
    num_train: int,
    batch_size: int,
    sink: MetricSink | None = None,
    first_epoch: int = 0,
    verbose: int | str = "auto",
) -> History:
    """Fit a compiled model; each epoch's metrics go to `sink` as soon as the epoch ends."""
    stats = BatchStats(batch_size, num_train)
    callbacks: list[keras.callbacks.Callback] = [stats]
    if sink is not None:
        callbacks.append(EpochMetrics(sink, step_offset=first_epoch))
    fitted = model.fit(
        train_ds, validation_data=val_ds, epochs=epochs, callbacks=callbacks, verbose=verbose
    )
    epochs_seen = {k: [float(v) for v in vs] for k, vs in fitted.history.items() if k != "lr"}
    return History(epochs_seen, stats.losses, stats.accuracies)


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
    val_ds = make_dataset(val_split, batch_size)
    return train(
        model,
        train_ds,
        val_ds,
        epochs=epochs,
        num_train=len(train_split),
        batch_size=batch_size,
        sink=sink,
    )


def predict_logits(model: keras.Model, split: ImageSplit, batch_size: int) -> np.ndarray:
    """Logits for every image of a split, in order."""
    return model.predict(make_dataset(split, batch_size), verbose=0)


def test_logits(
    model: keras.Model, history: History, split: ImageSplit, batch_size: int
) -> np.ndarray:
    """Logits on the test split: those training already computed, else the model's predictions."""
    if history.test_logits is not None and len(history.test_logits) == len(split):
        return history.test_logits
    return predict_logits(model, split, batch_size)


def scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mean sparse cross-entropy on logits and accuracy: what Keras's evaluate would report."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    accuracy = (logits.argmax(axis=1) == labels).mean()
    return {"loss": float(loss), "accuracy": float(accuracy)}
