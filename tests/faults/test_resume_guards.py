"""What a resume refuses, what a finished run keeps, and what a signal after the end says.

Each test drives `python -m insect_exp` and reads the exit code, the last stderr line and the
MLflow store.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import make_image_folder, run_cli
from tests.faults.conftest import finish, interrupt, only_run, run, start, steps, wait_until

KEEP = "train.keep_checkpoints=true"


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def _models_of(uri: str, run_id: str) -> list[str]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("insect_exp")
    found = client.search_logged_models([experiment.experiment_id])
    return [m.model_id for m in found if m.source_run_id == run_id]


def _finished_run(store: str, cwd: Path, *args: str) -> str:
    """A run trained to its end with `args`; its id."""
    code, stderr, _ = run(*args, cwd=cwd)
    assert code == 0, stderr[-2000:]
    return only_run(store).info.run_id


def test_a_finished_run_is_resumed_only_to_more_epochs_and_says_which_model_is_current(
    tmp_path, folder, store
):
    # Given a 2-epoch run that logged its model and kept its checkpoints
    run_id = _finished_run(store, tmp_path, f"dataset.root={folder}", "epochs=2",
                           "mlflow.log_model=true", KEEP)  # fmt: skip
    (first_model,) = _models_of(store, run_id)

    # When it is resumed to fewer, then to as many epochs as it trained
    for epochs in (1, 2):
        code, stderr, _ = run(
            f"resume={run_id}", f"epochs={epochs}", "mlflow.log_model=true", cwd=tmp_path
        )

        # Then each is refused in one line, and the run is untouched
        assert code == 2, stderr[-2000:]
        assert "Traceback" not in stderr
        assert f"run {run_id} is FINISHED after epoch 2 of 2: nothing to resume" in _last_line(
            stderr
        )
    assert steps(store, run_id, "test_accuracy") == [1]
    assert _models_of(store, run_id) == [first_model]

    # When it is resumed to 3 epochs
    code, stderr, _ = run(f"resume={run_id}", "epochs=3", "mlflow.log_model=true", cwd=tmp_path)

    # Then it trains epoch 3 only, is evaluated at that epoch's step, and names its new model
    assert code == 0, stderr[-2000:]
    after = MlflowClient(store).get_run(run_id)
    assert after.info.status == "FINISHED"
    assert steps(store, run_id, "loss") == [0, 1, 2]
    assert steps(store, run_id, "test_accuracy") == [1, 2]
    models = _models_of(store, run_id)
    (second_model,) = set(models) - {first_model}
    assert after.data.tags["current_model"] == f"models:/{second_model}"
    assert after.data.tags["resumed_after_epoch"] == "2"


def test_a_finished_run_drops_its_checkpoints_and_cannot_train_further(tmp_path, folder, store):
    # Given a run that finished without train.keep_checkpoints
    run_id = _finished_run(store, tmp_path, f"dataset.root={folder}", "epochs=1")

    # Then its checkpoint folder is gone
    directory = Path(MlflowClient(store).get_run(run_id).data.tags["checkpoint_dir"])
    assert directory.parent.is_dir() and not directory.exists()

    # And training it further is refused in one line naming the setting that keeps them
    code, stderr, _ = run(f"resume={run_id}", "epochs=2", cwd=tmp_path)
    assert code == 2, stderr[-2000:]
    last = _last_line(stderr)
    assert "checkpoints are gone" in last and "train.keep_checkpoints=true" in last
    assert steps(store, run_id, "loss") == [0]


def test_a_second_resume_of_a_run_being_resumed_is_refused(tmp_path, folder, store):
    # Given a run left KILLED after its first epoch, resumed to 40 epochs and training
    run_id = _finished_run(store, tmp_path, f"dataset.root={folder}", "epochs=1", KEEP)
    MlflowClient(store).set_terminated(run_id, "KILLED")
    first = start(f"resume={run_id}", "epochs=40", cwd=tmp_path)
    wait_until(lambda: len(steps(store, run_id, "loss")) >= 2, process=first)

    # When it is resumed a second time meanwhile
    code, stderr, _ = run(f"resume={run_id}", "epochs=40", cwd=tmp_path)

    # Then the second is refused in one line and the first trains on alone
    assert code == 2, stderr[-2000:]
    assert f"run {run_id} is being trained by another process" in _last_line(stderr)
    assert first.poll() is None
    interrupt(first)
    first_code, first_err = finish(first, timeout=120)
    assert first_code == 130, first_err[-2000:]
    # And every epoch and batch is logged once
    epochs = steps(store, run_id, "loss")
    assert epochs == list(range(len(epochs)))
    batches = steps(store, run_id, "batch_loss")
    assert batches == sorted(set(batches))


def test_a_resume_on_changed_data_is_refused_naming_both_digests(tmp_path, folder, store):
    # Given a run left KILLED after its first epoch on a copy of the folder
    data = shutil.copytree(folder, tmp_path / "data")
    run_id = _finished_run(store, tmp_path, f"dataset.root={data}", "epochs=1", KEEP)
    client = MlflowClient(store)
    client.set_terminated(run_id, "KILLED")
    digests = {
        {t.key: t.value for t in item.tags}["mlflow.data.context"]: item.dataset.digest
        for item in client.get_run(run_id).inputs.dataset_inputs
    }

    # When one of its training images changes before the resume
    other = make_image_folder(tmp_path / "other", train_per_class=1, test_per_class=0, seed=9)
    changed = next((data / "train").rglob("*.jpg"))
    shutil.copy(next((other / "train" / changed.parent.name).glob("*.jpg")), changed)
    code, stderr, _ = run(f"resume={run_id}", "epochs=2", cwd=tmp_path)

    # Then it is refused in one line naming the run's digest and the new one
    assert code == 2, stderr[-2000:]
    last = _last_line(stderr)
    assert f"run {run_id}" in last and f"train was {digests['train']}, now " in last
    assert "Traceback" not in stderr
    # And the run is as it was: KILLED, one epoch, no resume recorded
    after = client.get_run(run_id)
    assert after.info.status == "KILLED"
    assert steps(store, run_id, "loss") == [0]
    assert "resumed_after_epoch" not in after.data.tags


def test_a_resume_whose_checkpoint_folder_is_gone_is_refused_naming_it(tmp_path, folder, store):
    # Given a run left FAILED after its first epoch, whose checkpoint folder was deleted
    run_id = _finished_run(store, tmp_path, f"dataset.root={folder}", "epochs=1", KEEP)
    client = MlflowClient(store)
    client.set_terminated(run_id, "FAILED")
    directory = client.get_run(run_id).data.tags["checkpoint_dir"]
    shutil.rmtree(directory)

    # When it is resumed
    code, stderr, _ = run(f"resume={run_id}", "epochs=2", cwd=tmp_path)

    # Then it is refused in one line naming the folder, and nothing was trained from scratch
    assert code == 2, stderr[-2000:]
    last = _last_line(stderr)
    assert directory in last and "after epoch 1 of 2" in last
    assert client.get_run(run_id).info.status == "FAILED"
    assert steps(store, run_id, "loss") == [0]


def test_a_run_killed_before_its_first_checkpoint_resumes_from_its_start(tmp_path, folder, store):
    # Given a run interrupted before its first epoch ended (it wrote no checkpoint), once it
    # had logged its config
    process = start(f"dataset.root={folder}", "epochs=40", cwd=tmp_path)
    wait_until(lambda: _logged_config(store), process=process)
    interrupt(process)
    code, stderr = finish(process, timeout=120)
    assert code == 130, stderr[-2000:]
    run_id = only_run(store).info.run_id
    if steps(store, run_id, "loss"):
        pytest.skip("the machine was fast: the run had finished an epoch before the signal")

    # When it is resumed to one epoch
    resumed = start(f"resume={run_id}", "epochs=1", cwd=tmp_path)
    stdout, stderr = resumed.communicate(timeout=300)

    # Then it trains from its start, saying so with epochs counted as Keras counts them
    assert resumed.returncode == 0, stderr[-2000:]
    assert f"resuming run {run_id} before its first epoch (of 1)" in stdout
    assert "epoch -1" not in stdout + stderr
    assert steps(store, run_id, "loss") == [0]


def _logged_config(uri: str) -> bool:
    """Whether the store's one run has logged its config (what a resume reads)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("insect_exp")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return bool(runs) and any(
        a.path == "config/overrides.json"
        for a in client.list_artifacts(runs[0].info.run_id, "config")
    )


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 3 MB tmpfs: room for one checkpoint of the tiny CNN (1.9 MB), not for two."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_checkpoint_disk_ends_the_run_failed_keeping_the_previous_one(
    tmp_path, folder, store, small_disk
):
    # Given a run whose output dir (its checkpoints) is on a disk with room for one checkpoint
    args = (f"dataset.root={folder}", "epochs=3", f"hydra.run.dir={small_disk}")

    # When its second checkpoint finds the disk full
    code, stderr, _ = run(*args, cwd=tmp_path)

    # Then it fails with one line naming the folder and the checkpoint it kept
    assert code == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    found = only_run(store)
    folder_of = Path(found.data.tags["checkpoint_dir"])
    assert folder_of.parent.parent == small_disk
    assert _last_line(stderr) == (
        f"insect_exp: error: cannot write the checkpoint of epoch 2 of 3 in {folder_of} "
        "(No space left on device); the run is FAILED, keeping its checkpoint after epoch 1 of 3"
    )
    # And the run is FAILED with that reason, and its first checkpoint is whole
    assert found.info.status == "FAILED"
    assert "cannot write the checkpoint of epoch 2 of 3" in found.data.tags["error"]
    assert steps(store, found.info.run_id, "loss") == [0, 1]
    assert sorted(p.name for p in folder_of.iterdir()) == ["best", "latest"]


def _signal_on(process: subprocess.Popen, text: str, signum: int) -> None:
    """Send `signum` as soon as a stdout line of `process` starts with `text`."""
    for line in process.stdout:
        if line.startswith(text) or f"] - {text}" in line:
            break
    else:
        pytest.fail(f"the run printed no line starting with {text!r}")
    if process.poll() is not None:
        pytest.skip("the process ended before the signal could be sent")
    process.send_signal(signum)


def test_a_signal_after_the_run_finished_says_so_and_offers_no_resume(tmp_path, folder, store):
    # Given a run that has ended FINISHED and logged its final scores
    process = start(f"dataset.root={folder}", "epochs=1", cwd=tmp_path)

    # When SIGTERM comes right after
    _signal_on(process, "val_accuracy", signal.SIGTERM)
    code, stderr = finish(process, timeout=120)

    # Then the line says the run had finished, with its id, offers no resume, and exits 0
    found = only_run(store)
    assert found.info.status == "FINISHED"
    assert "resume=" not in stderr and "KILLED" not in stderr
    if "interrupted" not in stderr and code in (0, -signal.SIGTERM):
        # On a busy machine the signal can land while the interpreter is tearing down, where no
        # Python handler runs any more: nothing is printed, which still says nothing false.
        pytest.skip("the signal came after the process's last Python step")
    assert _last_line(stderr) == (
        f"insect_exp: interrupted (SIGTERM) after run {found.info.run_id} had already finished: "
        "it is FINISHED in the store with everything it logged; nothing to resume (exit 0)"
    )
    assert "resume=" not in stderr and "KILLED" not in stderr
    assert code == 0


def test_a_signal_as_the_model_is_logged_gets_a_line_that_matches_the_store(
    tmp_path, folder, store
):
    # Given a run that has just logged its model, ending
    process = start(f"dataset.root={folder}", "epochs=1", "mlflow.log_model=true", cwd=tmp_path)

    # When SIGTERM comes then (before, during or after the run's end in the store)
    _signal_on(process, "model logged", signal.SIGTERM)
    code, stderr = finish(process, timeout=120)

    # Then what the line says is what the store holds
    found = only_run(store)
    run_id, last = found.info.run_id, _last_line(stderr)
    if found.info.status == "FINISHED":
        assert f"after run {run_id} had already finished" in last and code == 0
        assert "resume=" not in stderr
    else:
        assert found.info.status == "KILLED"
        assert f"run {run_id} is KILLED" in last and f"resume={run_id}" in last
        assert code == 143


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("dataset=insects", "dataset.root={tmp}/nowhere"), "is not a directory"),
        (("dataset=csv", "dataset.path={tmp}/none.csv"), "is not a file"),
        (
            ("dataset.root={tmp}", "model=hub_mobilenet", "model.load_timeout_s=5",
             "model.handle=http://127.0.0.1:9/feature_vector"),
            "cannot download TF Hub model",
        ),
    ],
    ids=["missing-root", "missing-csv", "offline-handle"],
)  # fmt: skip
def test_a_missing_dataset_or_an_offline_handle_fails_before_a_run_opens(
    tmp_path, store, args, says
):
    # When a run starts on data or weights that are not there
    done = run_cli(*(a.format(tmp=tmp_path) for a in args), cwd=tmp_path)

    # Then it fails in one line, and the store holds no run for it
    assert done.returncode == 2, done.stderr[-2000:]
    assert says in _last_line(done.stderr) and "Traceback" not in done.stderr
    client = MlflowClient(store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments) == []
