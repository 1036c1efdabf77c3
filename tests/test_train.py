"""End to end: compose the real config, train one tiny epoch, check what MLflow holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from insect_exp import train
from insect_exp.callbacks import scores
from insect_exp.data import load_data
from insect_exp.models.cnn import CNNRecipe
from insect_exp.models.layers import ServingModule
from tests.conftest import artifact_paths, assert_model_reloads


def _record_builds(monkeypatch) -> list:
    """Every model the CNN recipe builds during the test, in order (precision=auto's check
    builds two before the run's own where bf16 is native)."""
    built = []
    build = CNNRecipe.build

    def recording(self, num_classes):
        built.append(build(self, num_classes))
        return built[-1]

    monkeypatch.setattr(CNNRecipe, "build", recording)
    return built


def test_train_logs_a_finished_run_with_metrics_plots_config_and_model(
    compose_cfg, tracking_uri, image_folder, tmp_path
):
    # Given the real config on a tiny folder
    cfg = compose_cfg("dataset=insects", f"dataset.root={image_folder}", "epochs=2")

    # When the train job runs
    val_accuracy = train.run(cfg)

    # Then MLflow holds one FINISHED run with everything a user compares runs by
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("insect_exp")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "cnn"
    assert run.data.params["epochs"] == "2"
    assert run.data.params["data.num_train"] == "18"
    assert run.info.run_name.startswith("cnn-adam")
    assert "version.tensorflow" in run.data.tags
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [0, 1]
    assert run.data.metrics["val_accuracy"] == pytest.approx(val_accuracy)
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
    # 18 training images in batches of 4 -> 5 steps an epoch, 2 epochs
    assert len(client.get_metric_history(run.info.run_id, "batch_loss")) == 10

    artifacts = artifact_paths(client, run.info.run_id)
    pngs = {a for a in artifacts if a.endswith(".png")}
    assert len(pngs) >= 6, pngs
    assert {"config/config.yaml", "config/overrides.json", "class_names.json"} <= artifacts
    assert {"model_summary.txt", "dataset/stats.json", "plots/confusion_matrix.png"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "dataset/stats.json", str(tmp_path))
    stats = json.loads(Path(local).read_text())
    assert stats["images_per_class"]["train"] == {"beetles": 6, "cockroach": 6, "dragonflies": 6}

    # And the logged model reloads in a fresh process (no Keras flag set there) and predicts
    assert_model_reloads(tracking_uri, experiment.experiment_id, tmp_path)


def test_mixed_bfloat16_computes_in_bfloat16_with_float32_weights_and_logits(
    compose_cfg, tracking_uri, image_folder, monkeypatch
):
    # Given the reference CNN (with augmentation) under precision=mixed_bfloat16
    cfg = compose_cfg(
        "dataset=insects", f"dataset.root={image_folder}", "precision=mixed_bfloat16",
        "model.augment.flip=true", "mlflow.log_model=false",
    )  # fmt: skip
    built = _record_builds(monkeypatch)

    # When the train job runs
    train.run(cfg)

    # Then the convolutions ran in bfloat16 on float32 weights, the logits stayed float32,
    # the parameter count is the reference's, and the run records the policy
    (model,) = built
    conv = next(layer for layer in model.layers if layer.name.startswith("conv2d"))
    assert conv.compute_dtype == "bfloat16" and conv.kernel.dtype == "float32"
    assert model.get_layer("logits").compute_dtype == "float32"
    images = np.zeros((2, 32, 32, 3), np.float32)
    assert ServingModule(model, (32, 32)).__call__(images).dtype == "float32"
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("insect_exp").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["precision"] == "mixed_bfloat16"
    assert np.isfinite(run.data.metrics["loss"])


def test_with_a_held_out_validation_set_the_test_split_is_scored_apart(
    compose_cfg, tracking_uri, image_folder, monkeypatch
):
    # Given validation held out of train, and a test split beside it
    cfg = compose_cfg(
        "dataset=insects", f"dataset.root={image_folder}", "dataset.val_split=0.34",
        "mlflow.log_model=false",
    )  # fmt: skip
    built = _record_builds(monkeypatch)

    # When the train job runs
    train.run(cfg)

    # Then test_loss and test_accuracy are the final model's on the test split, not on validation
    data = load_data(cfg.dataset, cfg.model.image_size, cfg.seed)
    assert not data.val_is_test and len(data.val) == 6
    # the model trained: the last built (precision=auto's check builds its own where bf16 is native)
    logits = built[-1].predict(data.test.images.astype("float32"), verbose=0)
    expected = scores(logits, data.test.labels)
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("insect_exp").experiment_id])
    assert run.data.metrics["test_loss"] == pytest.approx(expected["loss"], rel=1e-4)
    assert run.data.metrics["test_accuracy"] == pytest.approx(expected["accuracy"])
