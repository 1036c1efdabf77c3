"""MLflow behind one package: every call to MLflow of this project goes through here.

store.py   where runs are stored: URI, checks, safe creation, the experiment, the UI command
run.py     one run: logging by run id, metric buffer, offline spool, how it ends
logged_model.py  a run's logged model: finished, linked to its metrics, registered, repeatably
remote.py  a run logged from a process of its own: what the training process holds
worker.py  a non-chief worker's run, which logs nothing
interface.py  the interface all three runs implement (TrackedRun), an open run, how a run ends
formats.py  a run's names, params and tables, shared by both processes (no MLflow)
sweeps.py  a sweep's parent run and its children
spool.py   a run saved on local disk while its store is gone, to upload later

Names are loaded on first use: `from insect_exp.tracking import remote` or `tracking.flatten`
must not import MLflow into the training process (remote.py says why).
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports name, for type checkers, what __getattr__ loads)
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "formats": ("flatten", "param_value", "run_name", "to_tsv", "ui_footer"),
    "run": ("Run", "environment_tags", "reopen_run", "start_new_run", "start_run"),
    "remote": ("Opening", "RemoteError", "RemoteRun"),
    "worker": ("WorkerRun",),
    "interface": ("MetricSink", "Opened", "TrackedRun", "ending"),
    "store": (
        "STORE_DIR", "StoreError", "default_tracking_uri", "ensure_experiment", "open_client",
        "prepare_store", "refusals_named", "refused_access", "resolve_tracking_uri",
        "retry_if_raced", "ui_command", "ui_url", "with_busy_timeout",
    ),
    "sweeps": ("RunRecord", "child_runs", "create_run", "end_run"),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from insect_exp.tracking.formats import flatten, param_value, run_name, to_tsv, ui_footer
    from insect_exp.tracking.interface import MetricSink, Opened, TrackedRun, ending
    from insect_exp.tracking.remote import Opening, RemoteError, RemoteRun
    from insect_exp.tracking.run import (
        Run,
        environment_tags,
        reopen_run,
        start_new_run,
        start_run,
    )
    from insect_exp.tracking.store import (
        STORE_DIR,
        StoreError,
        default_tracking_uri,
        ensure_experiment,
        open_client,
        prepare_store,
        refusals_named,
        refused_access,
        resolve_tracking_uri,
        retry_if_raced,
        ui_command,
        ui_url,
        with_busy_timeout,
    )
    from insect_exp.tracking.sweeps import RunRecord, child_runs, create_run, end_run
    from insect_exp.tracking.worker import WorkerRun
