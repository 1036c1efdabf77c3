"""train.ema across a kill: the resumed run goes on with the average the checkpoint kept."""

from __future__ import annotations

import signal

import pytest
from mlflow.tracking import MlflowClient

from insect_exp import resilience
from tests.faults.conftest import (
    epochs_logged,
    finish,
    interrupt,
    only_run,
    run,
    start,
    steps,
    wait_until,
)

EMA = ("deterministic=true", "seed=7", "train.ema.enabled=true", "train.ema.decay=0.9")


def test_an_ema_run_killed_outright_resumes_to_the_uninterrupted_result(tmp_path, folder, store):
    # Given a deterministic run with train.ema killed with SIGKILL after its first checkpoint
    process = start(f"dataset.root={folder}", *EMA, "epochs=40", "mlflow.run_name=killed",
                    cwd=tmp_path)  # fmt: skip
    wait_until(lambda: _checkpointed(store), process=process)
    interrupt(process, signal.SIGKILL)
    finish(process, timeout=60)
    client = MlflowClient(store)
    (killed,) = client.search_runs(["1"])
    run_id = killed.info.run_id
    done = len(steps(store, run_id, "loss"))

    # When it is resumed to one more epoch, and the same run is trained to as many epochs
    # without interruption
    code, stderr, _ = run(f"resume={run_id}", f"epochs={done + 1}", cwd=tmp_path)
    assert code == 0, stderr[-2000:]
    code, stderr, _ = run(f"dataset.root={folder}", *EMA, f"epochs={done + 1}",
                          "mlflow.run_name=whole", cwd=tmp_path)  # fmt: skip
    assert code == 0, stderr[-2000:]

    # Then both score the same epoch by epoch: the averaged model and the raw weights alike
    (whole,) = [r for r in client.search_runs(["1"]) if r.info.run_name == "whole"]
    for key in ("val_loss", "val_loss_raw", "test_loss"):
        resumed = _values(client, run_id, key)
        assert resumed == pytest.approx(_values(client, whole.info.run_id, key), rel=1e-3), key
    assert len(_values(client, run_id, "val_loss")) == done + 1
    assert int(client.get_run(run_id).data.tags["resumed_after_epoch"]) >= 1


def _checkpointed(store: str) -> bool:
    """Whether the store's one run has logged an epoch and written its checkpoint."""
    if epochs_logged(store) < 1:
        return False
    directory = only_run(store).data.tags.get("checkpoint_dir")
    return directory is not None and resilience.read_state(directory) is not None


def _values(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
