"""MLflow behind one package: every call to MLflow of this project goes through here.

store.py   where runs are stored: URI, checks, safe creation, the experiment, the UI command
run.py     one run: logging by run id, metric buffer, offline spool, how it ends
sweeps.py  a sweep's parent run and its children
"""

from insect_exp.tracking.run import (
    MetricSink,
    Run,
    ending,
    environment_tags,
    flatten,
    param_value,
    reopen_run,
    run_name,
    start_new_run,
    start_run,
    to_tsv,
)
from insect_exp.tracking.store import (
    STORE_DIR,
    StoreError,
    default_tracking_uri,
    ensure_experiment,
    open_client,
    prepare_store,
    resolve_tracking_uri,
    retry_if_raced,
    ui_command,
    ui_url,
)
from insect_exp.tracking.sweeps import RunRecord, child_runs, create_run, end_run

__all__ = [
    "STORE_DIR",
    "MetricSink",
    "Run",
    "RunRecord",
    "StoreError",
    "child_runs",
    "create_run",
    "default_tracking_uri",
    "end_run",
    "ending",
    "ensure_experiment",
    "environment_tags",
    "flatten",
    "open_client",
    "param_value",
    "prepare_store",
    "reopen_run",
    "resolve_tracking_uri",
    "retry_if_raced",
    "run_name",
    "start_new_run",
    "start_run",
    "to_tsv",
    "ui_command",
    "ui_url",
]
