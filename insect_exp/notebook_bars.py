"""Training progress as notebook progress bars (`tqdm.auto`) where a notebook's kernel runs the
training: one bar for the epochs, with the last epoch's validation scores, and one for the batches
of the current epoch, with its running loss and accuracy.

Keras's own bar redraws itself with carriage returns, which a notebook's output keeps as text
(one line a batch). Elsewhere (a terminal, a file, a pipe) Keras's own progress stays as it is.
tqdm.auto draws a widget where ipywidgets is installed, else a text bar.
"""

from __future__ import annotations

import sys
from typing import Any

import tf_keras as keras

# Shown on the epochs bar after each epoch, when the epoch logged them.
_EPOCH_KEYS = ("loss", "val_loss", "val_accuracy")
_BATCH_KEYS = ("loss", "accuracy")


def in_notebook() -> bool:
    """Whether this process is a Jupyter (IPython) kernel: its output goes to a notebook."""
    ipython = sys.modules.get("IPython")
    if ipython is None:  # a kernel has imported it long before any training
        return False
    shell = ipython.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class NotebookBars(keras.callbacks.Callback):
    """Epochs and batches as tqdm.auto bars (fit runs with verbose=0 beside it)."""

    def __init__(self, epochs: int, steps: int, initial_epoch: int = 0):
        super().__init__()
        self.epochs = epochs
        self.steps = steps
        self.initial_epoch = initial_epoch
        self._epochs_bar: Any = None
        self._batches_bar: Any = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        from tqdm.auto import tqdm

        self._epochs_bar = tqdm(
            total=self.epochs, initial=self.initial_epoch, desc="epochs", unit="epoch"
        )

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        from tqdm.auto import tqdm

        self._batches_bar = tqdm(
            total=self.steps, desc=f"epoch {epoch + 1}", unit="batch", leave=False
        )

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._batches_bar is not None:
            self._batches_bar.set_postfix(_shown(logs, _BATCH_KEYS), refresh=False)
            self._batches_bar.update(1)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._close_batches()
        if self._epochs_bar is not None:
            self._epochs_bar.set_postfix(_shown(logs, _EPOCH_KEYS), refresh=False)
            self._epochs_bar.update(1)

    def on_train_end(self, logs: dict | None = None) -> None:
        self._close_batches()
        if self._epochs_bar is not None:
            self._epochs_bar.close()
            self._epochs_bar = None

    def _close_batches(self) -> None:
        if self._batches_bar is not None:
            self._batches_bar.close()
            self._batches_bar = None


def _shown(logs: dict | None, keys: tuple[str, ...]) -> dict[str, str]:
    """The logged values of `keys`, 4 digits each."""
    return {k: f"{float(logs[k]):.4f}" for k in keys if logs and k in logs}


def bars(epochs: int, steps: int, initial_epoch: int = 0) -> list[keras.callbacks.Callback]:
    """The notebook's progress bars for one fit, or none outside a notebook."""
    return [NotebookBars(epochs, steps, initial_epoch)] if in_notebook() else []
