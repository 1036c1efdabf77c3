"""train.strategy on CPUs: mirrored over logical CPU devices, multi_worker as local processes.

Every run here is a `python -m insect_exp` process of its own: logical devices and a multi-worker
runtime can only be set up before TensorFlow starts, which in the test process it has.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from insect_exp import UserError
from insect_exp.config import ConfigError
from insect_exp.distribute import cluster_source, is_chief, peer_error_reason, per_replica_batch
from tests.conftest import assert_model_reloads, make_image_folder, run_cli

HANG_BOUND_S = 600  # a hang bound, not a speed check: runs here take seconds to a minute


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """18 train and 9 test images of 3 classes (the last test batch of 4 has 1 image)."""
    return make_image_folder(tmp_path_factory.mktemp("distribute") / "insects")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny hub-style feature-vector SavedModel (no download)."""
    from tests.models.conftest import TINY_FEATURES, export_tiny

    return export_tiny(tmp_path_factory.mktemp("hub") / "feature_vector", TINY_FEATURES)


def _args(folder: Path, store: str, model: str, backbone: Path, *extra: str) -> list[str]:
    args = [
        "dataset=insects", f"dataset.root={folder}", "epochs=2", "batch_size=4",
        "model.image_size=[32,32]", f"mlflow.tracking_uri={store}",
    ]  # fmt: skip
    if model == "hub":
        # A fine-tune stage too: a second compile under the strategy, and a trainable backbone.
        args += ["model=hub_mobilenet", f"model.handle={backbone}",
                 "model.fine_tune.enabled=true", "model.fine_tune.epochs=1"]  # fmt: skip
    return [*args, *extra]


def _store(tmp_path: Path, name: str = "mlruns") -> str:
    (tmp_path / name).mkdir(exist_ok=True)
    return f"sqlite:///{tmp_path / name / 'mlflow.db'}"


def _only_run(store: str):
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("insect_exp")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [(r.info.run_name, r.info.status) for r in runs]
    return client, experiment, runs[0]


def _history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(
    args: list[str], cwd: Path, count: int = 2, start: int | None = None
) -> list[subprocess.Popen]:
    """The same command once per worker (the first `start` of them), told apart only by
    TF_CONFIG; output in worker<i>.log."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(count)]}
    # A killed worker leaves its scratch checkpoints in its temp dir: the test's, not /tmp.
    (cwd / "tmp").mkdir(exist_ok=True)
    workers = []
    for index in range(count if start is None else start):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config),
               "INSECT_EXP_CACHE_DIR": str(cwd / "data"), "TMPDIR": str(cwd / "tmp")}  # fmt: skip
        with (cwd / f"worker{index}.log").open("w") as log:  # a file: a pipe could fill up
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "insect_exp", *args, "train.strategy=multi_worker"],
                    cwd=cwd,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            )
    return workers


def _output(cwd: Path, index: int) -> str:
    return (cwd / f"worker{index}.log").read_text(errors="replace")


def _finish(workers: list[subprocess.Popen], cwd: Path) -> list[tuple[int, str]]:
    """Each worker's exit code and output, once all have ended (killed after the hang bound)."""
    try:
        for worker in workers:
            worker.wait(timeout=HANG_BOUND_S)
    finally:
        _kill(workers)
    return [(worker.returncode, _output(cwd, i)) for i, worker in enumerate(workers)]


def _kill(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


# What a user sets up wrong: one line, exit 2, nothing logged


def test_multi_worker_without_a_cluster_stops_at_start_up_with_one_line(tmp_path, monkeypatch):
    # Given no TF_CONFIG and no SLURM job step
    for name in ("TF_CONFIG", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"

    # When the user asks for multi_worker
    out = run_cli("train.strategy=multi_worker", f"mlflow.tracking_uri={store}", cwd=tmp_path)

    # Then it stops at once, exit 2, one line naming what is missing, and no store or run
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "TF_CONFIG" in lines[0] and "srun" in lines[0]
    assert not (tmp_path / "mlruns").exists()


def test_a_worker_that_never_comes_up_stops_the_others_with_one_line(folder, backbone, tmp_path):
    # Given a two-worker cluster of which only worker 0 is started
    store = _store(tmp_path)
    args = [*_args(folder, store, "cnn", backbone), "train.worker_timeout_s=15"]
    (chief,) = _start_workers(args, tmp_path, count=2, start=1)

    # When the wait for the other worker runs out
    ((rc, out),) = _finish([chief], tmp_path)

    # Then worker 0 says which cluster did not come up, and opened no MLflow run
    assert rc != 0
    assert "insect_exp: error: not every worker of {'worker': ['127.0.0.1:" in out, out[-3000:]
    assert "came up within train.worker_timeout_s=15 s" in out and "Traceback" not in out
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}'},
         "TF_CONFIG"),
        ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2",
          "SLURM_STEP_NODELIST": "n[1-2]"}, "SLURM"),
    ],
)  # fmt: skip
def test_the_cluster_comes_from_tf_config_or_a_slurm_job_step(env, expected):
    assert cluster_source(env) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "neither is there"),
        ({"SLURM_JOB_ID": "7"}, "in SLURM job 7 but not in a job step: start it with srun"),
        ({"TF_CONFIG": "{not json"}, "TF_CONFIG is not valid JSON"),
        ({"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}}'}, 'TF_CONFIG needs "cluster" and "task"'),
    ],
)
def test_a_missing_or_broken_cluster_says_what_is_wrong(env, message):
    with pytest.raises(UserError, match=message):
        cluster_source(env)


def test_worker_0_is_the_chief_unless_the_cluster_has_a_chief_task():
    workers = {"worker": ["a:1", "b:1"]}
    assert is_chief("worker", 0, workers) and not is_chief("worker", 1, workers)
    with_chief = {"chief": ["c:1"], **workers}
    assert is_chief("chief", 0, with_chief) and not is_chief("worker", 0, with_chief)


def test_the_global_batch_is_split_across_replicas_and_must_cover_them():
    assert per_replica_batch(32, 4) == 8
    with pytest.raises(UserError, match="batch_size=2 is the global batch.*at least 4"):
        per_replica_batch(2, 4)


def test_strategy_options_are_checked(compose_cfg):
    assert compose_cfg("train.strategy=mirrored").train.strategy.value == "mirrored"
    with pytest.raises(ConfigError, match="train.logical_cpus=-1"):
        compose_cfg("train.logical_cpus=-1")
    with pytest.raises(ConfigError, match="train.worker_timeout_s=0"):
        compose_cfg("train.worker_timeout_s=0")


def test_a_lost_workers_reason_is_the_line_that_names_it():
    message = (
        'Graph execution error:\n\nDetected at node x defined at:\n  File "a.py", line 1\n'
        "Collective ops is aborted by: The following tasks are unhealthy (stopped sending "
        "heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed."
    )
    reason = peer_error_reason(message)
    assert (
        reason.startswith("Collective ops is aborted by")
        and "/job:worker/replica:0/task:1" in reason
    )


# mirrored over two logical CPU devices


def test_mirrored_over_two_cpu_devices_trains_the_cnn_as_one_device_does(
    folder, backbone, tmp_path
):
    # Given the same tiny run on one device and mirrored over two logical CPU devices, in float32
    # (bf16, which precision=auto picks where the CPU has it, rounds the two sums differently)
    one, two = _store(tmp_path, "one"), _store(tmp_path, "two")
    base = [*_args(folder, one, "cnn", backbone), "precision=float32"]
    out_one = run_cli(*base, cwd=tmp_path)
    mirrored = [
        *_args(folder, two, "cnn", backbone),
        "precision=float32",
        "train.strategy=mirrored",
        "train.logical_cpus=2",
    ]
    out_two = run_cli(*mirrored, cwd=tmp_path)

    # Then both end FINISHED; the start-up line names both devices
    assert out_one.returncode == 0, out_one.stderr[-3000:]
    assert out_two.returncode == 0, out_two.stderr[-3000:]
    assert (
        "training on 2 replica(s), strategy mirrored: CPU:0, CPU:1"
        in out_two.stdout + out_two.stderr
    )
    c1, _, run_one = _only_run(one)
    c2, experiment, run_two = _only_run(two)
    assert run_two.info.status == "FINISHED" and run_two.data.params["train.strategy"] == "mirrored"
    assert (run_one.data.tags["replicas"], run_two.data.tags["replicas"]) == ("1", "2")
    # and the global batch of 4 split 2 + 2 trains the same model: same steps, same losses
    for key in ("loss", "val_loss", "batch_loss"):
        expected = _history(c1, run_one.info.run_id, key)
        assert len(expected) == (10 if key == "batch_loss" else 2)
        np.testing.assert_allclose(_history(c2, run_two.info.run_id, key), expected, rtol=2e-3)
    # and the model reloads in a fresh process
    assert_model_reloads(two, experiment.experiment_id, tmp_path, HANG_BOUND_S)


def test_mirrored_trains_the_hub_model_with_features_extracted_once(folder, backbone, tmp_path):
    # Given the hub model with its frozen-feature cache and a fine-tune stage, mirrored
    store = _store(tmp_path)
    args = [
        *_args(folder, store, "hub", backbone),
        "train.strategy=mirrored",
        "train.logical_cpus=2",
    ]

    # When it trains
    out = run_cli(*args, cwd=tmp_path, env={"INSECT_EXP_CACHE_DIR": str(tmp_path / "data")})

    # Then one FINISHED run: every image through the backbone once, 3 epochs, a model that reloads
    assert out.returncode == 0, out.stderr[-3000:]
    client, experiment, run = _only_run(store)
    assert run.info.status == "FINISHED" and run.data.tags["replicas"] == "2"
    assert run.data.metrics["backbone_images_computed"] == 27  # 18 train + 9 test
    assert len(_history(client, run.info.run_id, "loss")) == 3
    assert np.isfinite(run.data.metrics["test_loss"])
    assert_model_reloads(store, experiment.experiment_id, tmp_path, HANG_BOUND_S)


# multi_worker as two local processes


@pytest.mark.parametrize("model", ["cnn", "hub"])
def test_two_workers_log_exactly_one_finished_run(folder, backbone, tmp_path, model):
    # Given two workers on 127.0.0.1, started with the same command and the same store
    store = _store(tmp_path)
    workers = _start_workers(_args(folder, store, model, backbone), tmp_path)

    # When both have run
    (rc0, out0), (rc1, out1) = _finish(workers, tmp_path)

    # Then both exit 0, and the store holds one FINISHED run: the chief's
    assert rc0 == 0, out0[-4000:]
    assert rc1 == 0, out1[-4000:]
    assert "this is worker 0 (the chief, logs the run)" in out0
    assert "worker 1 done; the chief (worker 0) logged the run" in out1
    client, experiment, run = _only_run(store)
    assert run.info.status == "FINISHED" and run.data.params["train.strategy"] == "multi_worker"
    assert run.data.tags["replicas"] == "2"  # one CPU device on each worker
    epochs = 3 if model == "hub" else 2
    assert len(_history(client, run.info.run_id, "loss")) == epochs
    # a batch's loss is the global batch's mean, not summed over the two workers
    batch_losses = _history(client, run.info.run_id, "batch_loss")
    assert len(batch_losses) == 5 * epochs
    assert max(batch_losses) < 2 * max(_history(client, run.info.run_id, "loss")), batch_losses
    if model == "hub":
        # the chief extracted every image's features once; the other worker read them
        assert run.data.metrics["backbone_images_computed"] == 27
        assert "backbone features: 27 computed, 0 reused" in out0
        assert "backbone features: 0 computed, 27 reused" in out1
    assert_model_reloads(store, experiment.experiment_id, tmp_path, HANG_BOUND_S)


def test_a_worker_that_dies_fails_the_chiefs_run_with_the_reason(folder, backbone, tmp_path):
    # Given two workers training for long
    store = _store(tmp_path)
    args = [*_args(folder, store, "cnn", backbone), "epochs=100000", "train.worker_timeout_s=60"]
    chief, worker = _start_workers(args, tmp_path)
    try:
        # When worker 1 is killed once the chief has logged an epoch
        deadline = time.monotonic() + HANG_BOUND_S
        while time.monotonic() < deadline and chief.poll() is None:
            if (tmp_path / "mlruns" / "mlflow.db").exists():
                client = MlflowClient(store)
                experiment = client.get_experiment_by_name("insect_exp")
                runs = client.search_runs([experiment.experiment_id]) if experiment else []
                if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
                    break
            time.sleep(1)
        assert chief.poll() is None, _output(tmp_path, 0)[-3000:]
        worker.send_signal(signal.SIGKILL)
        chief.wait(timeout=HANG_BOUND_S)
    finally:
        _kill([chief, worker])
    out = _output(tmp_path, 0)

    # Then the chief ends its run FAILED with the reason, and says so in one line
    assert chief.returncode == 1, out[-3000:]
    assert "error: a worker of the 2-worker cluster stopped answering" in out
    assert "Traceback" not in out
    _, _, run = _only_run(store)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("WorkerLost: a worker of the 2-worker cluster")
