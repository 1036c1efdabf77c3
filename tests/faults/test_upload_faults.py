"""Uploading a spool (a run saved offline): repeated, after an interrupted one, holding links; and
what the logged model's page shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.entities import LoggedModelStatus, Metric
from mlflow.tracking import MlflowClient

from insect_exp import tracking
from insect_exp.tracking.spool import Spool
from tests.faults.conftest import environment, only_run, run

# A model that the spool holds, as MLflow saves one from code.
_MODEL_CODE = """
import mlflow


class Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return [0] * len(model_input)


mlflow.models.set_model(Constant())
"""
VAL_ACCURACY = [0.3333, 0.5556, 0.7111]  # by epoch


@pytest.fixture
def spool(tmp_path: Path, store: str) -> Spool:
    """A run whose store went away after it started: everything else it logged is in a spool.

    Three epochs, test scores, a plot, its model (registered as `insects` on upload), FINISHED.
    """
    import mlflow.pyfunc

    client = MlflowClient(store)
    experiment_id = tracking.ensure_experiment(store, "insect_exp")  # artifacts beside the store
    run_id = client.create_run(experiment_id, run_name="offline").info.run_id
    spool = Spool(tmp_path / "outputs" / "mlflow-spool", run_id, store, experiment_id)
    spool.open()
    epochs = [
        Metric(key, value, 1000 + epoch, epoch)
        for epoch, accuracy in enumerate(VAL_ACCURACY)
        for key, value in (("loss", 1.0 - accuracy), ("val_accuracy", accuracy))
    ]
    spool.metrics([*epochs, Metric("test_accuracy", 0.6667, 2000, 0)])
    spool.params({"epochs": "3"})
    spool.artifact("plots/training_curves.txt").write_text("curves\n")
    code = tmp_path / "constant.py"
    code.write_text(_MODEL_CODE)
    mlflow.pyfunc.save_model(str(spool.model_dir), python_model=str(code), pip_requirements=[])
    spool.register_as("insects")
    spool.finish("FINISHED")
    return spool


def upload(spool: Spool) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "insect_exp.upload", str(spool.dir)],
        capture_output=True, text=True, timeout=300, env=environment(),
    )  # fmt: skip


def models_of(uri: str, run_id: str) -> list:
    client = MlflowClient(uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    return list(client.search_logged_models([experiment_id], f"source_run_id = '{run_id}'"))


def test_a_spool_uploaded_twice_leaves_one_model_and_one_registered_version(spool, store):
    # Given a spooled run whose model is to be registered
    # When it is uploaded, and then uploaded again (a retry, or by mistake)
    first, second = upload(spool), upload(spool)

    # Then both succeed, and the run has one READY model, one registered version and each
    # epoch's metric once
    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    client = MlflowClient(store)
    (model,) = models_of(store, spool.run_id)
    assert model.status == LoggedModelStatus.READY
    (version,) = client.search_model_versions("name = 'insects'")
    assert version.run_id == spool.run_id and version.source == f"models:/{model.model_id}"
    found = client.get_run(spool.run_id)
    assert found.info.status == "FINISHED"
    assert found.data.tags["registered_model"] == "insects/1"
    history = client.get_metric_history(spool.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2]


def test_an_upload_after_an_interrupted_one_leaves_no_unfinished_model(spool, store):
    # Given a run whose model was created in the store but never finished: the server went away
    # while the model's files were being sent
    client = MlflowClient(store)
    experiment_id = client.get_run(spool.run_id).info.experiment_id
    left = client.create_logged_model(experiment_id, "model", source_run_id=spool.run_id)
    assert left.status == LoggedModelStatus.PENDING

    # When the spool is uploaded
    done = upload(spool)

    # Then the run has exactly one model, READY, with the spool's files: the unfinished one is gone
    assert done.returncode == 0, done.stderr[-3000:]
    (model,) = models_of(store, spool.run_id)
    assert model.status == LoggedModelStatus.READY and model.model_id != left.model_id
    files = {f.path for f in client.list_logged_model_artifacts(model.model_id)}
    assert "MLmodel" in files


def test_the_uploaded_model_shows_the_metrics_of_the_epoch_it_holds_and_the_test_scores(
    spool, store
):
    # Given a spooled run whose model holds the weights of its middle epoch (early stopping)
    spool.model_step(1)

    # When it is uploaded
    done = upload(spool)

    # Then its model's page shows that epoch's validation accuracy and the test score, once each
    assert done.returncode == 0, done.stderr[-3000:]
    (model,) = models_of(store, spool.run_id)
    metrics = MlflowClient(store).get_logged_model(model.model_id).metrics
    by_key = {m.key: (m.step, m.value) for m in metrics}
    assert len(by_key) == len(metrics)
    assert by_key["val_accuracy"] == (1, VAL_ACCURACY[1])
    assert by_key["test_accuracy"] == (0, 0.6667)


def test_a_spool_holding_a_link_is_refused_with_its_name_and_nothing_is_sent(
    spool, store, tmp_path
):
    # Given a spool in which an artifact is a link to a file outside it
    outside = tmp_path / "private.txt"
    outside.write_text("not for the store\n")
    (spool.dir / "artifacts" / "notes.txt").symlink_to(outside)

    # When it is uploaded
    done = upload(spool)

    # Then the upload stops with exit 2 and one line naming the link; the run is as it was
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("insect_exp.upload: error:") and "artifacts/notes.txt" in line
    client = MlflowClient(store)
    assert client.list_artifacts(spool.run_id) == []
    assert client.get_run(spool.run_id).info.status == "RUNNING"


def test_the_logged_model_shows_the_metrics_the_run_ended_with(tmp_path, folder, store):
    # Given a tiny run of three epochs that logs its model
    code, stderr, _ = run(f"dataset.root={folder}", "epochs=3", "mlflow.log_model=true",
                          cwd=tmp_path)  # fmt: skip
    assert code == 0, stderr[-3000:]

    # When its model is read from the store (what the UI's model page shows)
    found = only_run(store)
    (model,) = models_of(store, found.info.run_id)
    metrics = MlflowClient(store).get_logged_model(model.model_id).metrics

    # Then it has the last epoch's validation accuracy and the test accuracy, as the run does,
    # once each, and no per-batch values
    by_key = {m.key: (m.step, m.value) for m in metrics}
    assert len(by_key) == len(metrics)
    assert by_key["val_accuracy"] == (2, found.data.metrics["val_accuracy"])
    assert by_key["test_accuracy"][1] == found.data.metrics["test_accuracy"]
    assert not any(key.startswith("batch_") for key in by_key)
