"""A run logged from a process of its own: the training process never imports MLflow.

Importing MLflow and opening its SQLite store (SQLAlchemy's models, Alembic), and drawing and
saving the plots, hold the GIL: in a thread of the training process they would wait on
TensorFlow's import, tracing and export, which hold the GIL too. In a process of its own they run
on another core while the training process imports TensorFlow, decodes the images and exports the
model; and a run whose training process is killed still ends, FAILED with the reason.

`RemoteRun` is the training process's side. It starts the logging process at once and sends it
every call, in order:
- calls that return nothing (log_*, set_tags, the metric sink) do not wait; an error in one is
  raised by the next call that does wait (flush, metric_history, log_tf_model, end);
- `submit(fn, *args)` runs `fn(run, *args)` in the logging process beside those calls and returns
  a Future: report.py's plots are drawn there.

The logging process holds a `run.Run`, so the metric buffer, the spool (a store that stops
answering) and the ending work as they do in one process. It ignores SIGINT and SIGTERM: they reach
the training process too (Ctrl-C, SLURM's preemption), which ends the run KILLED through it. Its
log records go to the training process's logging. It exits when told to, or when the training
process is gone (its end of the socket closes): a run not ended by then (SIGKILL, the OOM killer)
ends FAILED with the reason, after what was buffered is sent.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from insect_exp.errors import first_line, portable
from insect_exp.tracking.interface import MetricSink, Opened, unlogged_steps_only

if TYPE_CHECKING:
    from insect_exp.tracking.run import Run

log = logging.getLogger(__name__)

ORPHANED = (
    "the training process ended without ending its run (killed: SIGKILL, or out of memory); "
    "what it logged is kept"
)
LOGGER_DIED = (
    "the MLflow logging process died (exit code {code}); what it had not sent to the store yet "
    "is lost"
)
# argv: the socket's descriptor, and the folder this package was imported from (a checkout that
# is not installed), added to sys.path where it is not there already.
_ENTRY = (
    "import sys; root = sys.argv[2]; root in sys.path or sys.path.insert(0, root); "
    "from insect_exp.tracking.remote import serve_from_argv; serve_from_argv()"
)


@dataclass(frozen=True)
class Opening:
    """The run the logging process opens: a new one, or (resume) an existing one.

    Attributes:
        tracking_uri: the store; None: $MLFLOW_TRACKING_URI, else mlruns/ under launch_dir.
        check_store: check (and create) the store first: store.prepare_store.
        spool_dir: where the run goes on offline if its store stops answering (spool.py).
        resume: the id of the run to reopen; the other fields but the store's are ignored.
    """

    tracking_uri: str | None
    launch_dir: str
    experiment_name: str = "insect_exp"
    run_name: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None
    experiment_id: str | None = None
    check_store: bool = True
    spool_dir: str | None = None
    resume: str | None = None


class RemoteError(RuntimeError):
    """The logging process failed, or an error of it could not travel as itself."""


class LoggingProcessDied(RemoteError):
    """The logging process died before it was closed; `run_id`: the run it left (None: none).

    The training process ends that run FAILED itself (RemoteRun._lost).
    """

    def __init__(self, message: str, run_id: str | None):
        super().__init__(message)
        self.run_id = run_id


class RemoteRun:
    """A `run.Run` in a logging process of its own, driven from the training process.

    Started at once; `opened()` waits for the run (and raises what kept it from opening, e.g. a
    StoreError). End it with `interface.ending` (or `end`), which also stops the process; `close`
    alone leaves a run that was not ended to be ended FAILED.
    """

    def __init__(self, opening: Opening):
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[2])
        try:
            self._process = _start(
                [sys.executable, "-c", _ENTRY, str(theirs.fileno()), package_root],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                # Out of the terminal's process group: Ctrl-C reaches the training process only,
                # even while this one starts (it ignores SIGINT once it runs).
                start_new_session=True,
            )
        finally:
            theirs.close()
        # Closing a socket that another thread reads does not end its read: `close` shuts the
        # writing side down instead, and the reader ends when the logging process closes its side.
        self._socket = ours
        self._conn = Connection(os.dup(ours.fileno()))
        self._send = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, Future | None] = {}  # None: a call that does not wait
        self._deferred: BaseException | None = None  # the first error of those
        self._opened: Future = Future()
        self._gone: RemoteError | None = None
        self._closed = False
        self._ending_here: threading.Thread | None = None  # see _lost
        self.ended: str | None = None  # the status the store holds once `end` got through
        self._post("open", opening, future=self._opened)
        self._reader = threading.Thread(target=self._read, name="insect_exp-mlflow", daemon=True)
        self._reader.start()

    # What the run is: each waits until the logging process has opened it.
    def opened(self) -> Opened:
        return self._opened.result()

    @property
    def run_id(self) -> str:
        return self.opened().run_id

    @property
    def experiment_id(self) -> str:
        return self.opened().experiment_id

    @property
    def process(self) -> subprocess.Popen:
        """The logging process: its pid, and its exit code once it is gone."""
        return self._process

    # Calls that do not wait.
    def sink(self, metrics: Mapping[str, float], step: int) -> None:
        self._post("sink", {k: float(v) for k, v in metrics.items()}, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._post("log_params", dict(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._post("log_metrics", {k: float(v) for k, v in metrics.items()}, step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._post("set_tags", {k: str(v) for k, v in tags.items()})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._post("log_text", text, artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self._post("log_dict", data, artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._post("log_artifacts", str(local_dir), artifact_path)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run fn(run, *args) in the logging process (fn and args travel by pickle)."""
        future: Future = Future()
        self._post("submit", fn, *args, future=future)
        return future

    # Calls that wait, and raise the first error of the calls before them.
    def flush(self, raise_errors: bool = True) -> None:
        self._call("flush", raise_errors)

    def metric_history(self, keys: Iterable[str]) -> dict[str, list[float]]:
        return self._call("metric_history", list(keys))

    def resumed_sink(self, keys: Iterable[str]) -> MetricSink:
        """As run.Run.resumed_sink: no step of `keys` that the run already holds is sent again."""
        return unlogged_steps_only(self.sink, self._call("last_steps", list(keys)))

    def log_tf_model(self, *args: Any, **kwargs: Any) -> str:
        """As run.Run.log_tf_model; the model's files must live until it returns."""
        return self._call("log_tf_model", *args, **kwargs)

    def end(self, status: str) -> None:
        """End the run with `status` (after the submitted work) and stop the logging process.

        `ended` says `status` once the store has it, even when a signal cut the wait short:
        `close` waits for the reply.
        """
        future: Future = Future()
        future.add_done_callback(lambda done: self._note_ended(done, status))
        try:
            self._post("end", status, future=future)
            self._result(future)
        finally:
            self.close()

    def put_back(self) -> None:
        """End a reopened run as it was found (run.Run.put_back) and stop the logging process."""
        try:
            self._call("put_back")
        finally:
            self.close()

    def _note_ended(self, done: Future, status: str) -> None:
        if not done.cancelled() and done.exception() is None:
            self.ended = status

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the logging process; a run it holds that was not ended ends FAILED."""
        with self._send:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):  # OSError: it is gone already
            self._socket.shutdown(socket.SHUT_WR)  # the logging process reads EOF
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("the MLflow logging process did not stop in %g s: killed", timeout_s)
            self._process.kill()
            self._process.wait()
        self._reader.join(timeout_s)
        if self._ending_here is not None:
            self._ending_here.join()
        self._conn.close()
        self._socket.close()

    def _post(self, name: str, *args: Any, future: Future | None = None, **kwargs: Any) -> None:
        # Pickled apart from the message: what cannot travel fails here, and what cannot be
        # unpickled there fails its own call only.
        payload = pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        with self._send:
            if self._gone is not None:
                raise self._gone
            if self._closed:
                raise RemoteError("the run's logging process is closed")
            call_id = next(self._ids)
            self._waiting[call_id] = future
            try:
                self._conn.send((call_id, name, payload))
                failed = None
            except (OSError, ValueError) as err:
                failed = err
        if failed is not None:
            raise self._lost(failed) from failed

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        future: Future = Future()
        self._post(name, *args, future=future, **kwargs)
        return self._result(future)

    def _result(self, future: Future) -> Any:
        result = future.result()
        # Replies come in order: every call before this one has answered.
        with self._send:
            deferred, self._deferred = self._deferred, None
        if deferred is not None:
            raise deferred
        return result

    def _read(self) -> None:
        """The logging process's replies and log records, until it is gone."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError) as err:
                self._lost(err)
                return
            if message[0] == "log":
                _, name, level, text = message
                logging.getLogger(name).log(level, "%s", text)
                continue
            _, call_id, ok, value = message
            with self._send:
                future = self._waiting.pop(call_id, None)
                if future is None:
                    if not ok and self._deferred is None:
                        self._deferred = value
                    continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _lost(self, err: BaseException) -> RemoteError:
        """Fail every call still waiting: the logging process is gone.

        Gone before `close` (killed, out of memory, a crash in MLflow), it leaves its run open:
        this process ends it FAILED with the reason, in a thread that `close` and the
        interpreter's exit wait for, while the training fails on its next call. MLflow is
        imported here then, in this fault only.
        """
        code = _exit_code(self._process)
        with self._send:
            first = self._gone is None
            unexpected = first and not self._closed
            opened = None
            if unexpected and self._opened.done() and self._opened.exception() is None:
                opened = self._opened.result()
            if self._gone is None:  # first
                self._gone = (
                    LoggingProcessDied(
                        f"the MLflow logging process ended unexpectedly (exit code {code}; "
                        f"{type(err).__name__})",
                        opened.run_id if opened else None,
                    )
                    if unexpected
                    else RemoteError("the run's logging process is closed")
                )
            gone = self._gone
            waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if future is not None and not future.done():
                future.set_exception(gone)
        if opened is not None:
            self._ending_here = threading.Thread(
                target=_end_left_open, args=(opened, LOGGER_DIED.format(code=code)),
                name="insect_exp-mlflow-ending",
            )  # fmt: skip
            self._ending_here.start()
        return gone


def _exit_code(process: subprocess.Popen, wait_s: float = 5.0) -> int | None:
    """The process's exit code, once it has exited (its socket can close a moment before)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        return process.wait(wait_s)
    return None


def _end_left_open(opened: Opened, reason: str) -> None:
    """End a run that its dead logging process left RUNNING: FAILED, with the reason."""
    from insect_exp.tracking import store

    try:
        client = store.open_client(opened.tracking_uri)
        if client.get_run(opened.run_id).info.status != "RUNNING":
            return  # it ended the run before it died
        client.set_tag(opened.run_id, "error", reason)
        client.set_terminated(opened.run_id, "FAILED")
        log.error("run %s ended FAILED: %s", opened.run_id, reason)
    except Exception as err:
        log.error(
            "%s; run %s could not be ended (%s): it shows RUNNING",
            reason, opened.run_id, first_line(err),
        )  # fmt: skip


def _start(command: list[str], **kwargs: Any) -> subprocess.Popen:
    """Popen(command), where a user who cannot open sys.executable's path can still run it.

    A process whose interpreter lies under a folder it cannot enter (a virtualenv linked to
    /root/.pyenv, run by another user through setpriv or sudo) started anyway, but cannot start
    that path again. /proc/self/exe is the interpreter itself; argv[0] keeps the virtualenv's path
    so that the new process finds the same site-packages.
    """
    try:
        return subprocess.Popen(command, **kwargs)
    except PermissionError:
        if not Path("/proc/self/exe").exists():
            raise
        return subprocess.Popen(command, executable="/proc/self/exe", **kwargs)


# The logging process's side.


def serve_from_argv() -> None:
    """Entry point of the logging process: `python -c ... FD` (see RemoteRun)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    serve(Connection(int(sys.argv[1])))


def serve(conn: Connection) -> None:
    """Open the run the first message asks for, then answer calls on it until the socket closes."""
    sending = threading.Lock()

    def reply(call_id: int, ok: bool, value: Any) -> None:
        if not ok:
            value = _portable(value)
        with sending, contextlib.suppress(OSError, ValueError):  # the training process is gone
            conn.send(("reply", call_id, ok, value))

    _forward_logs(conn, sending)
    call_id, _, payload = conn.recv()
    (opening,), _ = pickle.loads(payload)
    try:
        run, opened = _open(opening)
    except BaseException as err:
        reply(call_id, False, err)
        _refuse(conn, reply, err)
        return
    reply(call_id, True, opened)
    _quiet_mlflow()

    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="insect_exp-logging")
    submitted: list[Future] = []
    ended = False
    while True:
        try:
            call_id, name, payload = conn.recv()
        except (EOFError, OSError):
            break
        try:
            args, kwargs = pickle.loads(payload)
        except Exception as err:
            reply(call_id, False, err)
            continue
        if name == "submit":
            fn, *rest = args
            job = background.submit(fn, run, *rest)

            def answer(done: Future, call_id: int = call_id) -> None:
                reply(call_id, done.exception() is None, done.exception() or done.result())

            job.add_done_callback(answer)
            submitted.append(job)
            continue
        if name in ("end", "put_back"):
            for job in submitted:  # what was drawn goes in before the run ends
                job.exception()
            ended = True
        try:
            reply(call_id, True, getattr(run, name)(*args, **kwargs))
        except BaseException as err:
            reply(call_id, False, err)
    background.shutdown(wait=True)
    if not ended:
        _end_orphaned(run)
    conn.close()


def _open(opening: Opening) -> tuple[Run, Opened]:
    from insect_exp.tracking import run as runs
    from insect_exp.tracking import store

    uri = store.resolve_tracking_uri(opening.tracking_uri, opening.launch_dir)
    if opening.check_store:
        store.prepare_store(uri)
    # A server that lets a user read but not write refuses the first write: opening the run.
    what = (
        "reopen that run" if opening.resume else f"write to experiment {opening.experiment_name!r}"
    )
    with store.refusals_named(uri, what):
        if opening.resume:
            reopened = runs.reopen_run(uri, opening.resume)
            return reopened, reopened.opened()  # its name, tags and digests, as the store has them
        run = runs.start_new_run(
            uri,
            opening.experiment_name,
            opening.run_name,
            {**runs.environment_tags(), **opening.tags},
            opening.parent_run_id,
            opening.experiment_id,
        )
        if opening.spool_dir:
            run.spool_to(opening.spool_dir, uri)
    ui = store.ui_command(uri), store.ui_url(uri, run.experiment_id)
    return run, Opened(run.run_id, opening.run_name, run.experiment_id, uri, {}, *ui)


def _quiet_mlflow() -> None:
    """MLflow's own INFO lines once the run is open ("Validating input example ..." while it saves
    a model) are not the run's news; MLFLOW_LOGGING_LEVEL, where set, decides."""
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def _end_orphaned(run: Any) -> None:
    """The training process is gone without ending its run: keep what it sent, end it FAILED."""
    try:
        run.flush(raise_errors=False)
        run.set_tags({"error": ORPHANED})
        run.end("FAILED")
    except Exception as err:
        print(f"insect_exp: could not end run {run.run_id}: {err}", file=sys.stderr)


def _refuse(conn: Connection, reply: Callable[[int, bool, Any], None], err: BaseException) -> None:
    """After a failed opening: answer every call with its error until the socket closes."""
    while True:
        try:
            call_id, *_ = conn.recv()
        except (EOFError, OSError):
            return
        reply(call_id, False, err)


def _portable(err: BaseException) -> BaseException:
    """`err` with its traceback as a note, or a RemoteError saying it, if it does not pickle."""
    with_trace = "".join(traceback.format_exception(err)).rstrip()
    add_note = getattr(err, "add_note", None)  # Python 3.11+
    if add_note is not None and not getattr(err, "__notes__", None):
        add_note(f"in the MLflow logging process:\n{with_trace}")
    return portable(err, lambda text: RemoteError(f"{text}\n{with_trace}"))


class _LogForwarder(logging.Handler):
    def __init__(self, conn: Connection, sending: threading.Lock):
        super().__init__()
        self.conn = conn
        self.sending = sending

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = ("log", record.name, record.levelno, self.format(record))
            with self.sending:
                self.conn.send(message)
        except Exception:
            pass  # the training process is gone: nothing to tell


def _forward_logs(conn: Connection, sending: threading.Lock) -> None:
    root = logging.getLogger()
    root.handlers[:] = [_LogForwarder(conn, sending)]
    root.setLevel(logging.INFO)
