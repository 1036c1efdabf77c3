"""Shared fixtures: the real Hydra config, shrunk to tiny images and one epoch, in temp dirs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from PIL import Image

import insect_exp  # noqa: F401  (sets TF_USE_LEGACY_KERAS before any test imports TensorFlow)
from insect_exp.config import Config, RuntimeConfig, register_configs, to_object

CONF_DIR = str(Path(__file__).resolve().parents[1] / "insect_exp" / "conf")
CLASSES = ("beetles", "cockroach", "dragonflies")


def config_options(group: str) -> list[str]:
    """The options of a config group: its YAML files' names."""
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m insect_exp ARGS` in cwd, to its end (extra environment variables in env)."""
    return subprocess.run(
        [sys.executable, "-m", "insect_exp", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def make_image_folder(
    root: Path,
    classes: tuple[str, ...] = CLASSES,
    train_per_class: int = 6,
    test_per_class: int = 3,
    size: tuple[int, int] = (24, 20),
    seed: int = 0,
) -> Path:
    """Write a tiny learnable folder: each class is one dominant colour channel plus noise."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        if count == 0:
            continue
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (size[1], size[0], 3), dtype=np.uint8)
                pixels[..., label % 3] += 150
                Image.fromarray(pixels).save(folder / f"{name}_{i}.jpg", quality=95)
    return root


def make_flat_images(tmp_path: Path, test_per_class: int) -> list[Path]:
    """make_image_folder's images (4 train a class) moved into one folder without class folders,
    tmp_path/data/images, each named <split>-<class>_<n>.jpg (for CSV file lists)."""
    root = make_image_folder(tmp_path / "layout", train_per_class=4, test_per_class=test_per_class)
    flat = tmp_path / "data" / "images"
    flat.mkdir(parents=True)
    return [
        path.rename(flat / f"{path.parent.parent.name}-{path.name}")
        for path in sorted(root.rglob("*.jpg"))
    ]


@pytest.fixture(autouse=True)
def _keep_tracking_uri_env() -> Iterator[None]:
    """Restore $MLFLOW_TRACKING_URI after each test."""
    # mlflow.set_tracking_uri (MLflow 3) exports it: a later test's `python -m insect_exp`
    # subprocess would otherwise log into this test's store.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(autouse=True)
def _float32_policy() -> Iterator[None]:
    """A run with precision=mixed_* sets Keras's process-wide dtype policy: reset it after."""
    yield
    keras = sys.modules.get("tf_keras")
    if keras is not None:
        keras.mixed_precision.set_global_policy("float32")


def artifact_paths(client, run_id: str, path: str = "") -> set[str]:
    """Every artifact file of a run, as paths relative to its artifact root."""
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def assert_model_reloads(
    tracking_uri: str, experiment_id: str, tmp_path: Path, timeout: float = 300
) -> None:
    """The experiment's one logged model loads in a fresh process (no Keras flag set there) and
    gives logits of shape (2, 3) for 2 images of 32x32."""
    from mlflow.tracking import MlflowClient

    (model,) = MlflowClient(tracking_uri).search_logged_models([experiment_id])
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.save(tmp_path / "x.npy", images)
    code = (
        "import numpy as np, mlflow\n"
        f"mlflow.set_tracking_uri({tracking_uri!r})\n"
        f"m = mlflow.pyfunc.load_model('models:/{model.model_id}')\n"
        f"print('SHAPE', np.asarray(m.predict(np.load({str(tmp_path / 'x.npy')!r}))).shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert "SHAPE (2, 3)" in out.stdout, out.stderr[-3000:]


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A tiny 3-class folder with train/ and test/."""
    return make_image_folder(tmp_path / "insects")


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A SQLite MLflow store in the test's temp dir (never the repo's mlruns/)."""
    (tmp_path / "mlruns").mkdir(exist_ok=True)
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def compose_config(*overrides: str, shrink: dict | None = None, launch_dir: Path) -> Config:
    """Compose conf/ as the command line would, apply shrinking defaults, return it typed.

    Args:
        shrink: values set unless an override names their key (keys a model lacks are skipped).
        launch_dir: what Hydra would fill in as runtime.launch_dir (no Hydra app runs here).
    """
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=False)
    given = {o.split("=")[0].lstrip("+~") for o in overrides}
    with open_dict(cfg):
        for key, value in (shrink or {}).items():
            if key in given:
                continue
            node, _, leaf = key.rpartition(".")
            target = OmegaConf.select(cfg, node) if node else cfg
            if target is not None and (leaf in target or not node):
                target[leaf] = value
        # Outside a Hydra app there is no ${hydra:...} to resolve: a plain single run.
        cfg.runtime = RuntimeConfig(launch_dir=str(launch_dir), overrides=list(overrides))
    return to_object(cfg)


@pytest.fixture
def compose_cfg(
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Config]:
    """Compose the real config from conf/ with overrides, shrunk for tests, typed.

    Tiny images, one epoch, a small batch, a temp MLflow store and a temp demo-data directory.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("INSECT_EXP_CACHE_DIR", str(tmp_path / "cache"))

    def _compose(*overrides: str, shrink: bool = True) -> Config:
        defaults = {
            "epochs": 1,
            "batch_size": 4,
            "model.image_size": [32, 32],
            "mlflow.tracking_uri": tracking_uri,
            "dataset.train_per_class": 6,
            "dataset.test_per_class": 3,
        }
        return compose_config(*overrides, shrink=defaults if shrink else None, launch_dir=tmp_path)

    return _compose


def pixel_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG of WIDTH x HEIGHT black pixels in a few tens of KB (1 bit a pixel, compressed): decoded
    as RGB it takes width x height x 3 bytes (1.2 GB at 20000x20000)."""
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, "PNG")
    return out.getvalue()
