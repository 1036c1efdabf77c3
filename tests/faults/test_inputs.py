"""Bounded inputs: images over the pixel limit and models over the memory are refused before they
are allocated; class names are never merged, split or broken across lines; a CSV's repeated,
overlapping and malformed rows are reported."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import make_flat_images, make_image_folder, pixel_bomb
from tests.faults.conftest import only_run, run
from tests.lifecycle import cli


def _table(uri: str, run_id: str, path: str) -> list[dict[str, str]]:
    """A TSV artifact of the run, as rows by column name."""
    local = MlflowClient(uri).download_artifacts(run_id, path)
    return list(csv.DictReader(io.StringIO(Path(local).read_text()), delimiter="\t"))


def _runs(uri: str) -> list:
    """Every run of the store's insect_exp experiment (none if it was never made)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("insect_exp")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def _one_line_error(code: int, stderr: str) -> str:
    """The last stderr line of a run refused as bad input: exit 2, no traceback."""
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("insect_exp: error: "), line
    return line


def test_a_pixel_bomb_in_the_training_folder_is_skipped_with_its_size(tmp_path, store):
    # Given a folder whose train split holds a 48 KB PNG of 20000x20000 pixels (1.2 GB as RGB)
    folder = make_image_folder(tmp_path / "insects")
    bomb = folder / "train" / "beetles" / "bomb.png"
    bomb.write_bytes(pixel_bomb())

    # When a run trains on it with the default dataset.max_image_pixels
    code, stderr, _ = run(f"dataset.root={folder}", "epochs=1", cwd=tmp_path)

    # Then the run finishes, and the bomb is a skipped file with its size as the reason
    assert code == 0, stderr[-3000:]
    found = only_run(store)
    assert found.info.status == "FINISHED"
    skipped = _table(store, found.info.run_id, "dataset/skipped.tsv")
    assert [(r["path"], r["reason"]) for r in skipped] == [
        (str(bomb), "too many pixels (20000x20000)")
    ]
    assert found.data.metrics["skipped_files"] == 1


def test_a_model_too_big_for_the_memory_is_refused_before_anything_is_allocated(tmp_path, store):
    folder = make_image_folder(tmp_path / "insects")

    # When the CNN is asked for 4000x4000 images (a dense layer of about 2 G parameters)
    began = time.monotonic()
    code, stderr, _ = run(f"dataset.root={folder}", "model.image_size=[4000,4000]", cwd=tmp_path)

    # Then it stops at once with one line naming the size and the key to change
    line = _one_line_error(code, stderr)
    assert "model.image_size=[4000, 4000] needs at least" in line, line
    assert " GB to train (2,048,023,970 parameters" in line, line
    assert "lower model.image_size" in line, line
    assert time.monotonic() - began < 120  # generous: it must not start training
    # And no run was opened for it
    assert _runs(store) == []


@pytest.mark.parametrize(
    ("size", "filters", "dense"), [((180, 180), (16, 32, 64), 128), ((37, 50), (8, 4), 16)]
)
def test_the_memory_estimate_counts_the_parameters_keras_builds(size, filters, dense):
    from insect_exp.config import CNNConfig
    from insect_exp.models.cnn import build_cnn
    from insect_exp.models.memory import training_bytes

    cfg = CNNConfig(image_size=list(size), filters=list(filters), dense_units=dense)
    params, _ = training_bytes(cfg, batch_size=8, num_classes=5)
    assert params == build_cnn(size, 5, filters, dense).count_params()


def test_classes_that_make_the_same_metric_key_keep_their_own_metrics(tmp_path, store):
    # Given a model trained on classes whose names differ only in characters MLflow refuses
    classes = ("x,y", "x;y", "z")
    folder = make_image_folder(tmp_path / "odd", classes=classes)
    code, stderr, _ = run(f"dataset.root={folder}", "mlflow.log_model=true", cwd=tmp_path)
    assert code == 0, stderr[-3000:]
    source = only_run(store).info.run_id

    # When it is evaluated on their test split
    done = cli(
        "insect_exp.evaluate", f"model_uri=runs:/{source}/model", "dataset=insects",
        f"dataset.root={folder}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    # Then each class has its own metrics, and per_class.tsv says which key is whose
    (evaluation,) = [r for r in _runs(store) if r.info.run_id != source]
    metrics = evaluation.data.metrics
    assert {"f1_x_y", "f1_x_y_2", "f1_z"} <= set(metrics)
    table = _table(store, evaluation.info.run_id, "per_class.tsv")
    assert [(r["class"], r["metric_key"]) for r in table] == [
        ("x,y", "x_y"), ("x;y", "x_y_2"), ("z", "z"),
    ]  # fmt: skip
    for r in table:
        assert metrics[f"f1_{r['metric_key']}"] == pytest.approx(float(r["f1"]))


def test_a_class_name_with_a_control_character_is_refused_at_the_scan(tmp_path, store):
    # Given a class folder whose name holds a newline (labels.txt would have a line too many)
    folder = make_image_folder(tmp_path / "insects", classes=("bee\ntles", "cockroach"))

    # When a run scans it
    code, stderr, _ = run(f"dataset.root={folder}", cwd=tmp_path)

    # Then it stops with one line naming the class, and nothing is trained
    line = _one_line_error(code, stderr)
    assert "class name 'bee\\ntles'" in line and "control character (U+000A)" in line, line
    assert [r.info.status for r in _runs(store)] in ([], ["FAILED"])
    assert "loss" not in "".join(str(r.data.metrics) for r in _runs(store))


def _flat_images(tmp_path: Path) -> list[Path]:
    """The tiny folder's images (2 test a class), moved into one flat folder."""
    return make_flat_images(tmp_path, test_per_class=2)


def _csv_rows(images: list[Path]) -> list[str]:
    rows = ["path,label,split"]
    for path in images:
        split, name = path.name.split("-", 1)
        rows.append(f"images/{path.name},{name.rsplit('_', 1)[0]},{split}")
    return rows


def test_a_csv_reports_repeated_overlapping_malformed_and_oversized_rows(tmp_path, store):
    # Given a CSV listing a file twice, a file in train and in test, a row of four columns, and
    # an image of more pixels than dataset.max_image_pixels allows
    images = _flat_images(tmp_path)
    data = tmp_path / "data"
    Image.new("RGB", (40, 30), (200, 0, 0)).save(data / "images" / "big.png")
    rows = _csv_rows(images)
    line_of = {row.split(",")[0]: n for n, row in enumerate(rows, start=1)}
    rows += [
        "images/train-beetles_0.jpg,beetles,train",  # the same row again
        "images/train-beetles_1.jpg,cockroach,train",  # the same file, another label
        "images/test-cockroach_0.jpg,cockroach,train",  # a test image listed for training too
        "images/train-dragonflies_0.jpg,dragonflies,train,extra",
        "images/big.png,beetles,train",
    ]
    (data / "labels.csv").write_text("\n".join(rows) + "\n")

    # When a run trains on it
    code, stderr, _ = run(
        "dataset=csv", f"dataset.path={data / 'labels.csv'}", "dataset.max_image_pixels=1000",
        cwd=tmp_path,
    )  # fmt: skip

    # Then it trains on the rest, and every such row is in dataset/skipped.tsv with its reason
    assert code == 0, stderr[-3000:]
    found = only_run(store)
    skipped = {(r["path"], r["reason"]) for r in _table(store, found.info.run_id,
                                                         "dataset/skipped.tsv")}  # fmt: skip
    first, second = (f"images/train-beetles_{i}.jpg" for i in (0, 1))
    assert skipped == {
        (str(data / first), f"duplicate of line {line_of[first]}"),
        (str(data / second), f"labelled beetles at line {line_of[second]}"),
        (str(data / "images" / "test-cockroach_0.jpg"), "also in test"),
        (f"{data / 'labels.csv'}:{len(rows) - 1}", "malformed row"),
        (str(data / "images" / "big.png"), "too many pixels (40x30)"),
    }
    assert found.data.params["data.num_train"] == "12"


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (("cockroach", "Cockroach"), "labels 'Cockroach' and 'cockroach' differ only in case"),
        (("beetles", '"bee\ntles"'), "class name 'bee\\ntles'"),
    ],
)
def test_csv_labels_that_cannot_be_class_names_stop_the_run_with_one_line(
    tmp_path, store, labels, message
):
    # Given a CSV whose train labels include two spellings of one class, or a newline
    images = _flat_images(tmp_path)
    rows = _csv_rows(images)
    rows += [f"images/{images[0].name},{label}" for label in labels]
    csv_file = tmp_path / "data" / "labels.csv"
    csv_file.write_text("\n".join(rows) + "\n")

    # When a run scans it
    code, stderr, _ = run("dataset=csv", f"dataset.path={csv_file}", cwd=tmp_path)

    # Then it stops with one line naming them
    line = _one_line_error(code, stderr)
    assert message in line, line
