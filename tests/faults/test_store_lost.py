"""The tracking server goes away mid-run: training goes on offline; the run is uploaded later."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.faults.conftest import environment, finish, server_epochs, start, wait_until
from tests.mlflow_server import MlflowServer


@pytest.mark.slow
def test_a_run_whose_server_stops_finishes_offline_and_uploads_when_it_is_back(
    tmp_path, folder, template_store
):
    # Given a run logging to a tracking server
    db = tmp_path / "server.db"
    db.write_bytes(template_store.read_bytes())
    artifacts = tmp_path / "artifacts"

    def serve() -> MlflowServer:
        server = MlflowServer(f"sqlite:///{db}", artifacts, tmp_path / "server.log")
        server.wait_ready()
        return server

    server = serve()
    url = server.url
    env = environment(MLFLOW_TRACKING_URI=url)
    process = start(
        f"dataset.root={folder}", "epochs=8", "mlflow.log_model=true",
        "mlflow.registered_model_name=insects", cwd=tmp_path, env=env,
    )  # fmt: skip
    try:
        wait_until(lambda: server_epochs(url) >= 1, timeout=180)

        # When the server stops in the middle of training
        server.stop()
        code, stderr = finish(process, timeout=600)
    finally:
        server.stop()

    # Then training still ends, and one line says where the run is saved and how to upload it
    assert code == 0, stderr[-3000:]
    line = [x for x in stderr.splitlines() if "upload it with" in x][-1]
    spool = line.rsplit("python -m insect_exp.upload ", 1)[1].strip()
    assert "the MLflow store was unreachable" in line

    # When the server is back and the saved run is uploaded
    server = serve()
    try:
        upload = subprocess.run(
            [sys.executable, "-m", "insect_exp.upload", spool, "--tracking-uri", server.url],
            capture_output=True, text=True, timeout=300, env=environment(),
        )  # fmt: skip
        assert upload.returncode == 0, upload.stderr[-3000:]

        # Then the run is FINISHED with all 8 epochs, its plots and its model
        client = MlflowClient(server.url)
        (found,) = client.search_runs([client.get_experiment_by_name("insect_exp").experiment_id])
        assert found.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(found.info.run_id, "val_loss"))
        assert steps == list(range(8))
        listed = {a.path for a in client.list_artifacts(found.info.run_id, "plots")}
        assert "plots/training_curves.png" in listed
        # And registered as the run asked, the version linked to the run
        (version,) = client.search_model_versions("name='insects'")
        assert version.run_id == found.info.run_id
        assert found.data.tags["registered_model"] == f"insects/{version.version}"
        code = (
            "import numpy as np, mlflow\n"
            f"mlflow.set_tracking_uri({server.url!r})\n"
            "m = mlflow.pyfunc.load_model('models:/insects/latest')\n"
            "print('SHAPE', np.asarray(m.predict(np.zeros((2, 32, 32, 3), 'float32'))).shape)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
            env=environment(),
        )  # fmt: skip
        assert "SHAPE (2, 3)" in out.stdout, out.stderr[-3000:]
    finally:
        server.stop()
