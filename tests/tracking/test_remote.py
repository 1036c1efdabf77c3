"""A run logged from its own process (tracking/remote.py): same record, errors, and endings."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from insect_exp.tracking import StoreError
from insect_exp.tracking.remote import LOGGER_DIED, ORPHANED, Opening, RemoteError, RemoteRun
from tests.conftest import artifact_paths, make_image_folder


def write_note(run, text: str) -> str:
    """Runs in the logging process, on its run (see test_submitted_work...)."""
    run.log_text(text, "note.txt")
    return f"wrote {len(text)} characters"


def fail_in_logging_process(run) -> None:
    raise ValueError("no plots today")


def _only_run(uri: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("insect_exp").experiment_id])
    return run


def test_a_remote_run_logs_what_a_run_logs_and_its_process_ends_with_it(tracking_uri, tmp_path):
    # Given a run opened by its logging process
    run = RemoteRun(Opening(tracking_uri, str(tmp_path), run_name="remote", tags={"who": "me"}))
    opened = run.opened()
    assert (opened.tracking_uri, opened.run_name) == (tracking_uri, "remote")

    # When the training side logs params, batch and epoch metrics, text, and submitted work
    run.log_params({"model.name": "cnn", "layers": [16, 32]})
    for step in range(3):
        run.sink({"batch_loss": 1.0 - step / 10}, step)
    run.sink({"loss": 0.5, "val_accuracy": 0.75}, 0)
    run.log_text("hello", "notes/hello.txt")
    written = run.submit(write_note, "from the other process")
    assert written.result(timeout=60) == "wrote 22 characters"
    history = run.metric_history(["batch_loss", "val_accuracy"])
    run.end("FINISHED")

    # Then the store holds all of it, in a FINISHED run, and the logging process has exited 0
    assert history == {"batch_loss": [1.0, 0.9, 0.8], "val_accuracy": [0.75]}
    found = _only_run(tracking_uri)
    assert found.info.status == "FINISHED" and found.info.run_name == "remote"
    assert found.data.params == {"model.name": "cnn", "layers": "[16, 32]"}
    assert found.data.tags["who"] == "me" and "version.mlflow" in found.data.tags
    paths = artifact_paths(MlflowClient(tracking_uri), found.info.run_id)
    assert {"notes/hello.txt", "note.txt"} <= paths
    assert run.process.returncode == 0


def test_an_error_of_a_call_that_did_not_wait_is_raised_by_the_next_call_that_waits(
    tracking_uri, tmp_path
):
    run = RemoteRun(Opening(tracking_uri, str(tmp_path)))
    run.log_params({"bad\nname": 1})  # MLflow refuses the key, in the logging process
    with pytest.raises(MlflowException, match="Invalid value"):
        run.flush()
    # A submitted job's error is its own future's
    with pytest.raises(ValueError, match="no plots today"):
        run.submit(fail_in_logging_process).result(timeout=60)
    run.end("FAILED")
    assert _only_run(tracking_uri).info.status == "FAILED"


def test_a_store_that_cannot_be_used_is_named_by_opened_and_every_later_call(tmp_path):
    run = RemoteRun(Opening(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}", str(tmp_path)))
    with pytest.raises(StoreError, match="does not exist"):
        run.opened()
    run.set_tags({"a": 1})  # does not wait
    with pytest.raises(StoreError, match="does not exist"):
        run.end("FAILED")  # waits, and stops the process anyway
    assert run.process.returncode == 0


def test_a_run_its_training_side_let_go_of_without_ending_ends_failed_with_what_it_sent(
    tracking_uri, tmp_path
):
    # Given batch metrics that wait in the logging process's buffer for their epoch's end
    run = RemoteRun(Opening(tracking_uri, str(tmp_path)))
    run.sink({"loss": 0.5}, 0)
    run.sink({"batch_loss": 0.4}, 5)

    # When the training side goes away without ending the run (as a SIGKILL leaves it)
    run.close()

    # Then the run is FAILED with the reason, and the buffered metric was sent first
    found = _only_run(tracking_uri)
    assert found.info.status == "FAILED" and found.data.tags["error"] == ORPHANED
    assert found.data.metrics == {"loss": 0.5, "batch_loss": 0.4}


def test_a_logging_process_that_dies_leaves_its_run_failed_not_running(tracking_uri, tmp_path):
    # Given an open run with a metric in the store
    run = RemoteRun(Opening(tracking_uri, str(tmp_path)))
    run.log_metrics({"loss": 0.5}, step=0)
    run.flush()

    # When its logging process dies (killed, out of memory) while the training goes on
    run.process.kill()
    run.process.wait(timeout=60)
    with pytest.raises(RemoteError, match="ended unexpectedly"):
        for step in range(1000):  # the next call fails, once the socket's end is read
            run.sink({"batch_loss": 0.1}, step)
            time.sleep(0.01)
    with pytest.raises(RemoteError):
        run.end("FINISHED")

    # Then the training process ended the run FAILED with the reason; what was sent is kept
    found = _only_run(tracking_uri)
    assert found.info.status == "FAILED", found.info.status
    assert found.data.tags["error"] == LOGGER_DIED.format(code=-9)
    assert found.data.metrics["loss"] == 0.5


def test_the_training_process_never_imports_mlflow_or_matplotlib(tmp_path):
    # Given a whole train command, its imports listed by Python (-X importtime: this process
    # only, not the logging process it starts)
    folder = make_image_folder(tmp_path / "insects")
    command = [
        "-X", "importtime", "-m", "insect_exp", "dataset=insects", f"dataset.root={folder}",
        "model.image_size=[32,32]", "batch_size=8", "epochs=1",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, *command], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    imported = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", done.stderr, re.M)
    assert "tensorflow" in imported  # the listing is there

    # Then neither MLflow nor matplotlib was imported there, and the run is complete
    # (a package counts when its submodules load)
    kept_out = ("mlflow", "matplotlib", "sqlalchemy")
    heavy = [m for m in imported if m.split(".")[0] in kept_out and "." in m]
    assert heavy == []
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    found = _only_run(uri)
    assert found.info.status == "FINISHED"
    paths = artifact_paths(MlflowClient(uri), found.info.run_id)
    assert {"plots/confusion_matrix.png", "plots/training_curves.png"} <= paths
