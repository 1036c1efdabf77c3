"""How a run's names, params and tables are written, in both processes of a run. No MLflow here.

The training process logs through `remote.RemoteRun` and never imports MLflow (remote.py says
why); these helpers are shared by it and by the logging process's `run.Run`.
"""

from __future__ import annotations

import csv
import io
import json
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


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
