"""The fault suite: real `python -m insect_exp` processes, faults injected, the store read after.

Each test asserts the exit code, any time bound named in the issue it covers, the run's status,
and that nothing already logged was lost.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import make_image_folder

# One tiny CNN run: 32x32 images, batches of 4, no model export.
TINY = (
    "dataset=insects",
    "model.image_size=[32,32]",
    "batch_size=4",
    "mlflow.log_model=false",
    "dataset.decode_workers=1",
)


@pytest.fixture(scope="session")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class folder big enough for epochs that last a moment (30 train, 6 test a class)."""
    return make_image_folder(
        tmp_path_factory.mktemp("faults") / "insects", train_per_class=30, test_per_class=6
    )


@pytest.fixture(scope="session")
def template_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, made once: creating one takes seconds of migrations."""
    from insect_exp import tracking

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    tracking.prepare_store(f"sqlite:///{db}")
    return db


@pytest.fixture
def store(tmp_path: Path, template_store: Path) -> str:
    """A fresh copy of the template store under tmp_path/mlruns; returns its URI."""
    (tmp_path / "mlruns").mkdir()
    shutil.copy(template_store, tmp_path / "mlruns" / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def start(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """`python -m insect_exp TINY... args` in cwd, running in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "insect_exp", *TINY, *args],
        cwd=cwd,
        env=env or environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for a process; its exit code and stderr."""
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def run(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None):
    """Run to the end; (exit code, stderr, seconds)."""
    began = time.perf_counter()
    code, stderr = finish(start(*args, cwd=cwd, env=env), timeout)
    return code, stderr, time.perf_counter() - began


def only_run(uri: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("insect_exp")
    (found,) = client.search_runs([experiment.experiment_id])
    return found


def wait_until(
    condition: Callable[[], bool],
    timeout: float = 120,
    process: subprocess.Popen | None = None,
    output: Callable[[], str] = str,
) -> None:
    """Poll condition; fail at the timeout, or at once if process exits first, with output()."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"exited {process.returncode} while waiting\n{output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting\n{output()}")
        time.sleep(0.2)


def epochs_logged(uri: str) -> int:
    """Epochs the single run in the store has finished so far (0 while none or no run)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("insect_exp")
    if experiment is None:
        return 0
    runs = client.search_runs([experiment.experiment_id])
    if not runs:
        return 0
    return len(client.get_metric_history(runs[0].info.run_id, "loss"))


def server_epochs(url: str) -> int:
    """`epochs_logged` on a server that may be down or hung (0 then)."""
    try:
        return epochs_logged(url)
    except Exception:
        return 0


def steps(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def interrupt(process: subprocess.Popen, signum: int = signal.SIGINT) -> None:
    process.send_signal(signum)
