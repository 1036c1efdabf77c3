"""What a run shows in MLflow: dataset stats, curves, predictions and a recipe's extra artifacts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient
from PIL import Image

from insect_exp import plots, report, tracking
from insect_exp.data.pipeline import Data, ImageSplit, load
from insect_exp.data.scan import scan
from tests.conftest import artifact_paths, make_image_folder

CLASSES = ["beetles", "cockroach", "dragonflies"]


def _split(n: int, seed: int = 0) -> ImageSplit:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int32) % 3
    return ImageSplit(
        images, labels, [f"/data/{CLASSES[y]}/img\t{i}.jpg" for i, y in enumerate(labels)]
    )


def _run(uri: str) -> tracking.Run:
    client = MlflowClient(uri)
    experiment_id = tracking.ensure_experiment(uri, "insect_exp")
    return tracking.Run(client, client.create_run(experiment_id).info.run_id)


def _read(client: MlflowClient, run: tracking.Run, path: str, tmp_path: Path) -> str:
    return Path(client.download_artifacts(run.run_id, path, str(tmp_path))).read_text()


def test_dataset_report_has_stats_class_names_a_valid_skip_list_and_sample_grids(
    tracking_uri, tmp_path
):
    # Given decoded splits and two skipped files, one with a newline in its name
    skipped = [("/data/beetles/bad\nname.jpg", "not an image"), ("/data/x.jpg", "truncated")]
    test = _split(6, seed=1)
    data = Data(CLASSES, _split(9), test, test, skipped)
    run = _run(tracking_uri)

    # When the dataset is reported
    report.log_data(run, data, seed=0)

    # Then MLflow holds the stats, the class names, the skip count and list, and both grids
    client = MlflowClient(tracking_uri)
    logged = client.get_run(run.run_id)
    assert logged.data.metrics["skipped_files"] == 2
    assert logged.data.params["data.num_train"] == "9"
    stats = json.loads(_read(client, run, "dataset/stats.json", tmp_path))
    assert stats["images_per_class"]["train"] == {c: 3 for c in CLASSES}
    assert json.loads(_read(client, run, "class_names.json", tmp_path)) == CLASSES
    rows = list(csv.reader(_read(client, run, "dataset/skipped.tsv", tmp_path).splitlines(True),
                           dialect="excel-tab"))  # fmt: skip
    assert rows == [["path", "reason"], *[list(s) for s in skipped]]
    assert {"plots/train_samples.png", "plots/test_samples.png"} <= artifact_paths(
        client, run.run_id
    )


def test_training_report_draws_what_the_run_holds_and_where_early_stopping_stopped(
    tracking_uri, monkeypatch
):
    # Given a run that holds two epochs of metrics, with a batch loss above 2, and a history that
    # early stopping cut short
    run = _run(tracking_uri)
    for step, (loss, acc) in enumerate([(2.37, 0.25), (1.2, 0.5), (0.9, 0.5), (0.7, 0.75)]):
        run.sink({"batch_loss": loss, "batch_accuracy": acc}, step)
    run.sink({"loss": 1.0, "val_loss": 1.1, "accuracy": 0.4, "val_accuracy": 0.3}, 0)
    run.sink({"loss": 0.8, "val_loss": 1.2, "accuracy": 0.5, "val_accuracy": 0.3}, 1)
    drawn = {}
    curve = plots.batch_curve

    def recording(values, ylabel, ylim=None, title=""):
        drawn[ylabel] = (list(values), ylim, title)
        return curve(values, ylabel, ylim, title)

    monkeypatch.setattr(plots, "batch_curve", recording)

    # When training is reported
    report.log_training(run, best_epoch=0, stopped_epoch=1)

    # Then the per-step curves show every stored step, titled, with the loss axis reaching 2.37
    values, ylim, title = drawn["Loss"]
    assert values == [2.37, 1.2, 0.9, 0.7] and ylim[1] >= 2.37 and title
    assert drawn["Accuracy"][0] == [0.25, 0.5, 0.5, 0.75]
    # And the stop and best epochs are metrics, with the three plots as artifacts
    client = MlflowClient(tracking_uri)
    metrics = client.get_run(run.run_id).data.metrics
    assert (metrics["stopped_epoch"], metrics["best_epoch"]) == (1, 0)
    assert {"plots/training_curves.png", "plots/batch_loss.png", "plots/batch_accuracy.png"} <= (
        artifact_paths(client, run.run_id)
    )


def test_prediction_report_lists_every_image_and_counts_the_confusion_matrix(
    tracking_uri, tmp_path
):
    # Given six test images and logits that get two of them wrong
    split = _split(6)
    predicted = split.labels.copy()
    predicted[[0, 4]] = (predicted[[0, 4]] + 1) % 3
    logits = np.eye(3, dtype=np.float32)[predicted]
    run = _run(tracking_uri)

    # When the predictions are reported
    report.log_predictions(run, split, logits, CLASSES, seed=0)

    # Then predictions.tsv has one valid row per image, tabs in names included
    client = MlflowClient(tracking_uri)
    text = _read(client, run, "predictions.tsv", tmp_path)
    rows = list(csv.reader(text.splitlines(True), dialect="excel-tab"))
    assert rows[0] == ["path", "true", "predicted"]
    assert [r[0] for r in rows[1:]] == split.paths
    assert [r[2] for r in rows[1:]] == [CLASSES[p] for p in predicted]
    # And the confusion matrix counts the four right answers on its diagonal
    matrix = json.loads(_read(client, run, "confusion_matrix.json", tmp_path))["matrix"]
    assert np.trace(matrix) == 4 and np.sum(matrix) == 6
    assert "plots/confusion_matrix.png" in artifact_paths(client, run.run_id)


def test_a_recipes_extra_artifacts_are_logged_by_kind(tracking_uri, tmp_path):
    figure = Figure()
    figure.add_subplot().plot([0, 1])
    run = _run(tracking_uri)

    report.log_artifacts(
        run,
        {
            "plots/extra.png": figure,
            "notes.txt": "hello",
            "table.tsv": (["path", "label"], [("a\tb.jpg", "ant")]),
        },
    )

    client = MlflowClient(tracking_uri)
    assert {"plots/extra.png", "notes.txt", "table.tsv"} <= artifact_paths(client, run.run_id)
    assert _read(client, run, "notes.txt", tmp_path) == "hello"
    table = list(csv.reader(_read(client, run, "table.tsv", tmp_path).splitlines(True),
                            dialect="excel-tab"))  # fmt: skip
    assert table == [["path", "label"], ["a\tb.jpg", "ant"]]


def _inputs(client: MlflowClient, run: tracking.Run) -> dict[str, object]:
    """The run's dataset inputs by their context (train, val, test)."""
    inputs = client.get_run(run.run_id).inputs.dataset_inputs
    return {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i for i in inputs}


def test_splits_are_logged_as_dataset_inputs_whose_digest_follows_the_files(tracking_uri, tmp_path):
    # Given two runs on the same folder, and a third after one test image changed
    root = make_image_folder(tmp_path / "insects", train_per_class=4, test_per_class=2)
    client = MlflowClient(tracking_uri)
    runs = []
    for edit in (False, False, True):
        if edit:
            pixels = np.full((20, 24, 3), 5, np.uint8)
            Image.fromarray(pixels).save(root / "test" / "beetles" / "beetles_0.jpg")
        data = load(scan(root), (8, 8), val_split=0.25, seed=0)
        runs.append(_run(tracking_uri))
        report.log_data(runs[-1], data, seed=0)
    first, second, edited = (_inputs(client, run) for run in runs)

    # Then each run has train, val and test inputs from the folder, with class counts; the same
    # files give the same digests, the edited test split another one (train and val keep theirs)
    assert set(first) == {"train", "val", "test"}
    dataset = first["train"].dataset
    assert json.loads(dataset.source) == {"uri": str(root)}
    assert dataset.source_type == "local" and dataset.name == "insects/train"
    assert json.loads(first["val"].dataset.profile) == {
        "num_images": 3,
        "class_counts": {"beetles": 1, "cockroach": 1, "dragonflies": 1},
    }
    digests = [{k: v.dataset.digest for k, v in inputs.items()} for inputs in (first, second)]
    assert digests[0] == digests[1]
    assert edited["test"].dataset.digest != first["test"].dataset.digest
    assert edited["train"].dataset.digest == first["train"].dataset.digest
    assert len(set(digests[0].values())) == 3
