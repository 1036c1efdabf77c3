"""The one interface of a run, whichever process logs it, and how a run ends. No MLflow here.

Three classes implement `TrackedRun`: the in-process `run.Run`, the training process's
`remote.RemoteRun` (a `run.Run` in a logging process of its own) and a non-chief worker's
`worker.WorkerRun`, which logs nothing. train.py holds its run as a `TrackedRun`, so a type
checker follows every call whichever of the three it is.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

# Where training sends its metrics: (metrics by name, step). A run's `sink`, or a filter of it.
MetricSink = Callable[[Mapping[str, float], int], None]


@dataclass(frozen=True)
class Opened:
    """The open run, as the process that opened it reports it."""

    run_id: str
    run_name: str
    experiment_id: str
    tracking_uri: str
    tags: dict[str, str]  # a reopened run's tags (its checkpoint dir); empty for a new run
    ui_command: str
    ui_url: str
    # A reopened run's dataset digests by split (train, val, test): what it trained on.
    digests: dict[str, str] = field(default_factory=dict)


class TrackedRun(Protocol):
    """What training and `interface.ending` call on a run."""

    # None: a worker's run, which has no id of its own.
    @property
    def run_id(self) -> str | None: ...

    def opened(self) -> Opened:
        """The open run: its id, name, store and tags."""
        ...

    def sink(self, metrics: Mapping[str, float], step: int) -> None: ...

    def resumed_sink(self, keys: Iterable[str]) -> MetricSink:
        """A sink that sends no step of `keys` the run already holds."""
        ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_dict(self, data: Any, artifact_file: str) -> None: ...

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None: ...

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run fn(run, *args) where the run logs (report.py's plots); its result as a Future."""
        ...

    def flush(self, raise_errors: bool = True) -> None: ...

    def metric_history(self, keys: Iterable[str]) -> dict[str, list[float]]: ...

    def log_tf_model(
        self,
        artifacts: Mapping[str, str | Path],
        requirements: Sequence[str],
        name: str = "model",
        *,
        input_example: Any = None,
        metadata: Mapping[str, Any] | None = None,
        registered_model_name: str | None = None,
        step: int | None = None,
    ) -> str: ...

    def end(self, status: str) -> None: ...

    def put_back(self) -> None:
        """End a reopened run as it was found (a resume refused before it trained)."""
        ...


R = TypeVar("R", bound=TrackedRun)


class PutBack(Exception):
    """Raised within `ending`: the run goes back to the status it had before it was reopened."""


@contextlib.contextmanager
def ending(run: R) -> Iterator[R]:
    """End an open run FINISHED, FAILED with the error recorded on it, or KILLED on Ctrl-C.

    A PutBack error (a resume refused before it trained) leaves it as it was found instead.
    """
    try:
        yield run
        # Inside: a signal while the last metrics go (the longest wait here) ends it KILLED.
        run.flush()
    except PutBack:
        with contextlib.suppress(Exception):
            run.put_back()
        raise
    except BaseException as err:
        with contextlib.suppress(Exception):
            run.flush()
        # Keep whatever was logged; add the error so a failed run explains itself in the UI.
        with contextlib.suppress(Exception):
            run.set_tags({"error": f"{type(err).__name__}: {err}"})
            run.log_text(traceback.format_exc(), "error.txt")
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):
            run.end(status)
        raise
    run.end("FINISHED")


def unlogged_steps_only(sink: MetricSink, last: Mapping[str, int]) -> MetricSink:
    """`sink` for a resumed run: no step of a metric at or before `last[metric]` goes to it.

    A resume redoes the epoch that was cut short; what the first attempt logged of it (its first
    batches, or the whole epoch when the process died before its checkpoint) stays.
    """

    def filtered(metrics: Mapping[str, float], step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > last.get(k, -1)}
        if fresh:
            sink(fresh, step)

    return filtered
