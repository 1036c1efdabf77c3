"""A diverging learning rate: the run stops in the batch the loss turns NaN, FAILED, no model."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from tests.faults.conftest import only_run, run


def test_a_nan_loss_fails_the_run_keeping_its_metrics_and_logging_no_model(tmp_path, folder, store):
    # When a run trains with a learning rate that makes the loss explode
    code, stderr, _ = run(
        f"dataset.root={folder}", "epochs=5", "optimizer.learning_rate=1e6",
        "mlflow.log_model=true", cwd=tmp_path,
    )  # fmt: skip

    # Then it exits 1 with one line saying where, and no traceback
    assert code == 1, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert "loss became NaN or infinite at epoch" in line and ", batch " in line
    assert "Traceback" not in stderr
    # And the run is FAILED with the reason, the batches before it kept, and no model
    found = only_run(store)
    assert found.info.status == "FAILED"
    assert "NaN" in found.data.tags["error"]
    client = MlflowClient(store)
    assert client.search_logged_models([found.info.experiment_id]) == []
    assert "config/config.yaml" in {
        a.path for a in client.list_artifacts(found.info.run_id, "config")
    }
