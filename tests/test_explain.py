"""Where the model looks (Grad-CAM), what it gets most wrong (top losses): known answers, a run."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from mlflow.tracking import MlflowClient
from PIL import Image

from insect_exp import UserError
from insect_exp.explain import (
    ExplainSummary,
    OverlayWriter,
    log_summary,
    losses,
    right_and_wrong,
    top_losses,
)
from insect_exp.models.cnn import build_cnn
from insect_exp.models.gradcam import NoFeatureMap, features_and_logits, gradcam
from insect_exp.models.layers import ServingModule
from insect_exp.serving import ImageClassifier
from tests.conftest import artifact_paths, make_image_folder, run_cli
from tests.lifecycle import cli
from tests.models.conftest import export_tiny

SIZE, SIDE, MARGIN = 32, 12, 2  # a 12-pixel square covers 14% of a 32x32 image


def squares(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise images; class 0 (every other one) has a bright square at a random place.

    Returns the images (float32, 0..255), labels and each square's top left corner.
    """
    images = rng.integers(0, 100, (count, SIZE, SIZE, 3)).astype(np.float32)
    labels = np.arange(count) % 2
    corners = rng.integers(0, SIZE - SIDE, (count, 2))
    for image, label, (row, col) in zip(images, labels, corners, strict=True):
        if label == 0:
            image[row : row + SIDE, col : col + SIDE] = rng.integers(200, 256, (SIDE, SIDE, 3))
    return images, labels, corners


def _save(model: keras.Model, folder: Path) -> ImageClassifier:
    """The model exported as train exports it, loaded as predict loads it."""
    module = ServingModule(model, model.input_shape[1:3])
    tf.saved_model.save(module, str(folder / "saved"), signatures=module.signatures())
    (folder / "classes.json").write_text('["a", "b"]')
    classifier = ImageClassifier()
    classifier.load(folder / "saved", folder / "classes.json")
    return classifier


def test_gradcam_of_a_cnn_that_learned_bright_squares_lies_on_the_square(tmp_path):
    # Given the reference CNN trained until it tells images with a bright square from those without
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    train_x, train_y, _ = squares(256, rng)
    test_x, test_y, corners = squares(32, rng)
    model = build_cnn((SIZE, SIZE), 2)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(train_x, train_y, epochs=10, batch_size=32, verbose=0)
    assert (model.predict(test_x, verbose=0).argmax(axis=1) == test_y).mean() >= 0.95

    # When Grad-CAM maps the test images with a square
    maps, _ = gradcam(features_and_logits(model), test_x)
    maps = maps.numpy()

    # Then most of each map's mass lies in the square's box, dilated by 2 pixels (25% of the image)
    inside = []
    for i in np.flatnonzero(test_y == 0):
        row, col = corners[i]
        box = np.zeros((SIZE, SIZE), bool)
        box[
            max(0, row - MARGIN) : row + SIDE + MARGIN, max(0, col - MARGIN) : col + SIDE + MARGIN
        ] = 1
        inside.append(maps[i][box].sum() / maps[i].sum())
    assert maps.shape == (32, SIZE, SIZE) and maps.min() >= 0 and maps.max() == pytest.approx(1)
    assert np.mean(inside) > 0.5, np.round(inside, 2)

    # And the exported SavedModel's own gradcam gives the same maps
    classifier = _save(model, tmp_path)
    np.testing.assert_allclose(classifier.module.gradcam(test_x).numpy(), maps, atol=1e-4)


def test_top_losses_on_fixed_logits_are_the_highest_loss_rows_in_order():
    # Given fixed logits of 5 images of 3 classes: confident right, confident wrong, unsure, ...
    logits = np.array([[5.0, 0, 0], [0, 6, 0], [1, 1, 1], [0, 0, 9], [2, 0, 0]], dtype=np.float32)
    labels = np.array([0, 0, 2, 0, 1])

    # When the top losses are taken
    top = top_losses(logits, labels, 3)

    # Then they are the rows of highest -log softmax[label], highest first
    exp = np.exp(logits.astype(np.float64))
    direct = -np.log(exp[np.arange(5), labels] / exp.sum(axis=1))
    np.testing.assert_allclose(losses(logits, labels), direct, rtol=1e-6)
    assert top.tolist() == [3, 1, 4] == np.argsort(-direct)[:3].tolist()
    assert top_losses(logits, labels, 10).tolist() == np.argsort(-direct).tolist()


def test_the_gradcam_sample_is_half_right_half_wrong_where_it_can_be():
    predicted, labels = np.array([0, 1, 1, 0, 0, 1, 0, 0]), np.array([0, 1, 0, 1, 0, 1, 0, 0])
    wrong = {2, 3}
    picked = right_and_wrong(predicted, labels, 4, seed=1)
    assert len(picked) == 4 and wrong <= set(picked.tolist())
    # Fewer right ones than asked for: the wrong ones fill in, and nothing twice
    assert sorted(right_and_wrong(predicted, labels, 8, seed=1).tolist()) == list(range(8))
    assert set(right_and_wrong(predicted, labels, 2, seed=3).tolist()) & wrong


def test_a_report_that_cannot_be_logged_is_one_warning_line_not_an_error(caplog):
    # Given a store that refuses every artifact
    class FullDisk:
        def log_figure(self, figure, path):
            raise OSError("No space left on device")

        def log_table(self, header, rows, path):
            raise OSError("No space left on device")

    overlays = np.zeros((1, 8, 8, 3), np.uint8)
    summary = ExplainSummary(["a", "b"], overlays, np.array([0]), np.array([1]), None, [])

    # When the Grad-CAM report is logged there
    with caplog.at_level(logging.WARNING):
        log_summary(FullDisk(), summary)

    # Then it says so in one warning line, and raises nothing
    assert [r.getMessage() for r in caplog.records] == [
        "Grad-CAM and top losses not logged: No space left on device"
    ]


def test_a_keras_application_is_explained_at_its_backbone_map_and_a_hub_model_is_skipped(tmp_path):
    # Given a Keras application backbone model and a TF Hub backbone model (random weights)
    from insect_exp.config import HubModelConfig, KerasAppConfig
    from insect_exp.models import recipe_for

    app = recipe_for(KerasAppConfig(backbone="VGG16", weights=None, image_size=[SIZE, SIZE]))
    hub_dir = export_tiny(tmp_path / "feature_vector", 8)
    hub = recipe_for(HubModelConfig(handle=str(hub_dir), image_size=[SIZE, SIZE]))
    images = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)

    # When each is explained
    app_model = app.build(3)
    maps, logits = gradcam(features_and_logits(app_model), images)

    # Then the application's maps come from its backbone (same logits as the model) ...
    assert maps.shape == (2, SIZE, SIZE)
    np.testing.assert_allclose(logits, app_model(images), rtol=1e-4, atol=1e-5)
    # ... and the hub model, which shows only pooled features, says so and exports no gradcam
    hub_model = hub.build(3)
    with pytest.raises(NoFeatureMap, match=r"'backbone'.* only pooled features"):
        features_and_logits(hub_model)
    classifier = _save(hub_model, tmp_path)
    with pytest.raises(UserError, match=r"explain=true: this model has no Grad-CAM function"):
        OverlayWriter.for_predict(classifier, str(tmp_path / "p.csv"), str(tmp_path), 4)


def test_a_run_logs_gradcam_and_top_losses_and_predict_explain_writes_an_overlay_per_image(
    tmp_path,
):
    # Given a tiny 3-class folder
    folder = make_image_folder(tmp_path / "insects")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    # When a run trains on it, its top losses on the training images too
    done = run_cli(
        "dataset=insects", f"dataset.root={folder}", "epochs=1", "batch_size=4",
        "model.image_size=[32,32]", f"mlflow.tracking_uri={uri}", "report.top_losses_train=true",
        cwd=tmp_path, env={"INSECT_EXP_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip

    # Then it finished with plots/gradcam.png, and top losses of both splits
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("insect_exp").experiment_id])
    assert run.info.status == "FINISHED"
    logged = artifact_paths(client, run.info.run_id)
    for name in ("plots/gradcam.png", "plots/top_losses.png", "plots/top_losses_train.png"):
        assert name in logged
    table = Path(client.download_artifacts(run.info.run_id, "top_losses.tsv", str(tmp_path)))
    rows = list(csv.DictReader(table.open(), delimiter="\t"))
    assert len(rows) == 9  # every test image, the highest loss first
    assert [float(r["loss"]) for r in rows] == sorted(
        (float(r["loss"]) for r in rows), reverse=True
    )
    assert set(rows[0]) == {"path", "true", "predicted", "probability", "probability_true", "loss"}
    assert "top_losses_train.tsv" in logged

    # When predict labels the test folder with explain=true
    out = tmp_path / "preds.csv"
    predicted = cli(
        "insect_exp.predict", f"model_uri=runs:/{run.info.run_id}/model",
        f"inputs={folder / 'test'}", f"output={out}", "explain=true", f"mlflow.tracking_uri={uri}",
        cwd=tmp_path,
    )  # fmt: skip

    # Then each labelled image has its overlay, an RGB PNG of the model's size, beside the CSV
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    overlays = sorted((tmp_path / "preds_gradcam").rglob("*.png"))
    labelled = sorted(Path(r["path"]) for r in csv.DictReader(out.open()))
    assert len(labelled) == 9
    expected = [tmp_path / "preds_gradcam" / p.relative_to(folder / "test") for p in labelled]
    assert overlays == [p.with_name(p.name + ".png") for p in expected]
    assert Image.open(overlays[0]).size == (32, 32) and Image.open(overlays[0]).mode == "RGB"
    assert "9 Grad-CAM overlays" in predicted.stderr

    # And explain=true without a CSV file to put them beside is one line, exit 2
    bad = cli(
        "insect_exp.predict", f"model_uri=runs:/{run.info.run_id}/model",
        f"inputs={folder / 'test'}", "explain=true", cwd=tmp_path,
    )  # fmt: skip
    assert bad.returncode == 2 and "explain=true needs output=" in bad.stderr
    assert "Traceback" not in bad.stderr
