"""The Python API through its public names: `insect_exp.train`, `.sweep`, `.predict`, `.evaluate`.

Each test trains tiny runs (a 3-class folder of 6+3 images, 32x32, one epoch) from a temp dir,
so that mlruns/ and outputs/ land there as they do for a user who launched from it.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import insect_exp
from tests.conftest import artifact_paths, make_image_folder, run_cli
from tests.sweeps import TINY

# What both launches are given, besides dataset.root.
GIVEN = (*TINY, "seed=7")


@pytest.fixture
def launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A launch dir with a tiny image folder at launch/insects; the test runs from it."""
    make_image_folder(tmp_path / "insects")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("INSECT_EXP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def _store(launch: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{launch / 'mlruns' / 'mlflow.db'}")


def _runs(launch: Path) -> list:
    """Every run of the launch dir's default store (none if there is no store)."""
    if not (launch / "mlruns" / "mlflow.db").is_file():
        return []
    client = _store(launch)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_bad_value_raises_the_clis_message_before_tensorflow_and_any_run(launch: Path) -> None:
    # Given a value out of range, given to the command line and to insect_exp.train in a fresh
    # process
    cli = run_cli("epochs=0", cwd=launch)
    code = (
        "import sys, insect_exp\n"
        "try:\n"
        "    insect_exp.train(epochs=0)\n"
        "except insect_exp.UserError as err:\n"
        "    print(type(err).__name__, '|', err, '|', 'tensorflow' in sys.modules)\n"
    )
    # When the API call fails
    api = subprocess.run(
        [sys.executable, "-c", code], cwd=launch, capture_output=True, text=True, timeout=300
    )
    # Then it raises the package's ConfigError with the command line's line, before TensorFlow
    # loaded and before any run opened
    message = "epochs=0 is out of range: must be >= 1"
    assert cli.returncode == 2 and cli.stderr.strip() == f"insect_exp: error: {message}"
    assert api.stdout.strip() == f"ConfigError | {message} | False", api.stderr[-2000:]
    assert _runs(launch) == []


def test_unknown_key_raises_config_error_with_hydras_message(launch: Path) -> None:
    # Given a key the config does not have; when it is trained
    with pytest.raises(insect_exp.UserError) as raised:
        insect_exp.train("epoch=1")
    # Then Hydra's message is the error's, and no run opened
    assert "Could not override 'epoch'" in str(raised.value)
    assert _runs(launch) == []


def test_train_returns_the_run_and_keeps_the_command_lines_record(launch: Path) -> None:
    # Given one tiny config, trained by the command line and by insect_exp.train from the same
    # launch dir (the default store: mlruns/ under it)
    folder = f"dataset.root={launch / 'insects'}"
    cli = run_cli(*GIVEN, folder, cwd=launch)
    assert cli.returncode == 0, cli.stderr[-3000:]
    result = insect_exp.train(*GIVEN, folder)
    # Then the API's result is its run, FINISHED, with one history row per epoch
    client = _store(launch)
    (other,) = [r for r in _runs(launch) if r.info.run_id != result.run_id]
    mine = client.get_run(result.run_id)
    assert result.status == "FINISHED" and result.model_uri is None
    assert list(result.history.index) == [0]
    assert result.history["val_accuracy"].iloc[-1] == result.metrics["val_accuracy"]
    assert Path(result.output_dir, ".hydra", "config.yaml").is_file()
    # And its record is the command line's: the same params (every value; the dataset root is the
    # same folder), tag keys, metric keys and artifact paths
    assert mine.data.params == other.data.params
    assert set(mine.data.tags) == set(other.data.tags)
    assert set(mine.data.metrics) == set(other.data.metrics)
    assert artifact_paths(client, result.run_id) == artifact_paths(client, other.info.run_id)


def test_two_calls_in_one_process_do_not_leak_state(launch: Path) -> None:
    # Given a deterministic tiny config; the first call trains with a mixed-precision policy
    folder = f"dataset.root={launch / 'insects'}"
    first = insect_exp.train(*GIVEN, folder, deterministic=True)
    graphs = _live_graphs()
    mixed = insect_exp.train(*GIVEN, folder, precision="mixed_bfloat16")
    # When the same config as the first trains again in the same process
    again = insect_exp.train(*GIVEN, folder, deterministic=True)
    # Then no call's traced graphs outlive it (TensorFlow's global gradient registry held them
    # when the optimizer's gradient aggregation was a custom gradient)
    assert _live_graphs() == graphs
    # And every run FINISHED, the repeat scores as the first, and Keras's policy is back
    import tf_keras as keras

    assert [r.status for r in (first, mixed, again)] == ["FINISHED"] * 3
    assert again.metrics["val_accuracy"] == first.metrics["val_accuracy"]
    assert again.metrics["val_loss"] == pytest.approx(first.metrics["val_loss"], rel=1e-6)
    assert keras.mixed_precision.global_policy().name == "float32"


def _live_graphs() -> int:
    """TensorFlow graphs (a traced function's among them) alive after a full collection."""
    import gc

    import tensorflow as tf

    gc.collect()
    return sum(isinstance(o, tf.Graph) for o in gc.get_objects())


def test_predict_and_evaluate_give_the_commands_results(launch: Path) -> None:
    # Given a run that logged its model
    folder = launch / "insects"
    result = insect_exp.train(*GIVEN, f"dataset.root={folder}", mlflow__log_model=True)
    files = sorted(str(p) for p in (folder / "test").rglob("*.jpg"))
    # When it predicts from Python and from the command line
    frame = result.predict(files)
    out = launch / "labels.csv"
    cli = subprocess.run(
        [sys.executable, "-m", "insect_exp.predict", f"model_uri={result.model_uri}"]
        + [f"inputs={folder / 'test'}", f"output={out}"],
        cwd=launch,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    # Then the labels and probabilities are the command's
    with out.open() as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["path"])
    assert list(frame["path"]) == [row["path"] for row in rows]
    assert list(frame["label"]) == [row["label"] for row in rows]
    assert list(frame["probability"]) == pytest.approx([float(r["probability"]) for r in rows])
    # And evaluating it on the folder logs an evaluation run that names the model's run
    evaluation = insect_exp.evaluate(result.model_uri, folder)
    run = _store(launch).get_run(evaluation.run_id)
    assert run.data.tags["source_run_id"] == result.run_id
    assert evaluation.accuracy == run.data.metrics["test_accuracy"]


def test_sweep_runs_in_the_process_and_keeps_the_command_lines_record(launch: Path) -> None:
    # Given a grid of two optimizers, swept by the command line (-m) and from Python
    folder = f"dataset.root={launch / 'insects'}"
    cli = run_cli("-m", "optimizer=adam,sgd", *GIVEN, folder, cwd=launch)
    assert cli.returncode == 0, cli.stderr[-3000:]
    swept = insect_exp.sweep({"optimizer": ["adam", "sgd"]}, *GIVEN, folder)
    # Then the jobs trained in this process (TensorFlow is loaded here), FINISHED, in job order
    assert "tensorflow" in sys.modules
    assert [c.status for c in swept.children] == ["FINISHED", "FINISHED"]
    client = _store(launch)
    parent = client.get_run(swept.parent_run_id)
    parents = [r for r in _runs(launch) if "sweep.dir" in r.data.tags]
    (other,) = [r for r in parents if r.info.run_id != swept.parent_run_id]
    # And the parent's record is the command line's: params, tag keys, summary, status
    assert parent.data.params == other.data.params
    assert set(parent.data.tags) == set(other.data.tags)
    assert parent.data.metrics.keys() == other.data.metrics.keys()
    assert parent.data.metrics["jobs_finished"] == 2 and parent.info.status == "FINISHED"
    assert artifact_paths(client, parent.info.run_id) == artifact_paths(client, other.info.run_id)
    # And so are its children's, job by job: params, tags (the parent's id among them)
    theirs = _children(launch, other.info.run_id)
    mine = _children(launch, swept.parent_run_id)
    assert [c.info.run_id for c in mine] == [c.run_id for c in swept.children]
    assert len(mine) == len(theirs) == 2
    for child, twin in zip(mine, theirs, strict=True):
        assert child.data.params == twin.data.params
        assert set(child.data.tags) == set(twin.data.tags)
        assert child.data.tags["mlflow.parentRunId"] == swept.parent_run_id
        for tag in ("sweep.job_num", "sweep.overrides", "insect_exp.group", "mlflow.runName"):
            assert child.data.tags[tag] == twin.data.tags[tag]
        assert artifact_paths(client, child.info.run_id) == artifact_paths(client, twin.info.run_id)


def _children(launch: Path, parent_run_id: str) -> list:
    """A sweep's child runs in the launch dir's store, in job order."""
    runs = [r for r in _runs(launch) if r.data.tags.get("mlflow.parentRunId") == parent_run_id]
    return sorted(runs, key=lambda r: int(r.data.tags["sweep.job_num"]))


def test_sweep_bad_value_raises_before_any_run(launch: Path) -> None:
    # Given a grid with a value out of range; when it is swept
    with pytest.raises(insect_exp.UserError, match="epochs=0 is out of range"):
        insect_exp.sweep({"epochs": [0, 1]})
    # Then nothing ran
    assert _runs(launch) == []


ROOT = Path(__file__).resolve().parents[1]


def _environment(launch: Path) -> dict[str, str]:
    """The test's environment without a tracking URI, the demo data cached under `launch`."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "INSECT_EXP_CACHE_DIR": str(launch / "cache")}


def test_the_python_api_pages_snippets_run_as_written(launch: Path) -> None:
    # Given the ```python blocks of docs/python-api.md, in order, with the user's image folder
    page = (ROOT / "docs" / "python-api.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", page, re.S | re.M)
    code = "\n".join(blocks).replace("<image folder>", str(launch / "insects"))
    assert "insect_exp.train(" in code and "insect_exp.sweep(" in code
    # When they run in one process from the launch dir
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=launch,
        env=_environment(launch),
        capture_output=True,
        text=True,
        timeout=900,
    )
    # Then they end well and print what the page says they print
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "epochs=0 is out of range: must be >= 1" in done.stdout
    assert len(_runs(launch)) == 1 + 1 + 3  # a run, an evaluation, a sweep's parent and 2 jobs


def test_the_example_notebook_runs_from_a_fresh_kernel(launch: Path) -> None:
    # Given examples/quickstart.ipynb as committed: no outputs
    import nbclient
    import nbformat

    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    # When a fresh kernel runs it from the launch dir
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": launch}}
    )
    client.execute(env=_environment(launch))
    # Then every cell ran, and its runs are in the launch dir's store
    outputs = [cell.outputs for cell in notebook.cells if cell.cell_type == "code"]
    assert all(outputs[i] for i in (1, 4)), outputs
    # And training showed tqdm's epochs bar (a widget with ipywidgets, else text), not Keras's
    shown = str(outputs[1])
    assert "widget-view" in shown or re.search(r"epochs: 100%\|.*\| 2/2", shown), shown[-3000:]
    assert "/step" not in shown, shown[-3000:]
    assert len(_runs(launch)) == 1 + 3


def test_config_dir_adds_a_team_config_as_the_command_lines_config_dir(launch: Path) -> None:
    # Given a team config dir with a preset of its own (out of range, so nothing trains)
    preset = launch / "team_conf" / "experiment" / "broken.yaml"
    preset.parent.mkdir(parents=True)
    preset.write_text("# @package _global_\nepochs: 0\n")
    # When it is composed through config_dir, and without it
    with pytest.raises(insect_exp.UserError, match="epochs=0 is out of range"):
        insect_exp.train("experiment=broken", config_dir=launch / "team_conf")
    with pytest.raises(insect_exp.UserError, match="Could not find 'experiment/broken'"):
        insect_exp.train("experiment=broken")
    # Then only the first found the preset; a missing dir is named
    with pytest.raises(insect_exp.UserError, match="no such folder"):
        insect_exp.train(config_dir=launch / "missing")
    assert _runs(launch) == []
