"""Ctrl-C, SIGTERM (SLURM preemption) and SIGKILL mid-training; resuming the run they left."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from insect_exp.tracking.remote import LOGGER_DIED
from tests.faults.conftest import (
    epochs_logged,
    finish,
    interrupt,
    only_run,
    run,
    start,
    steps,
    wait_until,
)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_ends_killed_with_its_metrics_and_resumes_to_the_end(
    tmp_path, folder, store, signum, code
):
    # Given a run in its second epoch or later
    process = start(f"dataset.root={folder}", "epochs=40", cwd=tmp_path)
    wait_until(lambda: epochs_logged(store) >= 1)

    # When it gets the signal
    interrupt(process, signum)
    exit_code, stderr = finish(process, timeout=120)

    # Then it exits 130/143 with one line naming the resume command, and no traceback
    assert exit_code == code, stderr[-2000:]
    assert "Traceback" not in stderr
    found = only_run(store)
    run_id = found.info.run_id
    assert f"python -m insect_exp resume={run_id}" in stderr.strip().splitlines()[-1]
    # And the run is KILLED, says how to resume, and keeps every epoch and batch so far
    assert found.info.status == "KILLED"
    assert found.data.tags["resume_command"] == f"python -m insect_exp resume={run_id}"
    epochs_before = steps(store, run_id, "loss")
    assert epochs_before == list(range(len(epochs_before))) and epochs_before
    batches_before = steps(store, run_id, "batch_loss")
    assert len(batches_before) >= 23 * len(epochs_before)  # 90 images in batches of 4

    # When it is resumed, with more epochs than it had left
    resumed_code, resumed_err, _ = run(f"resume={run_id}", "epochs=3", cwd=tmp_path)
    if len(epochs_before) >= 3:
        pytest.skip("the machine was slow: the run had done 3 epochs before the signal")

    # Then the same run goes on to FINISHED from its last completed epoch, no step logged twice
    assert resumed_code == 0, resumed_err[-2000:]
    after = MlflowClient(store).get_run(run_id)
    assert after.info.status == "FINISHED" and "error" not in after.data.tags
    assert steps(store, run_id, "loss") == [0, 1, 2]
    assert steps(store, run_id, "val_loss") == [0, 1, 2]
    batch_steps = steps(store, run_id, "batch_loss")
    assert batch_steps == list(range(3 * 23))


def test_a_run_killed_outright_resumes_the_same_way(tmp_path, folder, store):
    # Given a run whose training process was killed with SIGKILL (the OOM killer)
    process = start(f"dataset.root={folder}", "epochs=40", cwd=tmp_path)
    wait_until(lambda: epochs_logged(store) >= 1)
    interrupt(process, signal.SIGKILL)
    finish(process, timeout=60)  # until its logging process lets go of the output too

    # Then its logging process ended the run FAILED, saying why, with every epoch it sent
    found = only_run(store)
    assert found.info.status == "FAILED"
    assert "training process ended without ending its run" in found.data.tags["error"]
    done = len(steps(store, found.info.run_id, "loss"))
    assert done >= 1 and steps(store, found.info.run_id, "loss") == list(range(done))

    # When it is resumed to a few more epochs
    code, stderr, _ = run(f"resume={found.info.run_id}", f"epochs={done + 1}", cwd=tmp_path)

    # Then it finishes with each epoch logged once
    assert code == 0, stderr[-2000:]
    assert MlflowClient(store).get_run(found.info.run_id).info.status == "FINISHED"
    assert steps(store, found.info.run_id, "loss") == list(range(done + 1))


def _logging_process(parent: int) -> int:
    """The pid of the MLflow logging process that `parent` started (tracking/remote.py)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == parent and b"serve_from_argv" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
    raise AssertionError(f"process {parent} has no logging process")


def test_a_logging_process_killed_alone_leaves_the_run_failed_and_resumable(
    tmp_path, folder, store
):
    # Given a run in its second epoch or later
    process = start(f"dataset.root={folder}", "epochs=40", cwd=tmp_path)
    wait_until(lambda: epochs_logged(store) >= 1)

    # When its MLflow logging process is killed (the OOM killer's choice), not the training
    os.kill(_logging_process(process.pid), signal.SIGKILL)
    exit_code, stderr = finish(process, timeout=120)

    # Then the training stops at its next log call with one line that names the resume
    # command, and the run is FAILED, saying why, with the epochs it had sent
    assert exit_code == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    found = only_run(store)
    run_id = found.info.run_id
    last = stderr.strip().splitlines()[-1]
    assert "logging process ended unexpectedly" in last
    assert f"python -m insect_exp resume={run_id}" in last
    assert found.info.status == "FAILED"
    assert found.data.tags["error"] == LOGGER_DIED.format(code=-signal.SIGKILL)
    done = len(steps(store, run_id, "loss"))
    assert done >= 1 and steps(store, run_id, "loss") == list(range(done))

    # When it is resumed to one more epoch, it finishes with each epoch logged once
    code, stderr, _ = run(f"resume={run_id}", f"epochs={done + 1}", cwd=tmp_path)
    assert code == 0, stderr[-2000:]
    assert MlflowClient(store).get_run(run_id).info.status == "FINISHED"
    assert steps(store, run_id, "loss") == list(range(done + 1))


def test_resuming_a_deterministic_run_gives_the_uninterrupted_result(tmp_path, folder, store):
    # Given the same deterministic CNN run for 4 epochs, and for 2 epochs (its checkpoints kept)
    # then resumed to 4
    common = (
        f"dataset.root={folder}",
        "deterministic=true",
        "seed=7",
        "train.keep_checkpoints=true",
    )
    code, stderr, _ = run(*common, "epochs=4", "mlflow.run_name=whole", cwd=tmp_path)
    assert code == 0, stderr[-2000:]
    code, stderr, _ = run(*common, "epochs=2", "mlflow.run_name=halves", cwd=tmp_path)
    assert code == 0, stderr[-2000:]
    client = MlflowClient(store)
    runs = {r.info.run_name: r for r in client.search_runs(["1"])}
    halves = runs["halves"].info.run_id
    code, stderr, _ = run(f"resume={halves}", "epochs=4", cwd=tmp_path)
    assert code == 0, stderr[-2000:]

    # Then both end with the same validation loss, epoch by epoch
    whole = [
        m.value
        for m in sorted(
            client.get_metric_history(runs["whole"].info.run_id, "val_loss"), key=lambda m: m.step
        )
    ]
    resumed = [m.value for m in sorted(client.get_metric_history(halves, "val_loss"),
                                       key=lambda m: m.step)]  # fmt: skip
    assert len(whole) == len(resumed) == 4
    assert resumed == pytest.approx(whole, abs=1e-4)


def test_a_resume_logs_the_epochs_whose_checkpoint_was_written_but_not_their_metrics(
    tmp_path, folder, store
):
    # Given a 2-epoch run whose logging process died after epoch 1's checkpoint was written but
    # before it stored epoch 1's metrics (made here by taking them out of the store)
    code, stderr, _ = run(
        f"dataset.root={folder}", "epochs=2", "train.keep_checkpoints=true", cwd=tmp_path
    )
    assert code == 0, stderr[-2000:]
    run_id = only_run(store).info.run_id
    client = MlflowClient(store)
    keys = ("loss", "accuracy", "val_loss", "val_accuracy", "lr")
    before = {key: _values(client, run_id, key) for key in keys}
    database = store.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute("DELETE FROM metrics WHERE run_uuid = ? AND step = 1", (run_id,))
        db.execute("DELETE FROM latest_metrics WHERE run_uuid = ? AND step = 1", (run_id,))
    client.set_terminated(run_id, "FAILED")
    assert steps(store, run_id, "loss") == [0]

    # When it is resumed to the same 2 epochs: none is left to train
    code, stderr, _ = run(f"resume={run_id}", "epochs=2", cwd=tmp_path)

    # Then epoch 1's metrics are back, from the checkpoint, each epoch logged once
    assert code == 0, stderr[-2000:]
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in keys:
        assert steps(store, run_id, key) == [0, 1], key
        assert _values(client, run_id, key) == pytest.approx(before[key]), key


def _values(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_resume_refuses_to_change_anything_but_epochs(tmp_path, folder, store):
    code, stderr, _ = run(f"dataset.root={folder}", "epochs=1", cwd=tmp_path)
    assert code == 0, stderr[-2000:]
    run_id = only_run(store).info.run_id

    code, stderr, _ = run(f"resume={run_id}", "optimizer=sgd", cwd=tmp_path)

    assert code == 2
    assert "only epochs may change" in stderr and "Traceback" not in stderr
