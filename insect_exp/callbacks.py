"""Keras callbacks: validation keeping its logits, per-batch stats, learning rate, live logging."""

from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tf_keras as keras

from insect_exp.tracking.interface import MetricSink

TOP_K = 3  # top3_accuracy, scored where there are more classes than that


def scores(
    logits: np.ndarray, labels: np.ndarray, label_smoothing: float = 0.0
) -> dict[str, float]:
    """Mean cross-entropy on logits and accuracy: what Keras's evaluate would report; with more
    than TOP_K classes also top3_accuracy (the true class among the 3 highest logits).

    With label smoothing the targets are (1 - s) * one_hot + s / num_classes, as in training.
    """
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    true = log_probs[np.arange(len(labels)), labels]
    s = label_smoothing
    loss = -((1 - s) * true + s * log_probs.mean(axis=1)).mean()
    accuracy = (logits.argmax(axis=1) == labels).mean()
    found = {"loss": float(loss), "accuracy": float(accuracy)}
    if logits.shape[1] > TOP_K:
        # Ties at the boundary count as in, as in Keras's top-k metric (tf.math.in_top_k).
        above = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(axis=1)
        found[f"top{TOP_K}_accuracy"] = float((above < TOP_K).mean())
    return found


class Validation(keras.callbacks.Callback):
    """Keras's per-epoch validation (val_loss, val_accuracy), keeping the last epoch's logits.

    Instead of fit's validation_data, which throws its predictions away: the final model's logits
    on the validation split are then at hand for the test report when validation is the test
    split, and need no second pass. Keras runs user callbacks before its History and progress
    bar, so both see the val_ metrics this adds to the epoch's logs.
    """

    def __init__(
        self,
        images: tf.data.Dataset,
        labels: np.ndarray,
        label_smoothing: float = 0.0,
        scorer: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None,
    ):
        """scorer: (logits, labels) -> scores, in place of `scores` (task=multilabel's)."""
        super().__init__()
        self.images = images
        self.labels = labels
        self.label_smoothing = label_smoothing
        self.scorer = scorer
        self.logits: np.ndarray | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.logits = self.model.predict(self.images, verbose=0)
        if self.scorer is not None:
            results = self.scorer(self.logits, self.labels)
        else:
            results = scores(self.logits, self.labels, self.label_smoothing)
        # As in evaluate: the loss includes the model's regularization losses (none by default).
        results["loss"] += float(sum(self.model.losses, 0.0))
        if logs is not None:
            logs.update({f"val_{key}": value for key, value in results.items()})


class BatchStats(keras.callbacks.Callback):
    """Loss and accuracy of every training batch, as the reference's batch-stats callback.

    Keras reports running means over the epoch; the reference reset the metrics after each batch
    to see single batches, which also spoils the epoch figures. Keras's means are weighted by batch
    size, so each batch's own value is recovered from two consecutive means instead.
    """

    def __init__(
        self,
        batch_size: int,
        num_samples: int,
        sink: MetricSink | None = None,
        first_epoch: int = 0,
    ):
        """Args: sink: gets each batch's values at the end of its epoch, at its global step;
        first_epoch: the absolute number of Keras's epoch 0 (a later stage goes on counting)."""
        super().__init__()
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.steps_per_epoch = -(-num_samples // batch_size)
        self.sink = sink
        self.first_epoch = first_epoch
        self.losses: list[float] = []
        self.accuracies: list[float] = []
        self._epoch = 0
        self._epoch_logs: list[tuple] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        self._epoch_logs = []

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        self._epoch_logs.append((logs.get("loss", 0.0), logs.get("accuracy", 0.0)))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.flush()

    def flush(self) -> None:
        """Turn the batches seen since the epoch began into per-batch values (also mid-epoch)."""
        if not self._epoch_logs:
            return
        means = np.array([[float(v) for v in pair] for pair in self._epoch_logs], np.float64)
        self._epoch_logs = []
        sizes = np.minimum(
            self.batch_size, self.num_samples - self.batch_size * np.arange(len(means))
        )
        seen = np.cumsum(sizes)
        totals = means * seen[:, None]  # running sums of per-sample loss and of correct answers
        per_batch = np.diff(totals, axis=0, prepend=0.0) / sizes[:, None]
        self.losses += per_batch[:, 0].tolist()
        self.accuracies += per_batch[:, 1].tolist()
        if self.sink is not None:
            first_step = (self.first_epoch + self._epoch) * self.steps_per_epoch
            for i, (loss, accuracy) in enumerate(per_batch):
                self.sink({"batch_loss": loss, "batch_accuracy": accuracy}, first_step + i)


class Position(keras.callbacks.Callback):
    """Where training is (epoch, batch, absolute epoch numbers), for errors and interrupts."""

    def __init__(self, first_epoch: int = 0):
        super().__init__()
        self.first_epoch = first_epoch
        self.epoch = first_epoch
        self.batch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch, self.batch = self.first_epoch + epoch, 0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.batch = batch


class LearningRateLog(keras.callbacks.Callback):
    """Adds the learning rate each epoch trained with to its logs, as `lr`.

    Read when the epoch begins, after a per-epoch schedule set it and before a plateau schedule
    lowers it at the epoch's end.
    """

    def __init__(self) -> None:
        super().__init__()
        self._rate = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._rate = float(keras.backend.get_value(self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["lr"] = self._rate


class EpochEnd(keras.callbacks.Callback):
    """Sends each epoch's logs to `sink(metrics, step)` and checkpoints, as one step.

    The step is Keras's 0-based epoch index, as in MLflow's own Keras autologging. A signal that
    comes meanwhile waits until both are done: an epoch the store shows is an epoch a resume
    starts after.
    """

    def __init__(
        self,
        sink: MetricSink | None,
        step_offset: int = 0,
        checkpoint: Callable[[keras.Model, int, dict | None], None] | None = None,
    ):
        super().__init__()
        self.sink = sink
        self.step_offset = step_offset
        self.checkpoint = checkpoint

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        from insect_exp.resilience import deferred

        with deferred():
            if self.sink is not None:
                metrics = {k: float(v) for k, v in (logs or {}).items()}
                self.sink(metrics, self.step_offset + epoch)
            if self.checkpoint is not None:
                self.checkpoint(self.model, epoch, logs)
