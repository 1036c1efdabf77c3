"""Sweeps under faults: a job's process killed, the sweep itself interrupted, sweeps at once."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from insect_exp.tracking.remote import ORPHANED
from tests.faults.conftest import TINY, environment, wait_until

# Long enough that the healthy job is still training when the other is killed.
EPOCHS = 150


class Sweep:
    """`python -m insect_exp -m TINY... overrides` in the background, its output in a file.

    Not a pipe: nobody reads one until the sweep ends, and two jobs printing 150 epochs (~160 KB)
    fill it, which stalls both jobs in their next print.
    """

    def __init__(self, cwd: Path, folder: Path, *overrides: str):
        self.log = cwd / f"sweep-{len(list(cwd.glob('sweep-*.log')))}.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "insect_exp", "-m", *TINY, f"dataset.root={folder}",
                 *overrides],
                cwd=cwd, env=environment(), stdout=out, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        wait_until(condition, timeout, self.process, self.output)

    def end(self, timeout: float) -> int:
        """Wait for the sweep to exit; its exit code."""
        return self.process.wait(timeout)


def _runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("insect_exp")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def _children_with_epochs(uri: str) -> list:
    client = MlflowClient(uri)
    return [
        r
        for r in _runs(uri)
        if "mlflow.parentRunId" in r.data.tags and client.get_metric_history(r.info.run_id, "loss")
    ]


def _parent(runs: list):
    (parent,) = [r for r in runs if "sweep.dir" in r.data.tags]
    return parent


def _job_processes(pid: int, marker: bytes) -> list[int]:
    """The processes under pid (at any depth) whose command line holds marker."""
    found = []
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    for child in map(int, out.stdout.split()):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if marker in command:
            found.append(child)
        found += _job_processes(child, marker)
    return found


def test_sigterm_to_a_sweep_ends_its_parent_and_running_job_killed_with_a_summary(
    tmp_path, folder, store
):
    # Given a two-job sweep on the basic launcher, its first job training
    sweep = Sweep(tmp_path, folder, "epochs=60", "seed=1,2")
    sweep.wait_until(lambda: _children_with_epochs(store), timeout=180)

    # When the sweep gets SIGTERM (SLURM preemption, kill)
    sweep.process.send_signal(signal.SIGTERM)

    # Then it exits 143, its running job is KILLED, and the parent is KILLED with its summary
    assert sweep.end(timeout=120) == 143, sweep.output()
    runs = _runs(store)
    parent = _parent(runs)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert [c.info.status for c in children] == ["KILLED"]
    assert parent.info.status == "KILLED"
    assert parent.data.metrics["jobs_killed"] == 1 and parent.data.metrics["jobs_finished"] == 0
    client = MlflowClient(store)
    assert "summary/children.csv" in {
        a.path for a in client.list_artifacts(parent.info.run_id, "summary")
    }
    assert not [r for r in runs if r.info.status == "RUNNING"]


# Each launcher's job processes: joblib's loky workers, submitit's job scripts.
JOB_PROCESS = {"joblib": b"LokyProcess", "submitit_local": b"submitit.core._submit"}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(JOB_PROCESS))
def test_a_killed_job_fails_alone_and_the_counts_are_true(tmp_path, folder, store, launcher):
    # Given a sweep of two jobs running side by side, both training
    sweep = Sweep(
        tmp_path, folder, f"epochs={EPOCHS}", "seed=1,2", f"hydra/launcher={launcher}",
        *(["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []),
    )  # fmt: skip
    sweep.wait_until(lambda: len(_children_with_epochs(store)) == 2, timeout=240)

    # When the first job's process (started first: the lower pid) is killed outright (the OOM
    # killer); a launcher that collects results in job order stops at that one
    workers = sorted(_job_processes(sweep.process.pid, JOB_PROCESS[launcher]))
    assert len(workers) == 2, workers
    subprocess.run(["kill", "-9", str(workers[0])], check=False)

    # Then the other job trains on to the end, the sweep ends 1, no run is left RUNNING, the
    # dead job's run says why, and the parent's counts are the true ones
    assert sweep.end(timeout=300) == 1, sweep.output()
    runs = _runs(store)
    assert not [r for r in runs if r.info.status == "RUNNING"], sweep.output()
    parent = _parent(runs)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    statuses = [c.info.status for c in children]
    assert sorted(statuses) == ["FAILED", "FINISHED"], sweep.output()
    (dead,) = [c for c in children if c.info.status == "FAILED"]
    # (its logging process ends it as its socket closes; else the launcher reports the job)
    error = dead.data.tags["error"]
    assert error == ORPHANED or error.startswith("job process died"), dead.data.tags
    (healthy,) = [c for c in children if c.info.status == "FINISHED"]
    client = MlflowClient(store)
    assert len(client.get_metric_history(healthy.info.run_id, "loss")) == EPOCHS
    metrics = parent.data.metrics
    assert metrics["jobs_finished"] == statuses.count("FINISHED")
    assert metrics["jobs_failed"] == statuses.count("FAILED")
    assert metrics["jobs_killed"] == statuses.count("KILLED")


def test_two_sweeps_started_at_once_get_their_own_dir_and_parent(tmp_path, folder, store):
    # When two one-job sweeps start at the same moment in one directory
    sweeps = [Sweep(tmp_path, folder, "epochs=1", f"seed={seed}") for seed in (1, 2)]
    codes = [s.end(timeout=300) for s in sweeps]

    # Then both finish, each with its own parent run and sweep dir, and one child each
    assert codes == [0, 0], [s.output() for s in sweeps]
    runs = _runs(store)
    parents = [r for r in runs if "sweep.dir" in r.data.tags]
    assert len(parents) == 2
    assert len({p.data.tags["sweep.dir"] for p in parents}) == 2
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert [c.info.status for c in children] == ["FINISHED"]
