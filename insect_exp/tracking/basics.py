"""What both processes of a run use: names, params, tables, and how a run ends. No MLflow here.

The training process logs through `remote.RemoteRun` and never imports MLflow (remote.py says
why); these helpers are shared by it and by the logging process's `run.Run`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shlex
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from insect_exp.tracking.interface import MetricSink, TrackedRun

R = TypeVar("R", bound=TrackedRun)


def run_name(model: str, optimizer: str, overrides: Sequence[str] = ()) -> str:
    """A readable run name: model, optimizer, then the other command-line overrides."""
    extra = [o for o in overrides if not o.startswith(("model=", "optimizer=", "hydra"))]
    return " ".join([f"{model}-{optimizer}", *extra])[:250]


def ui_footer(ui_command: str, ui_url: str, tracking_uri: str) -> str:
    """What a run or a sweep prints last: how to open its runs, and the store for MLflow's tools.

    The URI is shell-quoted: a launch directory's path may hold spaces or quotes.
    """
    return (
        f"Open the UI: {ui_command}\n  then: {ui_url}\n"
        f"For MLflow's commands and API: export MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)}"
    )


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping to dotted keys: {"model": {"name": "cnn"}} -> {"model.name": "cnn"}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def to_tsv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A table as tab-separated values, quoted where a field holds a tab, newline or quote."""
    out = io.StringIO()
    writer = csv.writer(out, dialect="excel-tab", lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def param_value(value: Any) -> str:
    """A value as MLflow stores it as a param."""
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:6000]  # MLflow's limit on a param value


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
