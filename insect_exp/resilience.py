"""Runs that survive: per-epoch checkpoints, interrupts that end a run KILLED, what resume reads.

- `Checkpoints` writes the model's weights, the optimizer's state and the epoch after every
  completed epoch, keeping only the latest and the best (by val_loss). A checkpoint is complete or
  absent: its `state.json` is written last and names the directory to read.
- `interrupts()` makes SIGTERM (what SLURM preemption and `kill` send) behave like Ctrl-C, so
  both unwind the run, which ends KILLED with everything logged so far; a second signal exits at
  once. Once the run has ended FINISHED (`finished`), a signal only says so: nothing is left to
  resume.
- A checkpoint that cannot be written (a full disk) ends the run FAILED, the previous one kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from insect_exp import files

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


class Interrupted(KeyboardInterrupt):
    """Training was stopped by SIGINT or SIGTERM; the run can be resumed.

    `ended`: the status the run already had in its store when the signal came ("FINISHED": the
    signal came too late to stop anything; None: the run ends KILLED as it unwinds).
    """

    def __init__(
        self, signum: int = signal.SIGINT, run_id: str | None = None, ended: str | None = None
    ):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_id = run_id
        self.ended = ended

    @property
    def exit_code(self) -> int:
        if self.ended == "FINISHED":
            return 0  # the run's work is complete and stored: a requeue on failure must not redo it
        return 128 + int(self.signum)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def finished_line(signum: int, run_id: str) -> str:
    """What a signal that came after its run ended FINISHED says: no resume is offered."""
    return (
        f"interrupted ({signal.Signals(signum).name}) after run {run_id} had already finished: "
        "it is FINISHED in the store with everything it logged; nothing to resume (exit 0)"
    )


# Signals received and not yet acted on: a handler's exception can be swallowed when the signal
# lands inside a __del__ or weakref callback (SQLAlchemy has many), so it is also kept here and
# `check()` raises it at the next safe point (every training batch).
_received: list[int] = []
_delivered: list[bool] = [False]
# How many of _received came before the `interrupts()` block open now: a process that lives on
# (a notebook's kernel) trains again after an interrupted run, and only new signals count there.
_before_block: list[int] = [0]


_deferring: list[bool] = [False]
# Whether the `interrupts()` block open now lets `finished` take the signals over.
_after_finish: list[bool] = [False]


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends (an epoch's metrics and checkpoint go together)."""
    _deferring[0] = True
    try:
        yield
    finally:
        _deferring[0] = False
    check()


def check() -> None:
    """Raise Interrupted if a signal came that nothing has acted on yet."""
    if len(_received) > _before_block[0] and not _delivered[0]:
        _delivered[0] = True
        raise Interrupted(_received[_before_block[0]])


def signal_count() -> int:
    """How many SIGINT/SIGTERM this process has received under `interrupts()` or a sweep."""
    return len(_received)


def interrupt_on_sigterm() -> None:
    """From now on SIGTERM unwinds the process like Ctrl-C (so exit handlers run)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum: int, frame) -> None:
        _received.append(signum)
        raise Interrupted(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)


def acknowledge() -> None:
    """The Interrupted exception reached its handler: `check()` has nothing more to raise."""
    _delivered[0] = True


def finished(run_id: str) -> None:
    """The run ended FINISHED: from now on SIGINT or SIGTERM prints `finished_line` and exits 0.

    Only inside `interrupts(after_finish=True)` (a single run from the command line), whose
    handlers it replaces for the rest of the process: what is left (the summary, the
    interpreter's exit) has nothing to unwind or keep.
    """
    if not _after_finish[0] or threading.current_thread() is not threading.main_thread():
        return

    def handle(signum: int, frame) -> None:
        print(f"\ninsect_exp: {finished_line(signum, run_id)}", file=sys.stderr, flush=True)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)


@contextlib.contextmanager
def interrupts(after_finish: bool = False) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise Interrupted; a second one exits at once.

    Args:
        after_finish: let `finished` take the signals over for good once the run ended FINISHED.
    """
    _delivered[0] = False
    _after_finish[0] = after_finish
    first = _before_block[0] = len(_received)

    def handle(signum: int, frame) -> None:
        if len(_received) > first:  # the user means it: no more cleanup
            os._exit(128 + signum)
        _received.append(signum)
        if not _deferring[0]:
            raise Interrupted(signum)  # unless swallowed; then check() raises it soon after

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        _after_finish[0] = False
        for signum, handler in previous.items():
            if signal.getsignal(signum) is handle:  # not if `finished` took it over
                signal.signal(signum, handler)


@dataclass(frozen=True)
class CheckpointState:
    """What a checkpoint holds besides the variables: where training stood."""

    epoch: int  # the last completed epoch, counted from 0 across stages
    stage: str  # which training stage of the recipe wrote it ("main", "fine_tune")
    stage_start: int  # the first epoch of that stage
    path: str  # the checkpoint prefix to read the variables from
    val_loss: float | None = None
    # What "best" is judged by (early stopping's monitor, else val_loss) and this epoch's value.
    monitor: str = "val_loss"
    value: float | None = None
    # Counters of callbacks that outlive an epoch (early stopping, plateau decay), by name.
    callbacks: dict = field(default_factory=dict)
    # Every epoch's metrics up to this one, by step (a string: JSON's keys), as the sink got them.
    # The checkpoint is written while the logging process may still be storing them; a resume
    # logs what the store lacks from here (`replay`).
    metrics: dict = field(default_factory=dict)


def read_state(directory: str | Path, which: str = "latest") -> CheckpointState | None:
    """The latest (or best) complete checkpoint under `directory`, or None."""
    state_file = Path(directory) / which / STATE_FILE
    if not state_file.is_file():
        return None
    return CheckpointState(**json.loads(state_file.read_text()))


def _write(target: Path, checkpoint, state: dict) -> None:
    """Write variables then state.json into a fresh directory, then swap it in for `target`."""
    with files.new_dir(target) as fresh:
        prefix = checkpoint.write(str(fresh / "ckpt"))
        final_prefix = target / Path(prefix).name
        (fresh / STATE_FILE).write_text(json.dumps({**state, "path": str(final_prefix)}) + "\n")


def _link(source: Path, target: Path) -> None:
    """Make `target` a checkpoint with the same files as `source` (hard links: no copy)."""
    state = json.loads((source / STATE_FILE).read_text())
    with files.new_dir(target) as fresh:
        for file in source.iterdir():
            if file.name != STATE_FILE:
                try:
                    os.link(file, fresh / file.name)
                except OSError:  # a filesystem without hard links
                    shutil.copy2(file, fresh / file.name)
        state["path"] = str(target / Path(state["path"]).name)
        (fresh / STATE_FILE).write_text(json.dumps(state) + "\n")


def replay(metrics: dict[str, dict], sink: Callable[[dict, int], None]) -> None:
    """Send a checkpoint's epochs (`CheckpointState.metrics`), in order, to a resumed run's sink,
    which skips the steps the store holds.

    The checkpoint of epoch N is written while the logging process may still be storing epoch
    N's metrics (or earlier ones, behind a slow store). If that process died meanwhile, the store
    lacks them, and the resume, starting after epoch N, would never log them.
    """
    for step in sorted(metrics, key=int):
        sink(metrics[step], int(step))


def keys_of(metrics: dict[str, dict]) -> set[str]:
    """The metric names in a checkpoint's epochs."""
    return {key for epoch in metrics.values() for key in epoch}


def restore(model, optimizer, state: CheckpointState) -> None:
    """Load a checkpoint's weights and optimizer state into a model built the same way."""
    import tensorflow as tf

    # Create the optimizer's slots first, so that every saved value has a variable to land in.
    optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    checkpoint.read(state.path).assert_existing_objects_matched().expect_partial()


def interrupt_callback():
    """A Keras callback that raises a swallowed interrupt at the end of the next batch."""
    import tf_keras as keras

    return keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: check(), on_epoch_end=lambda epoch, logs: check()
    )


def epochs_done(state: CheckpointState | None) -> int:
    """How many epochs a checkpoint holds (0: none), as Keras counts them: `Epoch 3/5` done is 3."""
    return 0 if state is None else state.epoch + 1


def progress(done: int, epochs: int) -> str:
    """Where training stands, the one way every message says it: "after epoch 2 of 5"."""
    return f"after epoch {done} of {epochs}" if done else f"before its first epoch (of {epochs})"


class CheckpointFailed(Exception):
    """A checkpoint could not be written (a full disk): the run fails, the previous one kept."""


def _reason(err: BaseException) -> str:
    """Why a write failed, in a few words: the OS's reason where there is one."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(getattr(err, "message", None) or err).strip()
    line = (text.splitlines() or [type(err).__name__])[0]
    # TensorFlow's: "{{function_node ...}} FILE; No space left on device [Op:SaveV2]".
    return re.sub(r"\s*\[Op:\w+\]$", "", line).rsplit("; ", 1)[-1]


class Checkpointer:
    """Latest and best checkpoint of a model being fit, after each epoch.

    Best is judged by `monitor` (lowest, or highest with mode "max"): early stopping's monitor,
    so that its best weights survive an interruption. `state_of` adds the counters of callbacks
    that a resume must carry on (see fit.CallbackCounters); `epochs`, the epochs the run trains
    in all, is for messages.
    """

    def __init__(
        self,
        directory: str | Path,
        stage: str,
        first_epoch: int,
        monitor: str = "val_loss",
        mode: str = "min",
        state_of: Callable[[], dict] | None = None,
        epochs: int | None = None,
    ):
        self.directory = Path(directory)
        self.epochs = epochs
        self.stage = stage
        self.first_epoch = first_epoch
        self.monitor = monitor
        self.sign = -1.0 if mode == "max" else 1.0
        self.state_of = state_of
        # Further objects written beside the model and its optimizer, by name (fit's weight
        # average, under "ema").
        self.objects: dict[str, object] = {}
        # The metrics of every epoch before this stage's, from the checkpoint it goes on from.
        latest = read_state(self.directory)
        self.metrics = {} if latest is None else dict(latest.metrics)
        best = read_state(self.directory, "best")
        self.best = float("inf")
        if best is not None and best.monitor == monitor and best.value is not None:
            self.best = self.sign * best.value

    def __call__(self, model, epoch: int, logs: dict | None) -> None:
        """Checkpoint `model` and its optimizer after Keras's epoch `epoch` of this stage."""
        import tensorflow as tf

        checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, **self.objects)
        logs = logs or {}
        value = logs.get(self.monitor)
        value = None if value is None else float(value)
        step = self.first_epoch + epoch
        # A checkpoint holds no step after its own.
        self.metrics = {s: m for s, m in self.metrics.items() if int(s) < step}
        self.metrics[str(step)] = {k: float(v) for k, v in logs.items()}
        state = CheckpointState(
            step,
            self.stage,
            self.first_epoch,
            "",
            None if logs.get("val_loss") is None else float(logs["val_loss"]),
            self.monitor,
            value,
            self.state_of() if self.state_of else {},
            self.metrics,
        )
        try:
            _write(self.directory / "latest", checkpoint, asdict(state))
            if value is not None and self.sign * value < self.best:
                _link(self.directory / "latest", self.directory / "best")
                self.best = self.sign * value
        except (OSError, tf.errors.OpError) as err:  # ENOSPC, ResourceExhaustedError, ...
            raise self._failed(step, err) from None

    def _failed(self, step: int, err: BaseException) -> CheckpointFailed:
        kept = epochs_done(read_state(self.directory))
        total = self.epochs or step + 1
        keeps = (
            f"keeping its checkpoint {progress(kept, total)}"
            if kept
            else "with no checkpoint (none was written before)"
        )
        return CheckpointFailed(
            f"cannot write the checkpoint of epoch {step + 1} of {total} in {self.directory} "
            f"({_reason(err)}); the run is FAILED, {keeps}"
        )


class TrainingDiverged(Exception):
    """The training loss became NaN or infinite: the run fails, its metrics so far kept."""


# Resume: the run's own config, recomposed from the overrides it logged.

# Overrides a resume may give besides the logged ones: where the store is, more epochs, and
# whether the checkpoints outlive the run.
_RESUME_KEYS = ("resume", "epochs", "mlflow.tracking_uri", "train.keep_checkpoints")
# Params a run decides for itself, not from its config: what precision=auto chose.
_CHOSEN_KEYS = ("precision_used",)


def resume_overrides(logged: list[str], given: list[str]) -> list[str]:
    """The logged run's overrides, with the few a resume may change taken from `given`.

    Raises:
        UserError: `given` changes something else.
    """
    from insect_exp import UserError

    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    other = [
        o
        for o in given
        if key(o) not in _RESUME_KEYS and not key(o).startswith("hydra") and o not in logged
    ]
    if other:
        raise UserError(
            f"a resumed run keeps its own config; only epochs may change, not {', '.join(other)} "
            "(and train.keep_checkpoints)"
        )
    changed = {key(o) for o in given}
    return [o for o in logged if key(o) not in changed] + given


def check_same_config(logged: dict[str, str], current: dict[str, str]) -> None:
    """Raise a UserError if the recomposed config differs from what the run logged.

    conf/ may have changed since the run: resuming under another config would mix two
    experiments in one run.
    """
    from insect_exp import UserError

    differ = [
        f"{k} (was {logged[k]}, now {current.get(k)})"
        for k in sorted(logged)
        if k not in _RESUME_KEYS + _CHOSEN_KEYS
        and not k.startswith("data.")
        and logged[k] != current.get(k)
    ]
    if differ:
        raise UserError(
            "the config composed today differs from the run's (the config changed?): "
            + "; ".join(differ[:5])
        )
