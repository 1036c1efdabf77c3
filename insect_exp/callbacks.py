"""Keras callbacks: per-batch statistics and live per-epoch metric logging."""

from collections.abc import Callable

import tf_keras as keras

MetricSink = Callable[[dict[str, float], int], None]


class BatchStats(keras.callbacks.Callback):
    """Loss and accuracy of every training batch, as the reference's batch-stats callback.

    Keras reports running means over the epoch; the reference reset the metrics after each batch
    to see single batches, which also spoils the epoch figures. Keras's means are weighted by batch
    size, so each batch's own value is recovered from two consecutive means instead.
    """

    def __init__(self, batch_size: int, num_samples: int):
        super().__init__()
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.losses: list[float] = []
        self.accuracies: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._seen = 0
        self._prev = {"loss": 0.0, "accuracy": 0.0}

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        size = min(self.batch_size, self.num_samples - self._seen)
        seen = self._seen + size
        for key, out in (("loss", self.losses), ("accuracy", self.accuracies)):
            mean = float(logs.get(key, 0.0))
            out.append((mean * seen - self._prev[key] * self._seen) / size)
            self._prev[key] = mean
        self._seen = seen


class EpochMetrics(keras.callbacks.Callback):
    """Sends each epoch's logs to `sink(metrics, step)` as soon as the epoch ends.

    The step is Keras's 0-based epoch index, as in MLflow's own Keras autologging.
    """

    def __init__(self, sink: MetricSink, step_offset: int = 0):
        super().__init__()
        self.sink = sink
        self.step_offset = step_offset

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = {k: float(v) for k, v in (logs or {}).items() if k != "lr"}
        self.sink(metrics, self.step_offset + epoch)
