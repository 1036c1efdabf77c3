"""A trained run to predict, evaluate, serve and export with: tiny images, one epoch, own store."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import compose_config, make_image_folder

# Subprocesses see this checkout's package, whatever the working directory.
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Trained:
    root: Path  # the temp dir: store in mlruns/, images in insects/
    folder: Path
    tracking_uri: str
    run_id: str
    model_id: str
    class_names: list[str]

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def predictions_tsv(self) -> dict[str, str]:
        """The run's own predictions.tsv: path -> predicted label."""
        local = self.client.download_artifacts(self.run_id, "predictions.tsv", str(self.root))
        rows = Path(local).read_text().splitlines()[1:]
        return {row.split("\t")[0]: row.split("\t")[2] for row in rows}


def train_run(
    root: Path, *overrides: str, test_per_class: int = 3, tracking_uri: str | None = None
) -> Trained:
    """Train the reference CNN (32x32, 1 epoch) on a generated 3-class folder under `root`.

    The store is SQLite in root/mlruns unless `tracking_uri` names another.
    """
    from insect_exp import train

    folder = make_image_folder(root / "insects", test_per_class=test_per_class)
    (root / "mlruns").mkdir(exist_ok=True)
    uri = tracking_uri or f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        # Set, so that leaving the context removes what MLflow exports there.
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        shrink = {
            "epochs": 1,
            "batch_size": 4,
            "model.image_size": [32, 32],
            "mlflow.tracking_uri": uri,
        }
        cfg = compose_config(
            "dataset=insects", f"dataset.root={folder}", *overrides, shrink=shrink, launch_dir=root
        )
        train.run(cfg)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("insect_exp")
    run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    (model,) = [m for m in client.search_logged_models([experiment.experiment_id])
                if m.source_run_id == run.info.run_id]  # fmt: skip
    names = ["beetles", "cockroach", "dragonflies"]
    return Trained(root, folder, uri, run.info.run_id, model.model_id, names)


def cli(module: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 300):
    """`python -m <module> args...` in `cwd`; the finished process (text output)."""
    environ = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    environ["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**environ, **(env or {})},
        timeout=timeout,
    )


def classifier_with_its_own_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An ImageClassifier (8x8, classes a, b, c) whose SavedModel decodes files otherwise than this
    version does (inverted: 255 - decode_image), as a model of another version may; and its model.
    """
    import tensorflow as tf
    import tf_keras as keras

    from insect_exp.data import decode as decoding
    from insect_exp.models.layers import ServingModule
    from insect_exp.serving import ImageClassifier

    current = decoding.decode_image
    with monkeypatch.context() as patched:
        patched.setattr(
            decoding, "decode_image", lambda contents, *args: 255 - current(contents, *args)
        )
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((8, 8, 3)),
                keras.layers.Rescaling(1 / 255),
                keras.layers.Flatten(),
                keras.layers.Dense(3),
            ]
        )
        module = ServingModule(model, (8, 8))
        tf.saved_model.save(module, str(tmp_path / "saved"), signatures=module.signatures())
    (tmp_path / "classes.json").write_text('["a", "b", "c"]')
    classifier = ImageClassifier()
    classifier.load(tmp_path / "saved", tmp_path / "classes.json")
    return classifier, model
