"""MLflow behind one module: where runs go, how they end, what they hold, by run id."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from insect_exp import tracking


def _open(uri: str, name: str) -> tracking.Run:
    client = MlflowClient(uri)
    experiment_id = tracking.ensure_experiment(uri, "insect_exp")
    return tracking.Run(client, client.create_run(experiment_id, run_name=name).info.run_id)


def test_config_uri_wins_over_the_environment_which_wins_over_mlruns(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = tracking.resolve_tracking_uri(None, tmp_path)
    assert default == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert (tmp_path / "mlruns").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert tracking.resolve_tracking_uri(None, tmp_path) == "http://server:5000"
    assert tracking.resolve_tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"


def test_two_runs_in_one_process_write_only_to_their_own_run(tracking_uri):
    # Given two runs open at the same time in one process
    first, second = _open(tracking_uri, "first"), _open(tracking_uri, "second")

    # When each logs params, metrics and text
    first.log_params({"who": "first"})
    second.log_params({"who": "second"})
    first.log_metrics({"loss": 1.0}, step=0)
    second.log_metrics({"loss": 2.0}, step=0)
    second.log_text("second's", "note.txt")

    # Then nothing crosses over
    client = MlflowClient(tracking_uri)
    a, b = client.get_run(first.run_id), client.get_run(second.run_id)
    assert (a.data.params, b.data.params) == ({"who": "first"}, {"who": "second"})
    assert (a.data.metrics["loss"], b.data.metrics["loss"]) == (1.0, 2.0)
    assert [f.path for f in client.list_artifacts(first.run_id)] == []
    assert [f.path for f in client.list_artifacts(second.run_id)] == ["note.txt"]


def test_an_in_process_run_runs_submitted_work_on_itself_and_says_what_it_reopened(tracking_uri):
    # Given a run reopened by id, as a resume reopens it
    first = _open(tracking_uri, "reopened")
    first.set_tags({"checkpoint_dir": "/checkpoints/x"})
    run = tracking.reopen_run(tracking_uri, first.run_id)

    def note(on: tracking.Run, text: str) -> str:
        on.log_text(text, "note.txt")
        return on.run_id

    # When work is submitted to it, as training submits report.py's to its logging process
    done = run.submit(note, "hello")
    failed = run.submit(lambda on: 1 / 0)

    # Then the work ran on this run, and an error comes back in its Future
    assert done.result() == first.run_id
    assert [f.path for f in MlflowClient(tracking_uri).list_artifacts(first.run_id)] == ["note.txt"]
    with pytest.raises(ZeroDivisionError):
        failed.result()
    # And the run says what it is, as the store holds it
    opened = run.opened()
    assert (opened.run_id, opened.run_name, opened.tracking_uri) == (
        first.run_id, "reopened", tracking_uri,
    )  # fmt: skip
    assert opened.tags["checkpoint_dir"] == "/checkpoints/x"


def test_more_params_than_one_mlflow_batch_holds_are_all_logged(tracking_uri):
    run = _open(tracking_uri, "many")
    run.log_params({f"p{i}": i for i in range(250)})
    assert len(MlflowClient(tracking_uri).get_run(run.run_id).data.params) == 250


def test_a_run_ends_finished_failed_with_its_error_or_killed_on_ctrl_c(tracking_uri):
    client = MlflowClient(tracking_uri)
    with tracking.start_run(tracking_uri, "insect_exp", "ok") as ok:
        ok.log_metrics({"loss": 0.5})
    with pytest.raises(ValueError), tracking.start_run(tracking_uri, "insect_exp", "bad") as bad:
        bad.log_metrics({"loss": 0.7})
        raise ValueError("the data went away")
    with (
        pytest.raises(KeyboardInterrupt),
        tracking.start_run(tracking_uri, "insect_exp", "stopped") as stopped,
    ):
        raise KeyboardInterrupt

    assert client.get_run(ok.run_id).info.status == "FINISHED"
    failed = client.get_run(bad.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"] == "ValueError: the data went away"
    assert failed.data.metrics["loss"] == 0.7  # what was logged before the error stays
    assert "error.txt" in [f.path for f in client.list_artifacts(bad.run_id)]
    assert client.get_run(stopped.run_id).info.status == "KILLED"


def test_runs_carry_mlflows_own_source_tags_and_the_package_versions(tracking_uri):
    with tracking.start_run(
        tracking_uri, "insect_exp", "tagged", tracking.environment_tags()
    ) as run:
        pass
    tags = MlflowClient(tracking_uri).get_run(run.run_id).data.tags
    assert "mlflow.user" in tags and "mlflow.source.name" in tags
    assert tags["version.tensorflow"].startswith("2.")
    # The package's own commit has its own key and never stands in for MLflow's
    package_dir = Path(tracking.__file__).resolve().parent
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=package_dir, capture_output=True, text=True
    )
    if head.returncode == 0:
        assert tags["insect_exp.git_commit"] == head.stdout.strip()


def test_launched_from_another_repository_the_run_does_not_take_its_commit(tmp_path):
    # Given a launch directory that is some other git repository
    other = tmp_path / "other_repo"
    other.mkdir()
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    subprocess.run(
        ["git", "-C", str(other), "-c", "user.name=x", "-c", "user.email=x@x", "commit",
         "--allow-empty", "-qm", "other"],
        check=True,
    )  # fmt: skip
    other_head = subprocess.run(
        ["git", "-C", str(other), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()

    # When the package's tags are computed from there
    code = "from insect_exp import tracking; print(tracking.environment_tags())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=other, capture_output=True, text=True, timeout=60
    )

    # Then no tag carries the other repository's commit
    assert out.returncode == 0, out.stderr
    assert other_head not in out.stdout


class _SlowStore:
    """A client whose writes take a moment, as a store's do: the other thread runs meanwhile."""

    def __init__(self):
        self.sent: list[tuple[str, int]] = []
        self.writing = 0
        self.overlapped = False

    def get_run(self, run_id):
        return SimpleNamespace(info=SimpleNamespace(experiment_id="0"))

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.writing += 1
        self.overlapped |= self.writing > 1
        time.sleep(0.002)
        self.sent += [(m.key, m.step) for m in metrics]
        self.writing -= 1


def test_metrics_logged_from_two_threads_at_once_are_sent_once_each_one_write_at_a_time():
    # Given one run, and two threads logging to it at once (train.py draws its plots, which log
    # metrics, in a background thread while the main thread logs the test scores)
    store = _SlowStore()
    run = tracking.Run(store, "run")

    def log(key: str) -> None:
        for step in range(40):
            run.log_metrics({key: float(step)}, step=step)

    threads = [threading.Thread(target=log, args=(key,)) for key in ("main", "background")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Then every value was sent exactly once, and the store never saw two writes at a time
    expected = [(key, step) for key in ("background", "main") for step in range(40)]
    assert sorted(store.sent) == expected
    assert not store.overlapped


# Logs a model with pinned requirements in a fresh process; prints the logged requirements.
_LOG_MODEL = """
import json, sys
from importlib import metadata
from pathlib import Path
import mlflow
from insect_exp import tracking

uri, folder = sys.argv[1], Path(sys.argv[2])
(folder / "labels.txt").write_text("a\\nb\\n")
with tracking.start_run(uri, "models", "pinned") as run:
    pins = ["pillow==" + metadata.version("pillow")]
    model = run.log_tf_model({"labels": folder / "labels.txt"}, pins)
local = mlflow.artifacts.download_artifacts(model, dst_path=str(folder / "model"), tracking_uri=uri)
print(json.dumps((Path(local) / "requirements.txt").read_text().split()))
"""


def test_a_logged_model_holds_its_requirements_pinned_to_the_installed_versions(
    tracking_uri, tmp_path
):
    # Given a fresh process
    from importlib import metadata

    tracking.prepare_store(tracking_uri)

    # When it logs a model whose requirements are pinned to the installed versions
    done = subprocess.run(
        [sys.executable, "-c", _LOG_MODEL, tracking_uri, str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip

    # Then the model holds the pins and MLflow's own, which the installed packages satisfy: no
    # warning about mismatches
    assert done.returncode == 0, done.stderr[-3000:]
    requirements = json.loads(done.stdout.strip().splitlines()[-1])
    assert f"pillow=={metadata.version('pillow')}" in requirements
    assert f"mlflow=={metadata.version('mlflow')}" in requirements
    assert "mismatches" not in done.stderr


# One run logging a dataset input, started by the test and held until it says go.
_LOG_INPUT = """
import sys, time
from pathlib import Path
from mlflow.tracking import MlflowClient
from insect_exp import tracking
from insect_exp.tracking.lineage import SplitRecord

uri, go = sys.argv[1], Path(sys.argv[2])
client = MlflowClient(uri)
run = tracking.Run(client, client.create_run(tracking.ensure_experiment(uri, "race")).info.run_id)
records = [SplitRecord(c, f"insects-{c}", "/data", "abc123", {"n": 1}) for c in ("train", "test")]
print("ready", flush=True)
while not go.exists() or not go.read_text():
    time.sleep(0.001)
at = float(go.read_text())
while time.time() < at:  # all start within a millisecond or so
    pass
run.log_inputs(records)
print(run.run_id)
"""


def test_runs_started_together_on_the_same_new_data_all_log_it_as_an_input(tracking_uri, tmp_path):
    # Given four runs about to log the same dataset, new to the store, at the same moment (a
    # sweep's jobs): MLflow reads "not there", then inserts, so three of them used to hit the
    # unique constraint and go offline
    tracking.prepare_store(tracking_uri)
    go = tmp_path / "go"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _LOG_INPUT, tracking_uri, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for process in runs:
        assert process.stdout.readline().strip() == "ready", process.stderr.read()[-2000:]

    # When they all log it at once
    go.write_text(str(time.time() + 0.3))
    results = [p.communicate(timeout=120) for p in runs]

    # Then every run holds both inputs, all pointing at one dataset per split
    assert [p.returncode for p in runs] == [0] * 4, [e[-1500:] for _, e in results]
    client = MlflowClient(tracking_uri)
    digests = set()
    for out, _ in results:
        inputs = client.get_run(out.strip()).inputs.dataset_inputs
        assert sorted(i.dataset.name for i in inputs) == ["insects-test", "insects-train"]
        digests |= {(i.dataset.name, i.dataset.digest) for i in inputs}
    assert len(digests) == 2


def test_tsv_tables_stay_valid_for_any_file_name():
    # Given file names with a tab, a newline and quotes in them
    names = ["plain.jpg", "tab\there.jpg", "new\nline.jpg", 'quote"d.jpg']
    rows = [(name, "beetles", "cockroach") for name in names]

    # When they are written as a TSV table and read back with a standard reader
    text = tracking.to_tsv(["path", "true", "predicted"], rows)
    back = list(csv.reader(io.StringIO(text), dialect="excel-tab"))

    # Then every row has its three fields and the names come back unchanged
    assert back[0] == ["path", "true", "predicted"]
    assert [tuple(r) for r in back[1:]] == rows


def test_run_names_leave_out_model_optimizer_and_hydra_overrides():
    name = tracking.run_name("cnn", "sgd", ["model=cnn", "epochs=3", "hydra.verbose=true"])
    assert name == "cnn-sgd epochs=3"
