"""Ctrl-C (a notebook's interrupt button) during `insect_exp.train` and `insect_exp.sweep`, and
resuming from Python."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.faults.conftest import (
    environment,
    epochs_logged,
    finish,
    interrupt,
    only_run,
    wait_until,
)
from tests.sweeps import TINY

SCRIPT = """
import sys
import insect_exp
from insect_exp.resilience import Interrupted

try:
    insect_exp.train(*sys.argv[1:])
except Interrupted as err:
    print("INTERRUPTED", err.run_id, flush=True)
    result = insect_exp.train(f"resume={err.run_id}", "epochs=2")
    print("RESUMED", result.run_id, result.status, list(result.history.index), flush=True)
"""


def test_interrupting_train_raises_interrupted_and_the_run_resumes_from_python(
    tmp_path: Path, folder: Path, store: str
) -> None:
    # Given insect_exp.train in its second epoch or later, in a process that catches
    # resilience.Interrupted and then resumes the run it names from Python
    # When it gets Ctrl-C
    code, stdout, stderr = _interrupt_in_second_epoch(SCRIPT, tmp_path, folder, store)
    # Then the caller got Interrupted with the run's id, the run ended KILLED and resumable, and
    # the resume from Python finished it in the same run
    assert code == 0, stderr[-3000:]
    run_id = only_run(store).info.run_id
    assert f"INTERRUPTED {run_id}" in stdout, stdout[-2000:] + stderr[-2000:]
    assert f"RESUMED {run_id} FINISHED [0, 1]" in stdout, stdout[-2000:] + stderr[-2000:]


# The handler to restore is the one the process had: Python's own, or SIG_IGN where the process
# was started from a shell's background job (`cmd &`), which ignores Ctrl-C.
SWEEP_SCRIPT = """
import signal
import sys
import insect_exp
from insect_exp.resilience import Interrupted

own = signal.getsignal(signal.SIGINT)
try:
    insect_exp.sweep({"optimizer": ["adam", "sgd"]}, *sys.argv[1:])
except Interrupted as err:
    restored = signal.getsignal(signal.SIGINT) is own
    print("INTERRUPTED", err.run_id, "handler restored:", restored, flush=True)
"""


def test_interrupting_a_sweep_ends_its_child_and_parent_killed(
    tmp_path: Path, folder: Path, store: str
) -> None:
    # Given insect_exp.sweep over two optimizers, its first job in its second epoch or later
    # When it gets Ctrl-C (what a notebook's interrupt button sends)
    code, stdout, stderr = _interrupt_in_second_epoch(SWEEP_SCRIPT, tmp_path, folder, store)
    # Then the caller got Interrupted naming the running child, which ended KILLED; the parent
    # ended KILLED, the second job never started, and the process's Ctrl-C handler is its own
    assert code == 0, stderr[-3000:]
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("insect_exp")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "sweep.dir" in r.data.tags]
    (child,) = [r for r in runs if r is not parent]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (child.info.status, parent.info.status) == ("KILLED", "KILLED")
    line = f"INTERRUPTED {child.info.run_id} handler restored: True"
    assert line in stdout, stdout[-2000:] + stderr[-2000:]


def _interrupt_in_second_epoch(
    script: str, cwd: Path, folder: Path, store: str
) -> tuple[int, str, str]:
    """`python -c SCRIPT` training on folder for up to 40 epochs, sent Ctrl-C once an epoch is
    logged; its exit code, stdout and stderr."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, *TINY, f"dataset.root={folder}", "epochs=40"]
        + [f"mlflow.tracking_uri={store}"],
        cwd=cwd,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: epochs_logged(store) >= 1, process=process)
    interrupt(process)
    stdout = process.stdout.read() if process.stdout else ""
    code, stderr = finish(process, timeout=300)
    return code, stdout, stderr
