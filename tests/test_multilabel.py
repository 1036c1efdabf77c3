"""task=multilabel: label sets from a CSV, sigmoid outputs, F1, AP and per-class thresholds."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.special import logit

from insect_exp import UserError
from insect_exp.multilabel import scores
from tests.lifecycle import cli

SQUARES = {"red": (230, 20, 20), "blue": (20, 20, 230)}


def test_scores_match_hand_computed_f1_and_average_precision():
    # Given 4 images, 2 classes, and probabilities whose ranking and decisions are worked out:
    # class 0 true at images 0 and 2, ranked 0.9 (T) 0.6 (F) 0.4 (T) 0.3: AP = (1 + 2/3) / 2;
    # class 1 true at images 1 and 2, ranked 0.8 (T) 0.7 (T) 0.55 (F) 0.2: AP = 1.
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.uint8)
    probs = np.array([[0.9, 0.2], [0.6, 0.8], [0.4, 0.7], [0.3, 0.55]])

    # When they are scored at 0.5
    found = scores.scores(logit(probs), labels, threshold=0.5)
    aps = scores.average_precisions(labels, probs)

    # Then class 0: TP 1, FP 1, FN 1 (F1 1/2); class 1: TP 2, FP 1 (F1 4/5);
    # micro: TP 3, FP 2, FN 1 -> 6/9; macro (1/2 + 4/5) / 2; 5 of 8 decisions right
    assert aps == pytest.approx([5 / 6, 1.0])
    assert found["map"] == pytest.approx(11 / 12)
    assert found["micro_f1"] == pytest.approx(2 / 3)
    assert found["macro_f1"] == pytest.approx(0.65)
    assert found["accuracy"] == pytest.approx(5 / 8)
    expected_loss = -np.mean(labels * np.log(probs) + (1 - labels) * np.log(1 - probs))
    assert found["loss"] == pytest.approx(expected_loss)


def test_tuned_thresholds_maximise_each_classs_f1_on_fixed_scores():
    # Given a class whose F1 is best predicting from 0.3 up (P 3/4, R 1: 6/7), and a class with
    # no true image
    labels = np.array([[1, 0], [1, 0], [0, 0], [1, 0], [0, 0]], np.uint8)
    probs = np.array([[0.9, 0.1], [0.8, 0.6], [0.7, 0.2], [0.3, 0.9], [0.2, 0.4]])

    # When thresholds are tuned on them
    tuned = scores.tune_thresholds(labels, probs, default=0.5)

    # Then the first class's is 0.3, no other threshold does better, and the other keeps 0.5
    assert tuned == pytest.approx([0.3, 0.5])
    best = scores.f1(labels[:, :1], probs[:, :1], tuned[:1])["micro_f1"]
    assert best == pytest.approx(6 / 7)
    for t in np.linspace(0.01, 0.99, 99):
        assert scores.f1(labels[:, :1], probs[:, :1], t)["micro_f1"] <= best + 1e-12


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("dataset=demo", "use dataset=csv"),
        ("calibrate=temperature", "not with task=multilabel"),
        ("dataset.class_weight=balanced", "not with task=multilabel"),
        ("train.mixup_alpha=0.2", "not with task=multilabel"),
        ("train.ema.enabled=true", "not with task=multilabel"),
    ],
)
def test_settings_that_assume_one_label_are_refused_in_one_line(compose_cfg, override, says):
    csv_dataset = [] if override == "dataset=demo" else ["dataset=csv", "dataset.path=x.csv"]
    with pytest.raises(UserError, match=says):
        compose_cfg(*csv_dataset, "task=multilabel", override)


def _write_squares(folder: Path, count: int = 48, seed: int = 0) -> Path:
    """Grey noise images with a red and/or a blue square, listed as `red`, `blue` or `blue;red`
    in labels.csv (every 4th image in test), plus three bad rows."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    rows = [["path", "label", "split"]]
    for i in range(count):
        names = [["red"], ["blue"], ["blue", "red"]][i % 3]
        pixels = rng.integers(100, 150, (24, 24, 3), dtype=np.uint8)
        for name in names:
            y, x = rng.integers(0, 12, 2)
            pixels[y : y + 12, x : x + 12] = SQUARES[name]
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        rows.append([f"img{i}.png", ";".join(names), "test" if i % 4 == 3 else "train"])
    rows += [["img0.png", "red;;blue", "train"], ["img1.png", " ", "train"], ["nowhere.png", "red"]]
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    (folder / "labels.csv").write_text(out.getvalue())
    return folder / "labels.csv"


def test_multilabel_run_logs_its_scores_and_thresholds_and_predict_returns_label_sets(tmp_path):
    # Given a CSV of images holding a red square, a blue one or both, and malformed rows
    listing = _write_squares(tmp_path / "squares")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    # When a multi-label run trains on it for 4 epochs
    done = cli(
        "insect_exp", "dataset=csv", f"dataset.path={listing}", "dataset.val_split=0.25",
        "task=multilabel", "epochs=4", "batch_size=4", "model.image_size=[32,32]",
        f"mlflow.tracking_uri={uri}", cwd=tmp_path,
    )  # fmt: skip

    # Then it finishes having learnt the squares (predicting every label for every image scores
    # a micro F1 of 0.8 here, a random ranking an mAP near 2/3), with its thresholds and reports,
    # the bad rows reported
    assert done.returncode == 0, done.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("insect_exp").experiment_id])
    metrics = run.data.metrics
    for key in ("test_micro_f1", "test_macro_f1", "test_map", "test_micro_f1_tuned", "auc_pr"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["test_map"] >= 0.9 and metrics["test_micro_f1"] >= 0.85, metrics
    run_id = run.info.run_id
    saved = json.loads(Path(client.download_artifacts(run_id, "thresholds.json")).read_text())
    assert saved["threshold"] == 0.5 and set(saved["per_class"]) == {"blue", "red"}
    skipped = Path(client.download_artifacts(run_id, "dataset/skipped.tsv"))
    reasons = skipped.read_text()
    assert "empty class name in label (red;;blue)" in reasons and "empty label" in reasons
    assert "file not found" in reasons

    # And predict on the files gives each one its set of labels with their probabilities
    shown = cli(
        "insect_exp.predict", f"model_uri=runs:/{run_id}/model", f"inputs={listing.parent}",
        f"mlflow.tracking_uri={uri}", cwd=tmp_path,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-3000:]
    rows = list(csv.DictReader(io.StringIO(shown.stdout)))
    assert list(rows[0]) == ["path", "labels", "probabilities"] and len(rows) == 48
    for row in rows:
        labels = [x for x in row["labels"].split(";") if x]
        probabilities = [float(p) for p in row["probabilities"].split(";") if p]
        assert set(labels) <= {"blue", "red"} and len(labels) == len(probabilities)
        assert probabilities == sorted(probabilities, reverse=True)
        # At or above the class's threshold (the CSV rounds to 6 decimals)
        per_class = saved["per_class"]
        assert all(p >= per_class[n] - 1e-6 for n, p in zip(labels, probabilities, strict=True))

    # And evaluate, which scores one label per image, refuses the model in one line
    refused = cli(
        "insect_exp.evaluate", f"model_uri=runs:/{run_id}/model", "dataset=csv",
        f"dataset.path={listing}", f"mlflow.tracking_uri={uri}", cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 2 and "is a multi-label model" in refused.stderr
    assert "Traceback" not in refused.stderr
