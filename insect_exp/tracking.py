"""MLflow behind one small module: where the store is, the run's lifecycle, and what gets logged."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from insect_exp import UserError
from insect_exp.upload import Spool

log = logging.getLogger(__name__)

# MLflow's HTTP client retries a failing request for about 4 minutes by default (7 retries,
# backoff factor 2). A training job would stall that long on every call while a server is down;
# 3 retries with a backoff factor of 1 give up after about 7 s, and the metric buffer tries again
# at the next epoch. Set the variables to keep MLflow's own defaults.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

STORE_DIR = "mlruns"
_MAX_BATCH = 1000  # MLflow's limit of metrics in one log_batch call
_MAX_PARAMS = 100  # ... and of params
_SQLITE_BUSY_TIMEOUT_S = 60
MetricSink = Callable[[Mapping[str, float], int], None]
_VERSIONED = ("tensorflow", "tf-keras", "tensorflow-hub", "mlflow", "hydra-core", "insect_exp")


def default_tracking_uri(launch_dir: str | Path) -> str:
    """SQLite database under mlruns/ in the directory the user launched from."""
    return f"sqlite:///{Path(launch_dir).resolve() / STORE_DIR / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None, launch_dir: str | Path) -> str:
    """Config first, then $MLFLOW_TRACKING_URI, then the default SQLite store."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    (Path(launch_dir) / STORE_DIR).mkdir(parents=True, exist_ok=True)
    return default_tracking_uri(launch_dir)


class StoreError(UserError):
    """The tracking store cannot be used: unreachable, read-only, corrupt or half-migrated."""


def _with_busy_timeout(tracking_uri: str) -> str:
    if tracking_uri.startswith("sqlite:") and "?" not in tracking_uri:
        # sqlite3's default busy timeout is 5 s: parallel sweep jobs logging at once exceed it.
        return f"{tracking_uri}?timeout={_SQLITE_BUSY_TIMEOUT_S}"
    return tracking_uri


def open_client(tracking_uri: str) -> MlflowClient:
    """An MLflow client on the store; SQLite writers wait for each other instead of failing."""
    return MlflowClient(_with_busy_timeout(tracking_uri))


def _sqlite_path(tracking_uri: str) -> Path | None:
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])


@contextlib.contextmanager
def _file_lock(path: Path, timeout_s: float) -> Iterator[None]:
    """An exclusive lock on a file beside the store, shared by every process on this machine."""
    import fcntl

    try:
        handle = path.open("a")
    except OSError as err:
        raise StoreError(f"cannot lock the MLflow store beside {path}: {err}") from err
    with handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"waited {timeout_s:g} s for another process to create the MLflow store "
                        f"({path} is locked); is one stuck?"
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_store(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Make sure the store answers and can be written, before any data is decoded.

    A new SQLite store is created (and an old one migrated) by one process at a time, under a
    lock file beside the database: MLflow's schema migrations race and corrupt a store when
    several processes open a new one at once. A server gets one bounded try instead of MLflow's
    minutes of retries.

    Raises:
        StoreError: one line naming the store and what is wrong with it.
    """
    db = _sqlite_path(tracking_uri)
    if db is not None:
        _prepare_sqlite(tracking_uri, db)
        return
    bounded = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": f"{timeout_s:g}",
    }
    saved = {key: os.environ.get(key) for key in bounded}
    os.environ.update(bounded)
    try:
        open_client(tracking_uri).search_experiments(max_results=1)
    except Exception as err:
        raise StoreError(
            f"cannot reach the MLflow store {tracking_uri} ({_first_line(err)}); start the "
            "server, or point mlflow.tracking_uri / MLFLOW_TRACKING_URI at a reachable one"
        ) from err
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _prepare_sqlite(tracking_uri: str, db: Path) -> None:
    import sqlite3

    if not db.parent.is_dir():
        raise StoreError(f"the MLflow store's folder {db.parent} does not exist")
    if db.exists():
        try:
            with contextlib.closing(sqlite3.connect(db, timeout=_SQLITE_BUSY_TIMEOUT_S)) as conn:
                names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
                # A write transaction: fails at once on a read-only file or folder.
                conn.execute("BEGIN IMMEDIATE")
                conn.rollback()
        except sqlite3.DatabaseError as err:
            raise StoreError(_sqlite_problem(db, err)) from err
        leftovers = sorted(n for n in names if n.startswith("_alembic_tmp_"))
        if leftovers:
            raise StoreError(
                f"the MLflow store {db} was left half-migrated by processes that created it at "
                f"once (tables {', '.join(leftovers)}). Repair: back it up, drop those tables "
                f"(sqlite3 {db} 'DROP TABLE {leftovers[0]}'), then run "
                f"`mlflow db upgrade sqlite:///{db}`; or move it away to start a new store"
            )
    # SQLite writes a journal beside the database: both must be writable. (A check that root
    # passes; root's writes then simply work.)
    if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
        raise StoreError(f"cannot write the MLflow store {db}: it or its folder is read-only")
    with _file_lock(db.with_name(db.name + ".lock"), timeout_s=120):
        if not db.exists():
            # Build the schema in a file of its own and move it into place: a store whose
            # creation was interrupted (Ctrl-C, a kill) is never left half made.
            fresh = db.with_name(f".{db.name}.{os.getpid()}.new")
            fresh.unlink(missing_ok=True)
            try:
                open_client(f"sqlite:///{fresh}").search_experiments(max_results=1)
                os.replace(fresh, db)
            except Exception as err:
                raise StoreError(_sqlite_problem(db, err)) from err
            finally:
                fresh.unlink(missing_ok=True)
        try:
            open_client(tracking_uri).search_experiments(max_results=1)  # migrates an old one
        except Exception as err:
            raise StoreError(_sqlite_problem(db, err)) from err


def _sqlite_problem(db: Path, err: BaseException) -> str:
    text = _first_line(err)
    if "out-of-date database schema" in text:
        return (
            f"the MLflow store {db} has an older schema than this MLflow: back it up, then run "
            f"`mlflow db upgrade sqlite:///{db}`"
        )
    if "readonly" in text or "read-only" in text or "unable to open" in text:
        return f"cannot write the MLflow store {db}: it or its folder is read-only ({text})"
    return f"the MLflow store {db} is not a usable SQLite database ({text}); move it away"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Create the experiment if needed (artifacts beside a local SQLite store) and return its id."""
    client = open_client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    db = _sqlite_path(tracking_uri)
    if db is not None:
        # Without this MLflow puts artifacts in ./mlruns of whatever the current directory is.
        location = (db.parent / "artifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another job created it between our lookup and create.
        return client.get_experiment_by_name(name).experiment_id


def run_name(model: str, optimizer: str, overrides: Sequence[str] = ()) -> str:
    """A readable run name: model, optimizer, then the other command-line overrides."""
    extra = [o for o in overrides if not o.startswith(("model=", "optimizer=", "hydra"))]
    return " ".join([f"{model}-{optimizer}", *extra])[:250]


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


def environment_tags() -> dict[str, str]:
    """Package versions, and the git commit of this package's source when it is a checkout.

    MLflow's own `mlflow.source.git.commit` (of the entry point's repository) is left as MLflow
    sets it: the launch directory may be another repository altogether.
    """
    tags = {}
    for package in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[f"version.{package}"] = metadata.version(package)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        tags["insect_exp.git_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass  # an installed package, or git missing
    return tags


def to_tsv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A table as tab-separated values, quoted where a field holds a tab, newline or quote."""
    out = io.StringIO()
    writer = csv.writer(out, dialect="excel-tab", lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


class Run:
    """One MLflow run, written by its id: two runs in one process never cross.

    Given a spool directory (`spool_to`), a run whose store stops answering goes on offline:
    whatever it logs from then on is saved there, to upload later (insect_exp/upload.py).
    """

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id
        self.experiment_id = client.get_run(run_id).info.experiment_id
        self._pending: list[Metric] = []
        # Every metric this process logged, by key and step: the curves when the store is gone.
        self._logged: dict[str, dict[int, float]] = {}
        self.spool: Spool | None = None
        self.offline = False

    def spool_to(self, directory: str | Path, tracking_uri: str) -> None:
        self.spool = Spool(directory, self.run_id, tracking_uri, self.experiment_id)

    def _write(self, online: Callable[[], Any], offline: Callable[[Spool], Any]) -> None:
        """Send to the store; once it fails (and a spool is set), save locally from then on."""
        if not self.offline:
            try:
                online()
                return
            except Exception as err:
                if self.spool is None:
                    raise
                self.offline = True
                self.spool.open()
                log.warning(
                    "the MLflow store stopped answering (%s): saving run %s in %s",
                    _first_line(err),
                    self.run_id,
                    self.spool.dir,
                )
        offline(self.spool)

    def sink(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer metrics; send them once an epoch-level one arrives (per-batch ones wait).

        What cannot be sent (the store is down) stays buffered and is tried again next time.
        """
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self._pending) >= _MAX_BATCH or any(not k.startswith("batch_") for k in metrics):
            self.flush(raise_errors=False)

    def resumed_sink(self, keys: Iterable[str]) -> MetricSink:
        """A sink for a resumed run that sends no step of `keys` the run already holds.

        A resume redoes the epoch that was cut short; what the first attempt logged of it (its
        first batches, or the whole epoch when the process died before its checkpoint) stays.
        """
        last = {
            key: max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
            for key in keys
        }

        def sink(metrics: Mapping[str, float], step: int) -> None:
            fresh = {k: v for k, v in metrics.items() if step > last.get(k, -1)}
            if fresh:
                self.sink(fresh, step)

        return sink

    def flush(self, raise_errors: bool = True) -> None:
        """Send the buffered metrics (to the spool once offline)."""
        while self._pending:
            chunk = self._pending[:_MAX_BATCH]
            try:
                self._write(
                    lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk),
                    lambda spool, chunk=chunk: spool.metrics(chunk),
                )
            except Exception as err:
                if raise_errors:
                    raise
                log.warning("metrics kept to send later: %s", _first_line(err))
                return
            for m in chunk:
                self._logged.setdefault(m.key, {})[m.step] = m.value
            del self._pending[: len(chunk)]

    def metric_history(self, keys: Iterable[str]) -> dict[str, list[float]]:
        """Every value of each metric, by step: from the store, or offline what was logged here."""
        self.flush()
        if not self.offline:
            try:
                return {
                    key: [
                        m.value
                        for m in sorted(self.client.get_metric_history(self.run_id, key), key=_step)
                    ]
                    for key in keys
                }
            except Exception:
                if self.spool is None:
                    raise
        return {k: [v for _, v in sorted(self._logged.get(k, {}).items())] for k in keys}

    def log_params(self, params: Mapping[str, Any]) -> None:
        values = {k: param_value(v) for k, v in params.items()}
        items = [Param(k, v) for k, v in values.items()]

        def online() -> None:
            for start in range(0, len(items), _MAX_PARAMS):
                self.client.log_batch(self.run_id, params=items[start : start + _MAX_PARAMS])

        self._write(online, lambda spool: spool.params(values))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.flush()
        self.sink(dict(metrics), step or 0)
        self.flush()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        values = {k: str(v)[:5000] for k, v in tags.items()}
        items = [RunTag(k, v) for k, v in values.items()]
        self._write(
            lambda: self.client.log_batch(self.run_id, tags=items),
            lambda spool: spool.tags(values),
        )

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._write(
            lambda: self.client.log_text(self.run_id, text, artifact_file),
            lambda spool: spool.artifact(artifact_file).write_text(text),
        )

    def log_table(self, header: Sequence[str], rows: Iterable[Sequence[Any]], artifact_file: str):
        """Log a table as a TSV file that stays valid for any file name in it."""
        self.log_text(to_tsv(header, rows), artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Log a matplotlib Figure as a PNG (laid out by its builder: no second tight-bbox pass).

        zlib level 1 instead of 6 halves the time to write image grids for ~20% larger files.
        """
        save_kwargs = {"dpi": 100, "pil_kwargs": {"compress_level": 1}}
        self._write(
            lambda: self.client.log_figure(
                self.run_id, figure, artifact_file, save_kwargs=save_kwargs
            ),
            lambda spool: figure.savefig(spool.artifact(artifact_file), **save_kwargs),
        )

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._write(
            lambda: self.client.log_artifacts(self.run_id, str(local_dir), artifact_path),
            lambda spool: spool.artifacts(local_dir, artifact_path),
        )

    def end(self, status: str) -> None:
        """Set the run's final status; offline, say where it is saved and how to upload it."""
        self._write(
            lambda: self.client.set_terminated(self.run_id, status),
            lambda spool: spool.finish(status),
        )
        if self.offline:
            print(
                f"insect_exp: the MLflow store was unreachable: run {self.run_id} ({status}) is "
                f"saved in {self.spool.dir}; upload it with: "
                f"python -m insect_exp.upload {self.spool.dir}",
                file=sys.stderr,
            )

    def log_tf_model(
        self,
        module: Any,
        input_shape: Sequence[int],
        num_outputs: int,
        requirements: Sequence[str],
        name: str = "model",
    ) -> str:
        """Log a tf.Module SavedModel with an explicit signature and requirements; return its URI.

        A plain TensorFlow SavedModel reloads in any process with only TensorFlow installed: no
        Keras version flag, no pickled custom objects (hub.KerasLayer) at load time. Giving the
        signature and requirements skips MLflow's slow inference of both.
        """
        import mlflow.tensorflow
        import numpy as np
        import tensorflow as tf
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_outputs))]),
        )
        # TF2 loading restores variables by itself; the saver ops TF1 loaders need would take
        # a third of the save time of a hub model to build.
        options = tf.saved_model.SaveOptions(experimental_skip_saver=True)
        # log_model takes no client: it writes to the process's tracking URI (set by start_run),
        # and without an active run it would file the model under the Default experiment. The
        # model is therefore created here, in this run's experiment and linked to it by id.
        settings = {
            "signature": signature,
            "pip_requirements": list(requirements),
            "saved_model_kwargs": {"options": options},
        }
        uri: list[str] = []

        def online() -> None:
            logged = self.client.create_logged_model(
                self.experiment_id, name=name, source_run_id=self.run_id
            )
            info = mlflow.tensorflow.log_model(
                module, name=name, model_id=logged.model_id, run_id=self.run_id, **settings
            )
            uri.append(info.model_uri)

        def offline(spool: Spool) -> None:
            mlflow.tensorflow.save_model(module, str(spool.model_dir), **settings)
            uri.append(str(spool.model_dir))

        self._write(online, offline)
        return uri[0]


def param_value(value: Any) -> str:
    """A value as MLflow stores it as a param."""
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:6000]  # MLflow's limit on a param value


@contextlib.contextmanager
def start_run(
    tracking_uri: str,
    experiment_name: str,
    name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    experiment_id: str | None = None,
) -> Iterator[Run]:
    """Open a run that ends FINISHED, FAILED with the error recorded on it, or KILLED on Ctrl-C.

    Args:
        parent_run_id: nests this run under a sweep's parent run.
        experiment_id: the sweep's experiment, created once before its jobs; skips the lookup.
    """
    run = start_new_run(tracking_uri, experiment_name, name, tags, parent_run_id, experiment_id)
    with ending(run):
        yield run


def start_new_run(
    tracking_uri: str,
    experiment_name: str,
    name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    experiment_id: str | None = None,
) -> Run:
    """A new RUNNING run (end it with `ending`); arguments as for `start_run`."""
    from mlflow.tracking.context.registry import resolve_tags

    # Only for mlflow.tensorflow.log_model, which has no tracking-URI argument.
    mlflow.set_tracking_uri(_with_busy_timeout(tracking_uri))
    client = open_client(tracking_uri)
    experiment_id = experiment_id or ensure_experiment(tracking_uri, experiment_name)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    # MLflow's own context tags (user, source name and type, git commit of the entry point), as
    # its fluent start_run would set them.
    all_tags = resolve_tags(all_tags)
    return Run(client, client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id)


def reopen_run(tracking_uri: str, run_id: str) -> Run:
    """An existing run, RUNNING again, to resume into (end it with `ending`)."""
    client = open_client(tracking_uri)
    mlflow.set_tracking_uri(_with_busy_timeout(tracking_uri))
    try:
        found = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise UserError(f"no run {run_id!r} in the MLflow store {tracking_uri}") from err
    if "error" in found.data.tags:  # what stopped it last time is history now
        client.delete_tag(run_id, "error")
    client.update_run(run_id, status="RUNNING")
    return Run(client, run_id)


@contextlib.contextmanager
def ending(run: Run) -> Iterator[Run]:
    """End an open run FINISHED, FAILED with the error recorded on it, or KILLED on Ctrl-C."""
    try:
        yield run
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
    run.flush()
    run.end("FINISHED")


def ui_command(tracking_uri: str) -> str:
    """The shell command that opens the MLflow UI on this store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


# Sweeps: a parent run that the jobs of a multirun nest under. These work by run id through the
# client, never through the fluent API's active run, which belongs to whichever job runs here.


@dataclass
class RunRecord:
    """What a sweep summary reads of one run."""

    run_id: str
    name: str
    status: str
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    # Full histories of the metrics asked for, ordered by step.
    history: dict[str, list[float]] = field(default_factory=dict)


def create_run(
    tracking_uri: str,
    experiment_id: str,
    name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Open a RUNNING run (a sweep parent, or a stand-in for a job that died early); return id."""
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    client = open_client(tracking_uri)
    return client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Close a run opened with create_run as FINISHED, FAILED or KILLED."""
    open_client(tracking_uri).set_terminated(run_id, status)


def child_runs(
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    history_keys: Sequence[str] = (),
) -> list[RunRecord]:
    """Every run nested under a parent, with the metric histories asked for."""
    client = open_client(tracking_uri)
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    found, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            break
    return [
        RunRecord(
            run_id=run.info.run_id,
            name=run.info.run_name,
            status=run.info.status,
            tags=dict(run.data.tags),
            metrics=dict(run.data.metrics),
            history={
                key: [
                    m.value
                    for m in sorted(client.get_metric_history(run.info.run_id, key), key=_step)
                ]
                for key in history_keys
            },
        )
        for run in found
    ]


def _step(metric: Metric) -> tuple[int, int]:
    return metric.step, metric.timestamp
