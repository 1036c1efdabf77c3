"""End to end with model=hub_mobilenet on local tiny SavedModels: the run, the CLI offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from insect_exp import train
from insect_exp.callbacks import scores
from insect_exp.data import load_data
from insect_exp.models import layers
from tests.conftest import artifact_paths, run_cli
from tests.models.conftest import TINY_IMAGENET_LABELS


def test_hub_run_logs_metrics_plots_preview_and_a_model_that_reloads_in_a_fresh_process(
    compose_cfg, tracking_uri, image_folder, tiny_backbone, tiny_classifier, tmp_path, monkeypatch
):
    # Given the real config on a tiny folder, a local backbone, the preview and a fine-tune stage
    classifier, labels = tiny_classifier
    cfg = compose_cfg(
        "model=hub_mobilenet",
        f"model.handle={tiny_backbone}",
        "dataset=insects",
        f"dataset.root={image_folder}",
        "epochs=2",
        "model.preview.enabled=true",
        f"model.preview.handle={classifier}",
        f"model.preview.labels={labels}",
        "model.preview.num_images=7",
        "model.fine_tune.enabled=true",
        "model.fine_tune.epochs=1",
    )
    logged = []

    class RecordingModule(layers.ServingModule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            logged.append(self)

    monkeypatch.setattr(layers, "ServingModule", RecordingModule)

    # When the train job runs
    train.run(cfg)

    # Then MLflow holds a FINISHED run whose epoch metrics run on through the fine-tune stage
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("insect_exp")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "hub_mobilenet"
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2]
    # the head's 2 epochs at the optimizer's learning rate, then 1 at the fine-tune stage's
    rates = [m.value for m in client.get_metric_history(run.info.run_id, "lr")]
    ft_rate = cfg.model.fine_tune.learning_rate
    np.testing.assert_allclose(rates, [cfg.optimizer.learning_rate] * 2 + [ft_rate], rtol=1e-6)
    # 18 training images in batches of 4: 5 steps an epoch, 3 epochs in all
    assert len(client.get_metric_history(run.info.run_id, "batch_loss")) == 15
    assert run.data.metrics["backbone_images_computed"] == 27  # 18 train + 9 test, once each
    # the test metrics are the final, fine-tuned model's (the function that is saved)
    test = load_data(cfg.dataset, cfg.model.image_size, cfg.seed).test
    expected_scores = scores(logged[0].__call__(test.images.astype("float32")).numpy(), test.labels)
    assert run.data.metrics["test_loss"] == pytest.approx(expected_scores["loss"], rel=1e-4)
    assert run.data.metrics["test_accuracy"] == pytest.approx(expected_scores["accuracy"])

    # And the plots include the post's "Model predictions" and "ImageNet predictions" grids
    artifacts = artifact_paths(client, run.info.run_id)
    for plot in ("test_predictions", "imagenet_predictions", "batch_loss", "training_curves"):
        assert f"plots/{plot}.png" in artifacts
    local = client.download_artifacts(run.info.run_id, "imagenet_predictions.tsv", str(tmp_path))
    rows = Path(local).read_text().splitlines()[1:]
    assert len(rows) == 7 and {r.split("\t")[1] for r in rows} <= set(TINY_IMAGENET_LABELS)
    summary = client.download_artifacts(run.info.run_id, "model_summary.txt", str(tmp_path))
    assert "backbone" in Path(summary).read_text()

    # And the full model (backbone + head) reloads in a fresh process, without the Keras flag,
    # and predicts what it predicted before logging
    (model,) = client.search_logged_models([experiment.experiment_id])
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    expected = logged[0].__call__(images).numpy()  # the function that is saved
    np.save(tmp_path / "x.npy", images)
    code = (
        "import numpy as np, mlflow\n"
        f"mlflow.set_tracking_uri({tracking_uri!r})\n"
        f"m = mlflow.pyfunc.load_model('models:/{model.model_id}')\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, np.asarray(m.predict(np.load("
        f"{str(tmp_path / 'x.npy')!r}))))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-5)


def test_offline_cli_exits_within_a_minute_with_the_fix_and_no_traceback(image_folder, tmp_path):
    # Given a machine where the hub handle cannot be reached and nothing is in the hub cache
    env = {
        **os.environ,
        "INSECT_EXP_HUB_HANDLE": "https://tfhub.invalid/google/tf2-preview/mobilenet_v2/feature_vector/4",
        "TFHUB_CACHE_DIR": str(tmp_path / "tfhub_modules"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [
        sys.executable, "-m", "insect_exp", "model=hub_mobilenet", "dataset=insects",
        f"dataset.root={image_folder}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"hydra.run.dir={tmp_path / 'outputs'}",
    ]  # fmt: skip

    # When the user runs model=hub_mobilenet
    start = time.perf_counter()
    out = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    elapsed = time.perf_counter() - start

    # Then it exits non-zero well within a minute, telling how to point at a local SavedModel
    output = out.stdout + out.stderr
    assert out.returncode != 0
    assert elapsed < 60
    assert "Traceback" not in output, output[-3000:]
    assert "model.handle=" in output and "export_untrained" in output, output[-3000:]
    # before any image was decoded
    assert "decoded" not in output


@pytest.mark.slow
def test_untrained_mobilenet_run_at_224(
    compose_cfg, tracking_uri, image_folder, untrained_mobilenet
):
    # Given the documented untrained export and the post's 224x224 input
    cfg = compose_cfg(
        "model=hub_mobilenet",
        f"model.handle={untrained_mobilenet['feature_vector']}",
        "model.image_size=[224,224]",
        "dataset=insects",
        f"dataset.root={image_folder}",
        "epochs=2",
    )

    # When the train job runs, then it logs a FINISHED run with the post's parameter count
    train.run(cfg)
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("insect_exp").experiment_id])
    assert run.info.status == "FINISHED"
    summary = client.download_artifacts(run.info.run_id, "model_summary.txt")
    assert "Total params: 2261827" in Path(summary).read_text().replace(",", "")


def test_strong_hub_preset_trains_the_head_then_fine_tunes_the_backbone_from_the_cli(
    image_folder, tiny_backbone, tracking_uri, tmp_path, monkeypatch
):
    # Given the preset on a tiny folder and a local backbone (export_untrained's SavedModel form)
    monkeypatch.setenv("INSECT_EXP_CACHE_DIR", str(tmp_path / "cache"))

    # When it runs through the CLI at the backbone's smallest useful size
    out = run_cli(
        "experiment=strong_hub", "dataset=insects", f"dataset.root={image_folder}",
        f"model.handle={tiny_backbone}", "model.image_size=[24,24]", "batch_size=6",
        f"mlflow.tracking_uri={tracking_uri}", "mlflow.log_model=false",
        "report.gradcam_images=0", cwd=tmp_path,
    )  # fmt: skip

    # Then a FINISHED run tagged with the preset: 1 epoch of the head at the optimizer's rate,
    # then 1 fine-tuning epoch at the lower rate, with backbone parameters unfrozen
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("insect_exp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["preset"] == "strong_hub"
    rates = client.get_metric_history(run.info.run_id, "lr")
    assert [m.step for m in rates] == [0, 1]
    np.testing.assert_allclose([m.value for m in rates], [1e-3, 1e-4], rtol=1e-6)
    unfrozen = re.search(r"fine-tuning (\d+) backbone parameters", out.stdout + out.stderr)
    assert unfrozen is not None and int(unfrozen.group(1)) > 0
