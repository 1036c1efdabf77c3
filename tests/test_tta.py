"""Test-time augmentation in predict and evaluate, on a four-class run trained with gradient
clipping that scores top-3 accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from insect_exp import predict, train, tta
from insect_exp.config import TTA
from insect_exp.serving import softmax
from tests.conftest import compose_config, make_image_folder
from tests.lifecycle import cli

FOUR = ("ants", "bees", "beetles", "wasps")


@pytest.fixture(scope="module")
def four_classes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """(temp dir, tracking URI, run id) of a 4-class CNN run with optimizer.clipnorm=1.0."""
    root = tmp_path_factory.mktemp("tta")
    folder = make_image_folder(root / "insects", classes=FOUR)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)  # removed again with what MLflow exports there
        cfg = compose_config(
            "dataset=insects", f"dataset.root={folder}", "epochs=2", "batch_size=4",
            "model.image_size=[32,32]", f"mlflow.tracking_uri={uri}", "optimizer.clipnorm=1.0",
            "dataset.val_split=0.25", launch_dir=root,
        )  # fmt: skip
        train.run(cfg)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("insect_exp").experiment_id])
    return root, uri, run.info.run_id


def test_a_run_with_clipnorm_trains_and_scores_top3_beyond_three_classes(four_classes):
    _, uri, run_id = four_classes
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer.clipnorm"] == "1.0"
    metrics = run.data.metrics
    for key in ("test_top3_accuracy", "val_top3_accuracy"):
        assert metrics[key] >= metrics[key.replace("top3_", "")]
    assert np.isfinite(metrics["loss"])


def test_evaluate_with_tta_flip_logs_the_augmented_scores_beside_the_plain_ones(four_classes):
    # Given a 4-class run's model
    root, uri, run_id = four_classes

    # When evaluate runs it on the test split with tta=flip
    done = cli(
        "insect_exp.evaluate", f"model_uri=runs:/{run_id}/model", "dataset=insects",
        f"dataset.root={root / 'insects'}", f"mlflow.tracking_uri={uri}", "tta=flip", cwd=root,
    )  # fmt: skip

    # Then it logs the plain scores, top-3 among them, and the same scores of the flipped views
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test_accuracy_tta" in done.stdout
    client = MlflowClient(uri)
    (tag,) = [k for k in client.get_run(run_id).data.tags if k.startswith("evaluation.")]
    metrics = client.get_run(tag.removeprefix("evaluation.")).data.metrics
    plain = {"test_loss", "test_accuracy", "test_top3_accuracy", "macro_f1"}
    assert plain | {f"{key}_tta" for key in plain} <= set(metrics)
    assert metrics["test_top3_accuracy"] == pytest.approx(
        client.get_run(run_id).data.metrics["test_top3_accuracy"]
    )


def test_predict_with_tta_equals_plain_prediction_on_mirror_symmetric_images(four_classes):
    # Given images that are their own mirror images, at the model's size (no resizing)
    root, uri, run_id = four_classes
    rng = np.random.default_rng(1)
    folder = root / "symmetric"
    folder.mkdir()
    for i in range(3):
        half = rng.integers(0, 255, (32, 16, 3), dtype=np.uint8)
        Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(folder / f"{i}.png")

    # When predict labels them with and without tta=flip
    with_tta = predict(f"runs:/{run_id}/model", folder, tracking_uri=uri, tta="flip")
    plain = predict(f"runs:/{run_id}/model", folder, tracking_uri=uri)

    # Then both give the same labels and probabilities
    assert len(plain) == 3
    assert with_tta["label"].tolist() == plain["label"].tolist()
    np.testing.assert_allclose(with_tta["probability"], plain["probability"], rtol=1e-5)


def test_tta_averages_the_probabilities_of_each_image_and_its_mirror_image():
    # Given a model that is not mirror-symmetric: its logits are the left column's pixels
    def logits(images: np.ndarray) -> np.ndarray:
        return np.asarray(images, np.float64)[:, 0, 0, :] / 50.0

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, 2, 3, 3))
    mirrored = images[:, :, ::-1, :]

    # Then none is plain prediction, and flip the mean of the image's and the mirror image's
    np.testing.assert_allclose(tta.probabilities(logits, images, TTA.none), softmax(logits(images)))
    expected = (softmax(logits(images)) + softmax(logits(mirrored))) / 2
    np.testing.assert_allclose(tta.probabilities(logits, images, TTA.flip), expected)
    assert not np.allclose(expected, softmax(logits(images)))
    # and a symmetric image is its own mirror image: flip changes nothing
    symmetric = np.concatenate([images[:, :, :1], images[:, :, 1:2], images[:, :, :1]], axis=2)
    np.testing.assert_allclose(
        tta.probabilities(logits, symmetric, TTA.flip), softmax(logits(symmetric))
    )
    np.testing.assert_allclose(softmax(tta.as_logits(expected)), expected)
