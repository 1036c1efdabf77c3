"""An exponential moving average (EMA) of a model's trainable weights, lent to the model to be
scored, checkpointed and kept.

`tf.train.ExponentialMovingAverage` keeps the averages (public, and works under tf.distribute);
the Keras optimizers' own `use_ema` would too, but reading its averages each epoch needs their
private attributes. After every training batch the average takes a step:
`average = decay * average + (1 - decay) * weights`, starting from the weights training starts
from. The trainable weights are averaged, as Keras's `use_ema` and Model Garden's EMA do; the
models here update no other variable while training (backbones keep BatchNorm in inference
mode).

At each epoch's end `AverageIn` scores the raw weights (`val_*_raw`) and swaps the averages into
the model, so validation (`val_*`), early stopping, the learning-rate plateau and the checkpoint
all see the averaged model; `AverageOut`, last of fit's callbacks, swaps the raw weights back
to train on. A checkpoint thus holds the averages as its `model` (what early stopping's best and
anything reading a checkpoint get) and, under `ema`, the raw weights a resume trains on from.
Training ends with the averages in the model, or early stopping's best (averaged) weights.
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf
import tf_keras as keras

from insect_exp.callbacks import Validation

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "ema"  # where a checkpoint keeps the averages and the raw weights
# Above this share of the average still being the starting weights at the end, a run is told.
START_SHARE = 0.5


def start_share(decay: float, steps: int) -> float:
    """How much of the average the weights training started from still make up after `steps`."""
    return float(decay**steps)


def warn_if_short(decay: float, steps: int) -> None:
    """One warning line when training is too short for the decay to forget the start."""
    share = start_share(decay, steps)
    if share > START_SHARE:
        # The decay at which the start weighs 5% after these steps.
        suggested = 0.05 ** (1 / max(steps, 1))
        log.warning(
            "train.ema.decay=%g over %d training steps: the starting weights still make up %.0f%% "
            "of the average at the end; a decay of about %.3f (or more epochs) averages the "
            "trained weights",
            decay, steps, 100 * share, suggested,
        )  # fmt: skip


class WeightAverage:
    """The average of `model`'s trainable weights, and exact swaps of it into the model.

    Made in the distribution strategy's scope, as the model: its variables are mirrored alike.
    """

    def __init__(self, model: keras.Model, decay: float):
        self.weights = list(model.trainable_weights)
        self._ema = tf.train.ExponentialMovingAverage(decay)
        self._ema.apply(self.weights)  # the averages start as copies of the weights
        averages = [self._ema.average(w) for w in self.weights]
        # The raw weights wait here while the model holds the averages: a copy, not arithmetic
        # on the two, so that swapping back gives the very same values.
        raw = [tf.Variable(w, trainable=False) for w in self.weights]
        self.state = tf.Module()  # what a checkpoint writes under CHECKPOINT_KEY
        self.state.averages = averages
        self.state.raw = raw
        self.swapped = False

    @tf.function
    def update(self) -> None:
        """One step of the average towards the current weights (after a training batch)."""
        self._ema.apply(self.weights)

    def averages(self) -> list[np.ndarray]:
        """The averaged weights, in the order of the model's trainable weights."""
        return [a.numpy() for a in self.state.averages]

    def swap_in(self) -> None:
        """Put the averages into the model, keeping its raw weights aside (no-op if in)."""
        if self.swapped:
            return
        for weight, average, raw in zip(
            self.weights, self.state.averages, self.state.raw, strict=True
        ):
            raw.assign(weight)
            weight.assign(average)
        self.swapped = True

    def swap_out(self) -> None:
        """Give the model its raw weights back (no-op if they are in it)."""
        if not self.swapped:
            return
        for weight, raw in zip(self.weights, self.state.raw, strict=True):
            weight.assign(raw)
        self.swapped = False

    def restore(self, path: str) -> None:
        """Go on from a checkpoint written by fit: its averages, and its raw weights to train on."""
        checkpoint = tf.train.Checkpoint(**{CHECKPOINT_KEY: self.state})
        checkpoint.read(path).assert_existing_objects_matched().expect_partial()
        for weight, raw in zip(self.weights, self.state.raw, strict=True):
            weight.assign(raw)
        self.swapped = False


class AverageIn(keras.callbacks.Callback):
    """Steps the average after each batch; at each epoch's end logs the raw weights' validation
    scores as val_*_raw and swaps the averages in, for the callbacks after it (the validation
    among them); at the end of training leaves them in the model.

    Goes before early stopping, whose on_train_end then restores its best (averaged) weights.
    """

    def __init__(self, average: WeightAverage, raw_validation: Validation):
        super().__init__()
        self.average = average
        self.raw_validation = raw_validation

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        self.raw_validation.set_model(model)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.average.update()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        raw: dict[str, float] = {}
        self.raw_validation.on_epoch_end(epoch, raw)
        if logs is not None:
            logs.update({f"{key}_raw": value for key, value in raw.items()})
        self.average.swap_in()

    def on_train_end(self, logs: dict | None = None) -> None:
        self.average.swap_in()


class AverageOut(keras.callbacks.Callback):
    """Swaps the raw weights back in once every other callback has seen the epoch's end."""

    def __init__(self, average: WeightAverage):
        super().__init__()
        self.average = average

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.average.swap_out()
