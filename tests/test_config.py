"""The config groups compose, build, and reject mistakes before any training starts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from insect_exp import UserError, fit, models
from tests.conftest import CONF_DIR, config_options, run_cli

CONF = Path(CONF_DIR)


def test_groups_offer_the_documentedconfig_options():
    assert {"demo", "insects"} <= set(config_options("dataset"))
    assert {"cnn", "hub_mobilenet", "keras_app"} <= set(config_options("model"))
    assert {"adam", "adamw", "sgd", "rmsprop"} <= set(config_options("optimizer"))


def test_defaults_are_the_reference_recipe(compose_cfg):
    cfg = compose_cfg(shrink=False)
    assert (cfg.dataset.name, cfg.model.name, cfg.optimizer.name) == ("demo", "cnn", "adam")
    assert (cfg.epochs, cfg.batch_size, list(cfg.model.image_size)) == (10, 32, [180, 180])


@pytest.mark.parametrize("name", config_options("optimizer"))
def test_every_optimizer_builds_with_its_learning_rate(compose_cfg, name):
    cfg = compose_cfg(f"optimizer={name}", "optimizer.learning_rate=0.05")
    optimizer = fit.make_optimizer(cfg.optimizer)
    assert optimizer.name.lower() == name
    assert float(optimizer.learning_rate.numpy()) == pytest.approx(0.05)


def test_cnn_config_builds_the_reference_model_with_its_exact_size(compose_cfg):
    # Given the cnn group at the reference 180x180 for 3 classes
    cfg = compose_cfg("model=cnn", "model.image_size=[180,180]")

    # When it is built, Then it has the reference's 3,989,027 parameters and emits logits
    model = models.recipe_for(cfg.model).build(num_classes=3)
    assert model.count_params() == 3_989_027
    assert model.output_shape == (None, 3)
    assert model.layers[-1].get_config()["activation"] == "linear"


def test_cnn_options_change_the_model(compose_cfg):
    cfg = compose_cfg("model.dropout=0.3", "model.augment.flip=true", "model.dense_units=16")
    names = [type(layer).__name__ for layer in models.recipe_for(cfg.model).build(4).layers]
    assert names[0] == "RandomFlip" and "Dropout" in names


@pytest.mark.parametrize("name", config_options("dataset"))
def test_every_dataset_option_composes(compose_cfg, name):
    required = ["dataset.path=/some/labels.csv"] if name == "csv" else []  # a file list, no root
    cfg = compose_cfg(f"dataset={name}", "dataset.root=/some/folder", *required)
    assert cfg.dataset.name == name and cfg.dataset.root == "/some/folder"


def test_a_csv_dataset_without_its_path_fails_naming_the_key(compose_cfg):
    with pytest.raises(UserError, match="no value for dataset.path"):
        compose_cfg("dataset=csv")


@pytest.mark.parametrize(
    "overrides",
    [("precision=mixed_bfloat16", "export.tflite=true"),
     ("precision=mixed_float16", "export.quantize=dynamic")],
)  # fmt: skip
def test_a_16_bit_policy_with_a_tflite_export_fails_before_training(tmp_path, overrides):
    # When a run asks for a 16-bit policy and a TFLite model, which TensorFlow Lite cannot convert
    out = run_cli(*overrides, cwd=tmp_path)
    # Then it stops at start-up in one line naming both settings and the fix, before any run
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"{overrides[0]} cannot be combined with export.tflite" in out.stderr
    assert "set precision=auto or float32" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "mlruns").exists()


def test_help_and_cfg_answer_fast_without_tensorflow(tmp_path):
    # --cfg job prints the composed config; TensorFlow must not be imported for it
    start = time.perf_counter()
    out = run_cli("--cfg", "job", "model=hub_mobilenet", "epochs=3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "hub_mobilenet" in out.stdout and "epochs: 3" in out.stdout
    assert time.perf_counter() - start < 20  # generous bound; importing TF alone takes ~5 s
    assert run_cli("--help", cwd=tmp_path).returncode == 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("epochs=ten", "could not be converted to Integer"),
        ("modle=cnn", "Could not override 'modle'"),
        ("model=resnet", "Could not find 'model/resnet'"),
        ("model.handle=x", "Key 'handle' not in 'CNNConfig'"),
        ("optimizer.learning_rate=fast", "could not be converted to Float"),
        ("precision=bf16", "Invalid value 'bf16', expected one of [auto, float32, mixed_bfloat16"),
        (
            "model.augment.policy=foo",
            "Invalid value 'foo', expected one of [none, randaugment, trivialaugment]",
        ),
    ],
)
def test_invalid_config_fails_at_startup_with_hydras_message(tmp_path, override, message):
    out = run_cli(override, cwd=tmp_path)
    assert out.returncode != 0
    assert message in out.stderr
    assert not (tmp_path / "mlruns").exists()  # nothing ran


def test_insects_dataset_without_root_is_a_clear_error(tmp_path):
    out = run_cli("dataset=insects", cwd=tmp_path)
    assert out.returncode == 2
    assert "insect_exp: error: no value for dataset.root" in out.stderr
    assert "Traceback" not in out.stderr


def test_two_of_hydras_modes_at_once_are_a_clear_error(tmp_path):
    out = run_cli("-m", "--cfg", "job", "epochs=1,2", cwd=tmp_path)
    assert out.returncode == 2
    assert "insect_exp: error: Only one of --run, --multirun, --cfg" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_folder_exits_non_zero_with_one_line_and_no_run(tmp_path):
    # Given a dataset root that does not exist
    out = run_cli("dataset=insects", f"dataset.root={tmp_path / 'nowhere'}", cwd=tmp_path)

    # Then the command fails with one line naming the folder, and no traceback
    assert out.returncode == 2
    assert f"dataset root '{tmp_path / 'nowhere'}' is not a directory" in out.stderr
    assert "Traceback" not in out.stderr

    # And it stopped before opening a run: the store holds no run that never started
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlruns" / "mlflow.db"
    if db.exists():
        client = MlflowClient(f"sqlite:///{db}")
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_an_unusable_folder_ends_its_run_failed_with_one_line(tmp_path):
    # Given a dataset root that exists but holds no class folders
    (tmp_path / "empty" / "train").mkdir(parents=True)
    out = run_cli("dataset=insects", f"dataset.root={tmp_path / 'empty'}", cwd=tmp_path)

    # Then the command fails with one line, and no traceback
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("insect_exp: error:")

    # And the run it opened is recorded FAILED with the same error
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("insect_exp").experiment_id])
    assert run.info.status == "FAILED"
    assert "needs at least 2 class folders" in last
    assert "needs at least 2 class folders" in run.data.tags["error"]


def test_console_script_composes_the_same_config(tmp_path):
    script = Path(sys.executable).with_name("insect-exp")
    out = subprocess.run(
        [str(script), "--cfg", "job", "optimizer=sgd"], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "name: sgd" in out.stdout


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("batch_size=0", "batch_size", ">= 1"),
        ("epochs=0", "epochs", ">= 1"),
        ("model.dropout=1.5", "model.dropout", "in [0, 1)"),
        ("model.image_size=[32]", "model.image_size", "two positive integers"),
        ("model.image_size=[0,0]", "model.image_size", "two positive integers"),
        ("optimizer.learning_rate=-1", "optimizer.learning_rate", "> 0"),
        ("optimizer.clipnorm=0", "optimizer.clipnorm", "> 0 or null"),
        ("precision_tolerance=-1", "precision_tolerance", ">= 0"),
        ("train.ema.decay=1", "train.ema.decay", "in (0, 1)"),
        ("train.ema.decay=0", "train.ema.decay", "in (0, 1)"),
        ("dataset.max_per_class=0", "dataset.max_per_class", ">= 1"),
        ("seed=-1", "seed", ">= 0"),
        ("threads=-4", "threads", ">= 0"),
        ("dataset.val_split=-0.1", "dataset.val_split", "in [0, 1)"),
        ("dataset.val_split=1.5", "dataset.val_split", "in [0, 1)"),
        ("loss.label_smoothing=1", "loss.label_smoothing", "in [0, 1)"),
        ("model.augment.rotation=2", "model.augment.rotation", "in [0, 1)"),
        ("model.augment.magnitude=11", "model.augment.magnitude", "in [0, 10]"),
        ("model.augment.erasing=1.5", "model.augment.erasing", "in [0, 1]"),
        ("model.augment.num_ops=0", "model.augment.num_ops", "in [1, 10]"),
        ("dataset.max_image_pixels=0", "dataset.max_image_pixels", ">= 1"),
    ],
)
def test_out_of_range_value_fails_at_startup_naming_the_key_and_range(
    tmp_path, override, key, allowed
):
    # When a value outside its range is given on the command line
    out = run_cli(override, cwd=tmp_path)

    # Then the command exits 2 with one line naming the key and its allowed range
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"insect_exp: error: {key}=") and allowed in line
    # And nothing ran: no MLflow store was created
    assert not (tmp_path / "mlruns").exists()


def test_range_checks_run_without_tensorflow():
    # Composing and typing a config with a bad value never imports TensorFlow
    code = (
        "import sys\n"
        "from insect_exp.config import ConfigError, OptimizerConfig, SGDConfig\n"
        "try:\n"
        "    SGDConfig(learning_rate=0.0)\n"
        "except ConfigError as err:\n"
        "    print('ERR', err)\n"
        "print('TF', 'tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "ERR optimizer.learning_rate=0.0 is out of range" in out.stdout, out.stderr
    assert "TF False" in out.stdout


@pytest.mark.parametrize(
    ("override", "config_class", "recipe_class"),
    [
        ("model=cnn", "CNNConfig", "CNNRecipe"),
        ("model=hub_mobilenet", "HubModelConfig", "HubRecipe"),
        ("model=keras_app", "KerasAppConfig", "KerasAppRecipe"),
    ],
)
def test_each_model_group_is_typed_and_names_its_recipe(
    compose_cfg, override, config_class, recipe_class
):
    cfg = compose_cfg(override)
    assert type(cfg.model).__name__ == config_class
    assert type(models.recipe_for(cfg.model)).__name__ == recipe_class


def test_closed_choices_are_enums_in_the_typed_config(compose_cfg):
    from insect_exp.config import ClassWeight, FeatureCache, Monitor, Precision, Schedule

    cfg = compose_cfg(
        "model=hub_mobilenet", "optimizer.schedule=cosine", "dataset.class_weight=balanced",
        "train.early_stopping.monitor=val_accuracy", "precision=mixed_bfloat16",
    )  # fmt: skip
    assert cfg.model.feature_cache is FeatureCache.auto
    assert cfg.optimizer.schedule is Schedule.cosine
    assert cfg.dataset.class_weight is ClassWeight.balanced
    assert cfg.train.early_stopping.monitor is Monitor.val_accuracy
    assert cfg.precision is Precision.mixed_bfloat16


def test_configs_built_in_code_take_enum_names_and_reject_unknown_ones():
    from insect_exp.config import ConfigError, FeatureCache, HubModelConfig

    assert HubModelConfig(feature_cache="off").feature_cache is FeatureCache.off
    with pytest.raises(ConfigError, match="model.feature_cache='ram' is not one of auto, memory"):
        HubModelConfig(feature_cache="ram")
