"""The command line as a user meets it: --help, a config dir of one's own, a quiet start-up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from insect_exp import hardware, quiet_startup
from insect_exp.config import DatasetConfig, ModelConfig, OptimizerConfig
from tests.conftest import CONF_DIR, compose_config, config_options, run_cli

CONF = Path(CONF_DIR)
# Every config group the package has (hydra/ holds Hydra's own: launcher and help).
GROUPS = sorted(d.name for d in CONF.iterdir() if d.is_dir() and d.name != "hydra")


def test_config_ships_inside_the_package_and_conf_is_the_same_files():
    # The wheel carries insect_exp/conf/; the top-level conf/ may only be a link to it
    assert CONF.parent.name == "insect_exp" and (CONF / "config.yaml").is_file()
    top = CONF.parents[1] / "conf"
    if top.exists() or top.is_symlink():
        assert top.is_symlink() and top.resolve() == CONF.resolve()


def test_help_says_what_the_command_does_with_each_groups_realconfig_options(tmp_path):
    out = run_cli("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    groups = text.split("== Config groups")[1].split("== Most used keys")[0]
    for group in GROUPS:
        assert re.search(rf"^{group}\s", groups, re.M), group
        for option in config_options(group):
            assert re.search(rf"\b{option}\b", groups), (group, option)
    assert "slurm" in groups and "joblib" in groups
    # Only real options: no schema entries, no Hydra boilerplate
    assert "base_" not in text and "schema" not in text
    assert "powered by Hydra" not in text and "__main__" not in text
    for section in ("== Most used keys", "== Examples", "== Where runs go", "mlruns/mlflow.db"):
        assert section in text
    examples = text.split("== Examples ==")[1].split("== Where")[0]
    assert examples.count("python -m insect_exp") == 3


def test_every_option_of_every_group_composes_with_its_schema(tmp_path):
    # The keys each dataset leaves to the command line
    required = {"insects": ["dataset.root=/x"], "csv": ["dataset.path=/x.csv"]}
    for group in GROUPS:
        for option in config_options(group):
            overrides = [f"{group}={option}", *required.get(option, [])]
            cfg = compose_config(*overrides, launch_dir=tmp_path)  # typed, ranges checked
            assert isinstance(cfg.model, ModelConfig), (group, option)
            assert isinstance(cfg.optimizer, OptimizerConfig), (group, option)
            assert isinstance(cfg.dataset, DatasetConfig), (group, option)


def test_the_job_has_a_name_so_its_log_is_not_main_log(tmp_path):
    out = run_cli("--cfg", "hydra", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["hydra"]["job"]["name"] == "insect_exp"


def _user_config_dir(root: Path) -> Path:
    """A team's own configs: a dataset on the package's folder schema and an experiment."""
    (root / "dataset").mkdir(parents=True)
    (root / "experiment").mkdir()
    (root / "dataset" / "mine.yaml").write_text(
        textwrap.dedent(
            """\
            defaults:
              - /schema/dataset/folder@_here_
              - _self_

            name: mine
            root: /data/mine
            val_split: 0.2
            """
        )
    )
    (root / "experiment" / "quick.yaml").write_text(
        textwrap.dedent(
            """\
            # @package _global_
            defaults:
              - override /dataset: mine
              - override /optimizer: sgd

            epochs: 2
            model:
              image_size: [64, 64]
            """
        )
    )
    return root


@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_a_config_dir_of_ones_own_adds_datasets_and_experiments(tmp_path, how):
    # Given a config dir outside the package with dataset/mine.yaml and experiment/quick.yaml
    mine = _user_config_dir(tmp_path / "team_conf")
    where = ["--config-dir", str(mine)] if how == "--config-dir" else [
        f"hydra.searchpath=[file://{mine}]"
    ]  # fmt: skip

    # When the job's config is printed with them, from another directory
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    out = run_cli(*where, "experiment=quick", "--cfg", "job", cwd=run_dir)

    # Then the package's config and the user's compose into one typed config
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["dataset"]["name"] == "mine" and cfg["dataset"]["root"] == "/data/mine"
    assert cfg["dataset"]["val_split"] == 0.2 and "max_per_class" in cfg["dataset"]
    assert cfg["optimizer"]["name"] == "sgd" and cfg["epochs"] == 2
    assert cfg["model"]["name"] == "cnn" and cfg["model"]["image_size"] == [64, 64]

    # And the user's dataset is checked against the package's schema
    bad = run_cli(*where, "dataset=mine", "dataset.val_split=fast", "--cfg", "job", cwd=run_dir)
    assert bad.returncode != 0 and "could not be converted to Float" in bad.stderr


# Start-up noise


@pytest.mark.parametrize(
    ("line", "level", "dropped"),
    [
        (b"I0000 00:00:1795975348.883979   25393 cudart_stub.cc:31] Could not find cuda", 1, True),
        (b"I0000 00:00:1795975348.882940   25393 port.cc:153] oneDNN custom operations", 0, False),
        (b"W0000 00:00:1795975348.882940   25393 foo.cc:1] a warning", 1, False),
        (b"W0000 00:00:1795975348.882940   25393 foo.cc:1] a warning", 2, True),
        (b"E0000 00:00:1795975355.465474   25393 cuda_platform.cc:52] failed cuInit", 2, False),
        (b"E0000 00:00:1795975355.465474   25393 cuda_platform.cc:52] failed cuInit", 3, True),
        (b"F0000 00:00:1795975355.465474   25393 x.cc:5] fatal", 3, False),
        (b"WARNING: All log messages before absl::InitializeLog() is called are written", 1, True),
        (b"Traceback (most recent call last):", 3, False),
        (b"I'm a line of the user's own", 3, False),
    ],
)
def test_startup_noise_is_tensorflows_own_lines_below_the_level(line, level, dropped):
    assert quiet_startup.is_startup_noise(line, level) is dropped


def test_filtered_stderr_passes_every_other_line_in_order(capfd):
    with quiet_startup.filtered_stderr(lambda line: line.startswith(b"drop")):
        os.write(2, b"keep 1\ndrop me\nkeep")
        os.write(2, b" 2\n")
        os.write(2, b"drop this too\nkeep 3\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "keep 1\nkeep 2\nkeep 3\nafter\n"


def _start_tensorflow(env_level: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if env_level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = env_level
    code = "import insect_exp, tensorflow as tf; print(len(tf.config.list_physical_devices()))"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )


@pytest.mark.skipif(hardware.nvidia_gpu_visible(), reason="a GPU machine: its start-up may speak")
def test_tensorflow_starts_quietly_on_a_machine_without_a_gpu():
    # When TensorFlow starts after insect_exp (as in every run) and probes its devices
    out = _start_tensorflow(None)

    # Then none of its C++ start-up lines reach stderr
    assert out.returncode == 0, out.stderr
    for noise in ("cuInit", "Could not find cuda", "absl::InitializeLog", "oneDNN"):
        assert noise not in out.stderr, out.stderr
    assert not re.search(r"^[IWE]\d{4} ", out.stderr, re.M), out.stderr


@pytest.mark.skipif(hardware.nvidia_gpu_visible(), reason="a GPU machine prints other lines")
def test_a_log_level_the_user_sets_is_kept():
    out = _start_tensorflow("0")
    assert out.returncode == 0, out.stderr
    assert "Could not find cuda" in out.stderr and "cuInit" in out.stderr


def test_describe_devices_names_the_device_in_one_line():
    line = hardware.describe_devices()
    assert "\n" not in line and line.startswith("training on ")
    if not hardware.nvidia_gpu_visible():
        assert "CPU" in line
