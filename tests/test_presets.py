"""Experiment presets, the Optuna search and the SLURM launcher preset compose as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from insect_exp import train
from tests.conftest import CONF_DIR, make_image_folder, run_cli

CONF = Path(CONF_DIR)


def test_every_experiment_preset_and_search_is_offered():
    assert {"reference_cnn", "reference_hub", "strong_cnn", "strong_hub", "debug"} <= {
        p.stem for p in (CONF / "experiment").glob("*.yaml")
    }
    assert (CONF / "hparams_search" / "optuna.yaml").is_file()


def test_reference_cnn_preset_is_the_posts_first_experiment(compose_cfg):
    cfg = compose_cfg("experiment=reference_cnn", shrink=False)
    assert (cfg.model.name, list(cfg.model.image_size), cfg.epochs) == ("cnn", [180, 180], 10)
    assert (cfg.optimizer.name, cfg.optimizer.learning_rate, cfg.batch_size) == ("adam", 1e-3, 32)


def test_reference_hub_preset_is_the_posts_frozen_mobilenet(compose_cfg):
    cfg = compose_cfg("experiment=reference_hub", shrink=False)
    assert (cfg.model.name, list(cfg.model.image_size)) == ("hub_mobilenet", [224, 224])
    assert cfg.model.trainable is False and cfg.model.preview.enabled is True
    assert (cfg.optimizer.name, cfg.epochs, cfg.batch_size) == ("adam", 2, 32)


def _budget(cfg) -> tuple:
    """What a preset may not change to beat its reference: model, images, validation (and the
    passes over the images, checked in each test)."""
    size = list(cfg.model.image_size)
    return (cfg.model.name, size, cfg.dataset.val_split, cfg.dataset.max_per_class)


def test_strong_cnn_preset_keeps_the_reference_cnn_budget_and_changes_the_training(compose_cfg):
    reference = compose_cfg("experiment=reference_cnn", shrink=False)
    strong = compose_cfg("experiment=strong_cnn", shrink=False)
    assert _budget(strong) == _budget(reference) and strong.epochs == reference.epochs == 10
    # what it changes: AdamW on a cosine schedule, label smoothing, flips and rotations, and
    # batches of 16 instead of 32
    assert (strong.optimizer.name, strong.optimizer.schedule.name) == ("adamw", "cosine")
    assert strong.loss.label_smoothing > 0 and strong.model.augment.flip
    assert strong.model.augment.rotation == 0.5 and strong.batch_size == 16


def test_strong_hub_preset_spends_the_reference_hub_epochs_on_the_head_then_fine_tuning(
    compose_cfg,
):
    reference = compose_cfg("experiment=reference_hub", shrink=False)
    strong = compose_cfg("experiment=strong_hub", shrink=False)
    assert _budget(strong) == _budget(reference) and not strong.model.trainable
    fine_tune = strong.model.fine_tune
    assert fine_tune.enabled and strong.epochs + fine_tune.epochs == reference.epochs
    assert fine_tune.learning_rate < strong.optimizer.learning_rate


def test_strong_cnn_preset_trains_from_the_command_line(tmp_path, tracking_uri, monkeypatch):
    # Given a tiny folder (the preset's 180x180 and 10 epochs shrunk)
    monkeypatch.setenv("INSECT_EXP_CACHE_DIR", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "insects", size=(24, 24))

    # When the preset runs through the CLI
    out = run_cli(
        "experiment=strong_cnn", "dataset=insects", f"dataset.root={root}",
        "model.image_size=[24,24]", "epochs=2", "batch_size=6",
        f"mlflow.tracking_uri={tracking_uri}", "mlflow.log_model=false", "report.gradcam_images=0",
        cwd=tmp_path,
    )  # fmt: skip

    # Then one FINISHED run, tagged with the preset, trained 2 epochs on its schedule: the
    # warm-up epoch at half the peak rate, then the cosine's start at the peak
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("insect_exp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["preset"] == "strong_cnn"
    assert run.data.params["optimizer.name"] == "adamw"
    peak = float(run.data.params["optimizer.learning_rate"])
    rates = client.get_metric_history(run.info.run_id, "lr")
    assert [m.step for m in rates] == [0, 1]
    assert [m.value for m in rates] == pytest.approx([peak / 2, peak], rel=1e-6)


@pytest.mark.parametrize("model", ["cnn", "hub_mobilenet"])
def test_debug_preset_shrinks_any_model_and_dataset(compose_cfg, model):
    # A sweep mixes models under one preset: it must compose with each of them
    cfg = compose_cfg("experiment=debug", f"model={model}", shrink=False)
    assert (cfg.epochs, cfg.dataset.max_per_class, cfg.mlflow.log_model) == (1, 8, False)
    folder = compose_cfg("experiment=debug", "dataset=insects", "dataset.root=/x", shrink=False)
    assert folder.dataset.max_per_class == 8


def test_debug_preset_trains_on_8_images_per_class_in_one_epoch(compose_cfg, tracking_uri):
    # Given the debug preset on the demo set (generated into the test's temp dir), small images
    cfg = compose_cfg(
        "experiment=debug", f"mlflow.tracking_uri={tracking_uri}", "model.image_size=[32,32]",
        shrink=False,
    )  # fmt: skip

    # When it runs
    train.run(cfg)

    # Then one FINISHED run trained one epoch on 3 x 8 images
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("insect_exp").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["data.num_train"] == "24"
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 1


def test_optuna_search_maximises_val_accuracy_over_lr_batch_size_and_dropout():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", ["hparams_search=optuna"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert cfg.hydra.runtime.choices["hydra/sweeper"] == "optuna"
    assert str(sweeper.direction).endswith("maximize")
    assert sweeper.storage is None  # in memory: optuna 2.10's RDB storage fails on SQLAlchemy 2
    assert set(sweeper.params) == {"optimizer.learning_rate", "batch_size", "model.dropout"}
    assert str(cfg.hydra.mode).endswith("MULTIRUN")


def test_slurm_preset_exposes_the_fields_a_cluster_user_sets(tmp_path):
    # When the SLURM preset's config is printed with a partition set
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "insect_exp",
            "--cfg",
            "hydra",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    # Then it is the submitit SLURM launcher with partition, time, cpus, gpus and memory
    assert out.returncode == 0, out.stderr
    hydra = yaml.safe_load(out.stdout)["hydra"]
    assert hydra["runtime"]["choices"]["hydra/launcher"] == "slurm"
    launcher = hydra["launcher"]
    assert launcher["partition"] == "gpu"
    for key in ("timeout_min", "cpus_per_task", "gpus_per_node", "mem_gb"):
        assert isinstance(launcher[key], int), key
    assert OmegaConf.create(launcher).array_parallelism > 0
