"""Where runs are stored: the store's URI, checking and creating it safely, the experiment."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
)
from mlflow.tracking import MlflowClient

from insect_exp import UserError
from insect_exp.errors import first_line

log = logging.getLogger(__name__)

# MLflow's HTTP client waits 120 s for each answer and retries for minutes (7 retries, backoff
# factor 2): a server that is down, or that accepts connections but never answers (stopped,
# hung), would stall a run that long on every call. 7 s a try and 2 retries (backoff 0 then 2 s)
# give up within about 25 s, and the run goes on offline (run.py). Where the user set one of
# these, it is kept.
_HTTP_BOUNDS = {
    MLFLOW_HTTP_REQUEST_TIMEOUT: "7",
    MLFLOW_HTTP_REQUEST_MAX_RETRIES: "2",
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR: "1",
}
STORE_DIR = "mlruns"
_SQLITE_BUSY_TIMEOUT_S = 60
_QUIET_S = 15.0  # a new store that nothing has written for this long is not being created
# How MLflow's UI (3.x) tells a model-training experiment from a GenAI one: with it, the
# experiment opens on its runs rather than on traces and an assistant panel.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


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


def with_busy_timeout(tracking_uri: str) -> str:
    if tracking_uri.startswith("sqlite:") and "?" not in tracking_uri:
        # sqlite3's default busy timeout is 5 s: parallel sweep jobs logging at once exceed it.
        return f"{tracking_uri}?timeout={_SQLITE_BUSY_TIMEOUT_S}"
    return tracking_uri


def open_client(tracking_uri: str) -> MlflowClient:
    """An MLflow client on the store; SQLite writers wait for each other instead of failing, and
    a server's calls give up in seconds (_HTTP_BOUNDS)."""
    bound_http_requests(tracking_uri)
    return MlflowClient(with_busy_timeout(tracking_uri))


def bound_http_requests(tracking_uri: str) -> None:
    """Where the store is a server, bound MLflow's HTTP waits and retries in this process.

    MLflow reads the variables at each request, so they hold for every client and artifact
    upload of the process from here on.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    for variable, value in _HTTP_BOUNDS.items():
        if not variable.defined:
            os.environ[variable.name] = value


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
    bound_http_requests(tracking_uri)
    bounded = {  # one try, of at most timeout_s
        MLFLOW_HTTP_REQUEST_MAX_RETRIES.name: "0",
        MLFLOW_HTTP_REQUEST_TIMEOUT.name: f"{min(timeout_s, MLFLOW_HTTP_REQUEST_TIMEOUT.get()):g}",
    }
    saved = {key: os.environ.get(key) for key in bounded}
    os.environ.update(bounded)
    try:
        open_client(tracking_uri).search_experiments(max_results=1)
    except Exception as err:
        raise refused_access(tracking_uri, err) or StoreError(
            f"cannot reach the MLflow store {tracking_uri} ({first_line(err)}); start the "
            "server, or point mlflow.tracking_uri / MLFLOW_TRACKING_URI at a reachable one"
        ) from err
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def refused_access(tracking_uri: str, err: BaseException, what: str = "") -> StoreError | None:
    """The one-line error for a server that refused our login (401) or a write (403), else None.

    A refusal is not a lost server: retrying, or spooling the run to upload later, cannot help;
    the user's credentials or permissions must change. The message names the server and the user
    MLflow sent (from MLFLOW_TRACKING_USERNAME or ~/.mlflow/credentials), never the password.

    Args:
        what: what was refused, for a 403 ("write to experiment 'x'"); default: use the store.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import read_mlflow_creds

    if not isinstance(err, MlflowException):
        return None
    status = err.get_http_status_code()
    if status not in (401, 403):
        return None
    server = _without_password(tracking_uri)
    user = read_mlflow_creds().username
    if status == 403:
        return StoreError(
            f"the MLflow server {server} does not let user {user!r} {what or 'use this store'} "
            "(HTTP 403, permission denied): ask the server's admin for EDIT permission on it"
        )
    if user is None:
        return StoreError(
            f"the MLflow server {server} asks who you are and no user was given (HTTP 401): set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your account on it"
        )
    return StoreError(
        f"the MLflow server {server} refused user {user!r}: wrong password, or no such user "
        "(HTTP 401); check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )


@contextlib.contextmanager
def refusals_named(tracking_uri: str, what: str) -> Iterator[None]:
    """Raise a server's refusal (401, 403) inside as one StoreError; other errors as they are."""
    try:
        yield
    except Exception as err:
        refused = refused_access(tracking_uri, err, what)
        if refused is None:
            raise
        raise refused from err


def _without_password(uri: str) -> str:
    """The URI with any password in it (http://user:secret@host) left out."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}@{host}"))


def _prepare_sqlite(tracking_uri: str, db: Path) -> None:
    import sqlite3

    if not db.parent.is_dir():
        raise StoreError(f"the MLflow store's folder {db.parent} does not exist")
    if db.exists():
        try:
            with contextlib.closing(sqlite3.connect(db, timeout=_SQLITE_BUSY_TIMEOUT_S)) as conn:
                conn.execute("SELECT name FROM sqlite_master").fetchall()
                # A write transaction: fails at once on a read-only file or folder.
                conn.execute("BEGIN IMMEDIATE")
                conn.rollback()
        except sqlite3.DatabaseError as err:
            raise StoreError(_sqlite_problem(db, err)) from err
    # SQLite writes a journal beside the database: both must be writable. (A check that root
    # passes; root's writes then simply work.)
    if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
        raise StoreError(f"cannot write the MLflow store {db}: it or its folder is read-only")
    with _file_lock(db.with_name(db.name + ".lock"), timeout_s=120):
        if not db.exists():
            _create_sqlite(db)
        names = _wait_until_created(db, timeout_s=120)
        leftovers = sorted(n for n in names if n.startswith("_alembic_tmp_"))
        if leftovers:
            raise StoreError(
                f"the MLflow store {db} was left half-migrated by processes that created it at "
                f"once (tables {', '.join(leftovers)}). Repair: back it up, drop those tables "
                f"(sqlite3 {db} 'DROP TABLE {leftovers[0]}'), then run "
                f"`mlflow db upgrade sqlite:///{db}`; or move it away to start a new store"
            )
        try:
            open_client(tracking_uri).search_experiments(max_results=1)  # migrates an old one
        except Exception as err:
            raise StoreError(_sqlite_problem(db, err)) from err


def _create_sqlite(db: Path) -> None:
    """Build the schema in a file of its own, then put it in place if the path is still free.

    A store whose creation was interrupted (Ctrl-C, a kill) is never left half made. And the file
    never replaces one at the path: a program that does not take our lock (`mlflow ui`, a
    notebook) may have opened the path meanwhile, and be creating the store in it. Moved over,
    its file would live on unlinked under its writes, and its journal would be rolled into ours.
    """
    fresh = db.with_name(f".{db.name}.{os.getpid()}.new")
    fresh.unlink(missing_ok=True)
    try:
        open_client(f"sqlite:///{fresh}").search_experiments(max_results=1)
        try:
            os.link(fresh, db)  # fails if the path exists: unlike a rename, never replaces it
        except FileExistsError:
            pass  # that program's store: _wait_until_created waits for it
        except OSError:  # a file system without hard links
            if not db.exists():
                os.replace(fresh, db)
    except Exception as err:
        raise StoreError(_sqlite_problem(db, err)) from err
    finally:
        fresh.unlink(missing_ok=True)


def _wait_until_created(db: Path, timeout_s: float) -> set[str]:
    """The store's table names, once no other program is creating it.

    A program outside our lock (`mlflow ui`, a notebook) that found no store at the path creates
    one there: MLflow runs its migrations one by one, committing each. Until its schema is at
    MLflow's latest version, or nothing has written the store for _QUIET_S (an old store, which
    MLflow then upgrades or refuses; an empty file), opening it would run the same migrations
    again beside that program's and corrupt it.
    """
    import sqlite3

    head = _schema_head()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with contextlib.closing(sqlite3.connect(db, timeout=_SQLITE_BUSY_TIMEOUT_S)) as conn:
                names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
                versions = []
                if "alembic_version" in names:
                    versions = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        except sqlite3.DatabaseError as err:
            raise StoreError(_sqlite_problem(db, err)) from err
        current = versions[0][0] if versions else None
        if (current is not None and current == (head or current)) or _quiet(db):
            return names
        if time.monotonic() > deadline:
            raise StoreError(
                f"the MLflow store {db} is incomplete: another program (mlflow ui, a notebook?) "
                f"has been creating it for over {timeout_s:g} s; if none is running, move it away"
            )
        time.sleep(0.2)


def _quiet(db: Path) -> bool:
    """Whether nothing has written the database, or its journal, for _QUIET_S."""
    written = [0.0]
    for path in (db, Path(f"{db}-journal"), Path(f"{db}-wal")):
        with contextlib.suppress(FileNotFoundError):  # a journal comes and goes
            written.append(path.stat().st_mtime)
    return max(written) < time.time() - _QUIET_S


def _schema_head() -> str | None:
    """The schema version of a store that MLflow creates: the last of the migrations that
    `mlflow db upgrade` runs (None: not found where MLflow ships them)."""
    import mlflow.store
    from alembic.script import ScriptDirectory

    try:
        migrations = Path(mlflow.store.__file__).parent / "db_migrations"
        return ScriptDirectory(str(migrations)).get_current_head()
    except Exception:
        return None  # then a stamped store counts as complete


def _sqlite_problem(db: Path, err: BaseException) -> str:
    text = first_line(err)
    if "out-of-date database schema" in text:
        return (
            f"the MLflow store {db} has an older schema than this MLflow: back it up, then run "
            f"`mlflow db upgrade sqlite:///{db}`"
        )
    if "readonly" in text or "read-only" in text or "unable to open" in text:
        return f"cannot write the MLflow store {db}: it or its folder is read-only ({text})"
    return f"the MLflow store {db} is not a usable SQLite database ({text}); move it away"


# What a store says when two writers insert the same new row at once (SQLite, PostgreSQL, MySQL).
_DUPLICATE_ROW = ("UNIQUE constraint failed", "duplicate key value", "Duplicate entry")


def retry_if_raced(call: Callable[[], Any], attempts: int = 4) -> Any:
    """call(), again when it lost an insert race to another process.

    MLflow adds a dataset it has not seen with a read, then an insert. Runs that start together on
    the same data (a sweep's jobs) race there: all read "not yet", one inserts, the others hit the
    unique constraint. Their transaction is rolled back, and the next try finds the row.
    """
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:
            if attempt == attempts - 1 or not any(s in str(err) for s in _DUPLICATE_ROW):
                raise
            time.sleep(0.05 * (attempt + 1))


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Create the experiment if needed (artifacts beside a local SQLite store) and return its id."""
    client = open_client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND[0] not in experiment.tags:  # one made before this tag existed
            client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        return experiment.experiment_id
    location = None
    db = _sqlite_path(tracking_uri)
    if db is not None:
        # Without this MLflow puts artifacts in ./mlruns of whatever the current directory is.
        location = (db.parent / "artifacts").resolve().as_uri()
    try:
        return client.create_experiment(
            name, artifact_location=location, tags=dict([EXPERIMENT_KIND])
        )
    except mlflow.exceptions.MlflowException:
        # Another job created it between our lookup and create.
        raced = client.get_experiment_by_name(name)
        if raced is None:  # it was not that: the creation's own error
            raise
        return raced.experiment_id


def ui_command(tracking_uri: str) -> str:
    """The shell command that opens the MLflow UI on this store."""
    quoted = shlex.quote(tracking_uri)  # a launch directory's path may hold spaces
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {quoted}"
    return f"mlflow ui --backend-store-uri {quoted} --host 127.0.0.1 --port 5000"


def ui_url(tracking_uri: str, experiment_id: str) -> str:
    """The page of the experiment's runs in the MLflow UI that `ui_command` opens.

    MLflow 3's UI opens in its GenAI mode (traces, an assistant) by a setting of its own, not
    by the experiment's kind; `workflowType=machine_learning` opens it on the training runs.
    """
    base = tracking_uri.rstrip("/") if tracking_uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
