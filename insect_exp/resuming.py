"""What guards a resume: one process at a time per run, and only a run that can go on from where
its checkpoints and its data say it stood.

- `lease`: an exclusive lock file beside a run's checkpoints, held by the process that trains the
  run (its first process, or a resume) until the run has ended: a second resume is refused.
- `check_resumable`: refuses a FINISHED run unless `epochs` rises above what it trained (and its
  checkpoints were kept), fewer epochs than it trained, and a checkpoint folder gone missing.
- `check_same_data`: refuses a dataset whose content digest differs from the one the run logged.
- `drop_checkpoints`: a FINISHED run's checkpoints go, unless `train.keep_checkpoints`.

No MLflow and no TensorFlow here: the caller reads the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from insect_exp import UserError, files
from insect_exp.resilience import CheckpointState, epochs_done, progress, read_state
from insect_exp.tracking.interface import PutBack

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "checkpoint_dir"  # the run tag naming its checkpoint folder
KEEP_KEY = "train.keep_checkpoints"


class Refused(UserError):
    """A resume that cannot go on; the run is left as it was."""


class RefusedAfterOpening(Refused, PutBack):
    """A resume refused once its run was reopened: the run goes back to its former status."""


def checkpoint_dir(output_dir: str | None, run_id: str) -> str | None:
    """Where a new run keeps its checkpoints (None: no output dir to keep them in).

    Named by the run: runs started in the same second share a Hydra output dir.
    """
    return str(Path(output_dir) / "checkpoints" / run_id) if output_dir else None


def lease_path(directory: str | Path) -> Path:
    """The lock file beside a checkpoint folder."""
    return Path(f"{directory}.lock")


@contextlib.contextmanager
def lease(directory: str | Path, run_id: str) -> Iterator[None]:
    """Hold the run's lease (an exclusive flock of the file beside its checkpoints) in the block.

    The kernel lets it go when the process ends, however it ends: no stale lease is left.

    Raises:
        Refused: another process holds it (trains or resumes this run now).
    """
    path = lease_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise Refused(
                f"run {run_id} is being trained by another process (pid {holder}, which holds "
                f"{path}): wait for it to end, or stop it, before resuming"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class Lease:
    """A slot for the run's lease: entered before the run opens, so that it is let go only after
    the run has ended; `take` it once the checkpoint folder is known."""

    def __init__(self) -> None:
        self._held = contextlib.ExitStack()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self._held.close()

    def take(self, directory: str | Path, run_id: str) -> None:
        self._held.enter_context(lease(directory, run_id))


@dataclass(frozen=True)
class Found:
    """What the store says of a run about to be resumed (read under its lease)."""

    run_id: str
    status: str
    checkpoint_dir: str | None
    logged_epochs: int  # epochs whose metrics the store holds


def check_resumable(found: Found, epochs: int) -> CheckpointState | None:
    """The checkpoint a resume to `epochs` goes on from (None: from the start), if it may.

    Raises:
        Refused: in one line saying why and what to do instead.
    """
    directory = found.checkpoint_dir
    state = read_state(directory) if directory else None
    done = epochs_done(state)
    run = f"run {found.run_id}"
    if found.status == "FINISHED":
        trained = done if state is not None else found.logged_epochs
        if epochs <= trained:
            raise Refused(
                f"{run} is FINISHED {progress(trained, trained)}: nothing to resume; to train "
                f"it further give more epochs than {trained} (its checkpoints must have been "
                f"kept: {KEEP_KEY}=true)"
            )
        if state is None:
            raise Refused(
                f"{run} is FINISHED {progress(trained, trained)} and its checkpoints are gone "
                f"({directory or 'it kept none'}): it cannot train further; a run keeps them "
                f"with {KEEP_KEY}=true. Start a new run instead"
            )
        log.info(
            "%s is FINISHED %s: training it on to %d epochs; the model it logs next becomes "
            "its current one (tag current_model)", run, progress(done, done), epochs,
        )  # fmt: skip
    elif directory and not Path(directory).is_dir():
        # The folder is made as the run opens (train._checkpoints): gone, it was removed. An
        # empty one is a run killed before its first checkpoint, which starts over.
        raise Refused(
            f"{run}'s checkpoint folder {directory} is gone (it logged {found.logged_epochs} "
            f"epochs): it cannot go on {progress(found.logged_epochs, epochs)}; put the folder "
            "back or start a new run"
        )
    if epochs < done:
        raise Refused(
            f"epochs={epochs} is fewer than {run} has trained ({progress(done, done)}): "
            f"give epochs={done} or more"
        )
    return state


def check_same_data(
    run_id: str, logged: Mapping[str, str], splits: Sequence[Mapping[str, Any]]
) -> None:
    """Refuse data whose content digest differs from what the run logged (tracking/lineage.py).

    Args:
        logged: the run's dataset digests by split (none: it died before logging them).
        splits: the lineage records of the data loaded now (report.lineage).

    Raises:
        RefusedAfterOpening: naming each split that changed with both digests.
    """
    now = {split["context"]: split["digest"] for split in splits}
    changed = [
        f"{name} was {digest}, now {now[name]}"
        for name, digest in sorted(logged.items())
        if name in now and now[name] != digest
    ]
    if changed:
        raise RefusedAfterOpening(
            f"the dataset differs from the one run {run_id} trained on ({'; '.join(changed)}): "
            "resume it with the same files, or start a new run"
        )


def drop_checkpoints(directory: str | Path | None) -> None:
    """Remove a FINISHED run's checkpoint folder (moved aside first: never half there)."""
    if directory is None or not Path(directory).exists():
        return
    path = Path(directory)
    files.remove_dir(path)
    log.info("removed the finished run's checkpoints %s (%s=true keeps them)", path, KEEP_KEY)
