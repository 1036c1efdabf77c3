"""The store: concurrent starts, broken, corrupt, read-only, unreachable or hung stores."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.faults.conftest import TINY, environment, finish, run, server_epochs, start, wait_until
from tests.mlflow_server import MlflowServer


def test_four_runs_started_together_on_a_new_store_all_finish(tmp_path, folder):
    # Given no store yet in the launch directory
    # When four runs start at the same moment (two terminals, a joblib sweep...)
    processes = [
        start(f"dataset.root={folder}", "epochs=1", f"seed={i}", cwd=tmp_path) for i in range(4)
    ]
    results = [finish(p) for p in processes]

    # Then every one of them ends FINISHED in one healthy store
    assert [code for code, _ in results] == [0, 0, 0, 0], [err[-1500:] for _, err in results]
    db = tmp_path / "mlruns" / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("insect_exp").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4
    leftovers = sqlite3.connect(db).execute(
        "SELECT name FROM sqlite_master WHERE name LIKE '_alembic_tmp_%'"
    )
    assert leftovers.fetchall() == []


def test_a_half_migrated_store_is_named_with_its_repair(tmp_path, folder, store):
    # Given a store that concurrent creation left with an _alembic_tmp_ table
    db = tmp_path / "mlruns" / "mlflow.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE _alembic_tmp_model_versions (x INTEGER)")

    # When a run starts on it
    code, stderr, _ = run(f"dataset.root={folder}", cwd=tmp_path)

    # Then it stops with exit 2 and one line naming the table and the repair
    assert code == 2, stderr
    line = stderr.strip().splitlines()[-1]
    assert "half-migrated" in line and "_alembic_tmp_model_versions" in line
    assert "mlflow db upgrade" in line and "Traceback" not in stderr


def test_a_corrupt_store_stops_the_run_before_any_data_is_read(tmp_path, folder):
    (tmp_path / "mlruns").mkdir()
    (tmp_path / "mlruns" / "mlflow.db").write_bytes(b"this is not a database" * 100)

    code, stderr, _ = run(f"dataset.root={folder}", cwd=tmp_path)

    assert code == 2, stderr
    assert "not a usable SQLite database" in stderr and "Traceback" not in stderr
    assert "decoded" not in stderr  # no image was decoded


def test_an_unreachable_server_fails_fast_with_one_line(tmp_path, folder):
    # Given a tracking URI where nothing listens
    env = environment(MLFLOW_TRACKING_URI="http://127.0.0.1:9")

    # When a run starts
    code, stderr, seconds = run(f"dataset.root={folder}", cwd=tmp_path, env=env, timeout=120)

    # Then it gives up within 15 s of the process's own start-up with one line and exit 2
    assert code == 2, stderr
    assert "cannot reach the MLflow store http://127.0.0.1:9" in stderr
    assert "Traceback" not in stderr
    assert seconds < 60  # a generous bound for a hang; the target is under 15 s


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="needs POSIX users")
def test_a_read_only_store_is_refused_with_exit_2(folder, template_store):
    # Given a store its user cannot write. Root writes anything, so as root the run is made
    # nobody's, in a folder of its own under /tmp that nobody can enter.
    home = Path(tempfile.mkdtemp(prefix="insect-readonly-", dir="/tmp"))
    user: list[str] = []
    if os.geteuid() == 0:
        user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        # An interpreter under /root (pyenv's) may not even start as nobody: not what is tested.
        probe = subprocess.run(
            [*user, sys.executable, "-c", "import insect_exp"], capture_output=True
        )
        if probe.returncode != 0:
            os.rmdir(home)
            pytest.skip(f"this Python cannot run as nobody: {probe.stderr.decode()[-200:]}")
    try:
        os.chmod(home, 0o777)
        shutil.copytree(folder, home / "insects")
        (home / "mlruns").mkdir()
        db = home / "mlruns" / "mlflow.db"
        db.write_bytes(template_store.read_bytes())
        os.chmod(db, 0o444)
        os.chmod(home / "mlruns", 0o555)
        for path in [home / "insects", *(home / "insects").rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)

        # When a run starts on it
        out = subprocess.run(
            [*user, sys.executable, "-m", "insect_exp", *TINY, f"dataset.root={home / 'insects'}",
             "hydra.run.dir=/tmp/" + home.name + "/outputs"],
            cwd=home,
            env=environment(HOME=str(home), INSECT_EXP_CACHE_DIR=str(home / "data")),
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip

        # Then it stops at once with one line saying the store is read-only
        assert out.returncode == 2, out.stderr[-2000:]
        assert "read-only" in out.stderr and "Traceback" not in out.stderr
    finally:
        os.chmod(home / "mlruns", 0o755)
        shutil.rmtree(home, ignore_errors=True)


def test_a_server_that_accepts_but_never_answers_fails_start_up_within_seconds(tmp_path, folder):
    # Given a tracking URI where a server accepts connections but never reads nor answers (hung)
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"

        # When a run starts
        code, stderr, seconds = run(
            f"dataset.root={folder}", cwd=tmp_path, env=environment(MLFLOW_TRACKING_URI=url),
            timeout=120,
        )  # fmt: skip

    # Then it gives up with one line and exit 2, not after MLflow's 120 s a try
    assert code == 2, stderr[-3000:]
    assert f"cannot reach the MLflow store {url}" in stderr and "Traceback" not in stderr
    assert seconds < 60  # a generous bound for a hang; the target is 15 s


# A client of the store that is not insect_exp (a notebook, a monitoring script): MLflow imported
# first, it opens the store as soon as the run takes its lock to create it, and goes on reading.
_FOREIGN_CLIENT = """
import sys, time
from pathlib import Path
from mlflow.tracking import MlflowClient

uri, lock, stop = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
while not lock.exists():
    time.sleep(0.005)
while not stop.exists():
    try:
        MlflowClient(uri).search_experiments()
        print("read", flush=True)
    except Exception as err:
        print("ERROR", repr(err)[:500], flush=True)
    time.sleep(0.05)
"""


def test_a_foreign_client_opening_a_new_store_while_a_run_creates_it_breaks_neither(
    tmp_path, folder
):
    # Given no store yet, and another MLflow client that opens its path the moment a run
    # begins creating it
    db = tmp_path / "mlruns" / "mlflow.db"
    stop = tmp_path / "stop"
    foreign = subprocess.Popen(
        [sys.executable, "-c", _FOREIGN_CLIENT, f"sqlite:///{db}", f"{db}.lock", str(stop)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment(),
    )  # fmt: skip
    try:
        # When the run starts
        code, stderr, _ = run(f"dataset.root={folder}", "epochs=1", cwd=tmp_path)
    finally:
        stop.touch()
        seen, _ = foreign.communicate(timeout=120)

    # Then the run finishes, the other client read the store without an error, and the store
    # is whole
    assert code == 0, stderr[-3000:]
    assert "ERROR" not in seen and "read" in seen, seen[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("insect_exp")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED"
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.slow
def test_a_server_that_hangs_mid_run_is_left_within_seconds_and_the_run_saved_offline(
    tmp_path, folder, template_store
):
    # Given a run logging to a tracking server
    db = tmp_path / "server.db"
    db.write_bytes(template_store.read_bytes())
    server = MlflowServer(f"sqlite:///{db}", tmp_path / "artifacts", tmp_path / "server.log")
    process = None
    try:
        server.wait_ready()
        env = environment(MLFLOW_TRACKING_URI=server.url)
        process = start(f"dataset.root={folder}", "epochs=4", cwd=tmp_path, env=env)
        wait_until(lambda: server_epochs(server.url) >= 1, timeout=240, process=process)

        # When the server hangs: it still accepts connections, and never answers (stopped)
        os.killpg(server.pid, signal.SIGSTOP)
        hung_at = time.monotonic()
        code, stderr = finish(process, timeout=300)
        seconds = time.monotonic() - hung_at
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGCONT)
        server.stop()

    # Then training ends anyway, saved offline with one line saying how to upload it, in
    # seconds rather than MLflow's 120 s a try, 4 tries a call
    assert code == 0, stderr[-3000:]
    assert "the MLflow store was unreachable" in stderr and "upload it with" in stderr
    assert seconds < 150, seconds  # a generous bound for a hang: about 25 s, plus the training
