"""Sweeps in MLflow: one parent run per multirun, its jobs as children, a summary when it ends."""

from __future__ import annotations

import csv
import json
import os
import pickle
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from hydra.core.utils import JobReturn, JobStatus
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from insect_exp import sweep, tracking
from insect_exp.config import RuntimeConfig
from insect_exp.tracking import RunRecord
from insect_exp.tracking.lineage import SplitRecord
from insect_exp.tracking.spool import INPUTS_FILE, SPOOL_DIR, Spool
from insect_exp.upload import upload
from tests.sweeps import TINY, SweepResult, launcher_target, run_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
SUBMITIT_SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
# Hydra's default launcher, as Hydra composes hydra/launcher=basic (its class is Hydra's own).
BASIC = launcher_target("basic")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _rows(result: SweepResult, dest: Path) -> list[dict[str, str]]:
    path = result.download(result.parent.info.run_id, "summary/children.csv", dest)
    return list(csv.DictReader(path.open()))


# ---------------------------------------------------------------------------------------------
# A grid sweep on the basic launcher: the structure and summary a user browses in the UI


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> SweepResult:
    """`python -m insect_exp -m optimizer=adam,sgd` on tiny data, run once for this module."""
    return run_sweep(tmp_path_factory.mktemp("grid"), "optimizer=adam,sgd")


def test_sweep_jobs_are_children_of_one_parent_named_by_their_overrides(grid):
    # Given a finished two-job sweep
    assert grid.returncode == 0, grid.output

    # Then the store holds one FINISHED parent with two FINISHED children in one experiment
    assert grid.parent is not None, grid.output
    assert grid.parent.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in grid.parent.data.tags
    assert grid.parent.info.run_name.startswith("sweep ")
    assert {c.info.run_name: c.info.status for c in grid.children} == {
        "cnn-adam": "FINISHED",
        "cnn-sgd": "FINISHED",
    }
    assert grid.strays == []
    assert {c.info.experiment_id for c in grid.children} == {grid.experiment_id}
    # And nothing was filed under the Default experiment
    assert MlflowClient(grid.tracking_uri).search_runs(["0"]) == []
    # And the parent says what was swept
    assert grid.parent.data.params["optimizer"] == "adam,sgd"
    assert grid.parent.data.tags["sweep.launcher"] == "basic"


def test_sweep_parent_gets_a_summary_table_best_metric_and_overlay_plot(grid, tmp_path):
    # Given a finished two-job sweep
    assert grid.parent is not None, grid.output
    children = {c.info.run_name: c for c in grid.children}

    # When the parent's summary table is read back
    rows = {row["run_name"]: row for row in _rows(grid, tmp_path)}

    # Then it has one row per child with its override, status and final metrics
    assert set(rows) == {"cnn-adam", "cnn-sgd"}
    for name, row in rows.items():
        assert row["status"] == "FINISHED"
        assert row["optimizer"] == name.split("-")[1]
        assert row["run_id"] == children[name].info.run_id
        assert float(row["val_accuracy"]) == pytest.approx(
            children[name].data.metrics["val_accuracy"]
        )
    # And the best child's val_accuracy is a parent metric, the best child a tag
    by_job = sorted(grid.children, key=lambda c: int(c.data.tags["sweep.job_num"]))
    best = max(by_job, key=lambda c: c.data.metrics["val_accuracy"])  # ties: the earliest job
    metrics = grid.parent.data.metrics
    assert metrics["best_val_accuracy"] == pytest.approx(best.data.metrics["val_accuracy"])
    assert metrics["jobs_finished"] == 2 and metrics["jobs_failed"] == 0
    assert grid.parent.data.tags["best_run_id"] == best.info.run_id
    # And an overlay of the children's validation curves is a PNG, beside a Markdown table
    plot = grid.download(grid.parent.info.run_id, "summary/val_accuracy.png", tmp_path)
    assert plot.read_bytes()[:8] == PNG_MAGIC
    table = grid.download(grid.parent.info.run_id, "summary/children.md", tmp_path)
    assert "| cnn-adam | FINISHED | adam |" in table.read_text()


def test_failing_job_is_recorded_failed_and_the_other_jobs_still_run(tmp_path):
    # Given a sweep whose second job points at a folder that does not exist
    missing = tmp_path / "missing"

    # When it runs
    result = run_sweep(tmp_path, f"dataset.root={{folder}},{missing}")

    # Then the command exits 1 after both jobs ran, naming the failed job's overrides
    assert result.returncode == 1, result.output
    assert f"dataset.root={missing}" in result.process.stderr
    # And the failed job is a FAILED child with its error, the other one FINISHED
    by_status = {c.info.status: c for c in result.children}
    assert set(by_status) == {"FINISHED", "FAILED"}, result.output
    assert "is not a directory" in by_status["FAILED"].data.tags["error"]
    # And the parent still ends FINISHED with a summary listing both
    assert result.parent.info.status == "FINISHED"
    assert result.parent.data.metrics["jobs_failed"] == 1
    rows = {row["status"]: row for row in _rows(result, tmp_path / "dl")}
    assert "is not a directory" in rows["FAILED"]["error"]
    assert rows["FINISHED"]["val_accuracy"] != ""


# ---------------------------------------------------------------------------------------------
# Launchers and the Optuna search


@pytest.mark.slow
def test_joblib_runs_jobs_in_parallel_into_one_store_without_losing_runs_or_metrics(tmp_path):
    # Given a mixed CNN/TF Hub sweep on 2 joblib workers, two epochs each, one SQLite store
    from tests.models.conftest import export_tiny

    handle = export_tiny(tmp_path / "hub" / "feature_vector", outputs=8)

    # When it runs
    result = run_sweep(
        tmp_path,
        "model=cnn,hub_mobilenet",
        "optimizer=adam,sgd",
        "epochs=2",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        env={"INSECT_EXP_HUB_HANDLE": str(handle)},
    )

    # Then every job's run is a FINISHED child with every epoch and batch metric
    assert result.returncode == 0, result.output
    names = {"cnn-adam", "cnn-sgd", "hub_mobilenet-adam", "hub_mobilenet-sgd"}
    assert {c.info.run_name for c in result.children} == names
    assert result.strays == []
    client = MlflowClient(result.tracking_uri)
    for child in result.children:
        assert child.info.status == "FINISHED"
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert sorted(steps) == [0, 1], (child.info.run_name, key)
        # 18 images in batches of 4: 5 steps an epoch
        assert len(client.get_metric_history(child.info.run_id, "batch_loss")) == 10
        # And the two concurrent jobs split the cores between their TensorFlow thread pools
        assert child.data.tags["sweep.threads_per_job"] == str(max(1, _cpus() // 2))
    assert result.parent.data.metrics["jobs_finished"] == 4


@pytest.mark.slow
def test_submitit_local_gives_the_same_structure_and_survives_a_failed_job(tmp_path):
    # Given a sweep on submitit's local executor (the SLURM launcher's code path), one job failing
    missing = tmp_path / "missing"

    # When it runs
    result = run_sweep(
        tmp_path, "hydra/launcher=submitit_local", f"dataset.root={{folder}},{missing}"
    )

    # Then, as with the basic launcher, both jobs are children and the failure is recorded
    assert result.returncode == 1, result.output
    statuses = sorted(c.info.status for c in result.children)
    assert statuses == ["FAILED", "FINISHED"], result.output
    assert result.parent.info.status == "FINISHED"
    assert result.parent.data.tags["sweep.launcher"] == "submitit_local"
    assert result.strays == []


@pytest.mark.slow
def test_optuna_search_runs_its_trials_as_children_and_logs_the_best_params(tmp_path):
    # Given the Optuna search preset cut to 3 trials (no -m needed: the preset is a multirun),
    # batch_size left free (a value on the command line would fix it)
    tiny = [o for o in TINY if not o.startswith("batch_size=")]

    # When it runs
    result = run_sweep(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=3", tiny=tiny)

    # Then its 3 trials are FINISHED children
    assert result.returncode == 0, result.output
    assert len(result.children) == 3
    assert all(c.info.status == "FINISHED" for c in result.children)
    # And the parent holds the study's best parameters, which are one trial's parameters
    params = result.parent.data.params
    best = {k.removeprefix("best."): v for k, v in params.items() if k.startswith("best.")}
    assert set(best) == {"optimizer.learning_rate", "batch_size", "model.dropout"}
    tried = [{k: c.data.params[k] for k in best} for c in result.children]
    assert {k: float(v) for k, v in best.items()} in [
        {k: float(v) for k, v in t.items()} for t in tried
    ]
    best_value = result.parent.data.metrics["optuna_best_value"]
    assert best_value == pytest.approx(result.parent.data.metrics["best_val_accuracy"])
    # And the search space is on the parent
    assert params["optimizer.learning_rate"].startswith("tag(log, interval(")


# ---------------------------------------------------------------------------------------------
# The callback's hooks in process, with jobs stood in for by runs logged directly


def _start_sweep(tmp_path: Path, tracking_uri: str) -> tuple[sweep.MlflowSweepCallback, Any]:
    """on_multirun_start for a `seed=1,2` sweep; returns the callback and the config it saw."""
    config = OmegaConf.create(
        {
            "mlflow": {"tracking_uri": tracking_uri, "experiment_name": "insect_exp", "tags": {}},
            "hydra": {
                "sweep": {"dir": str(tmp_path / "sweep")},
                "sweeper": {"max_batch_size": None, "params": None},
                "launcher": {"_target_": BASIC},
                "overrides": {"task": ["seed=1,2"]},
                "runtime": {"choices": {"hydra/launcher": "basic", "hydra/sweeper": "basic"}},
            },
        }
    )
    callback = sweep.MlflowSweepCallback()
    callback.on_multirun_start(config)
    return callback, config


def _job(handoff: sweep.SweepInfo, num: int, status: str) -> None:
    """What a job does with the hand-off file: a child run, ended with `status`."""
    uri = handoff.tracking_uri
    tags = {"sweep.job_num": str(num), "sweep.overrides": f'["seed={num}"]'}
    run_id = tracking.create_run(
        uri, handoff.experiment_id, f"seed={num}", tags, handoff.parent_run_id
    )
    if status == "FINISHED":
        tracking.Run(MlflowClient(uri), run_id).log_metrics({"val_accuracy": 0.5})
    tracking.end_run(uri, run_id, status)


def test_sweep_with_a_failed_job_ends_its_parent_finished_and_exits_1(tmp_path, tracking_uri):
    # Given a sweep started by the callback, which leaves the ids for its jobs in the sweep dir
    callback, config = _start_sweep(tmp_path, tracking_uri)
    handoff = sweep.read_sweep_file(tmp_path / "sweep")
    assert handoff.constant_keys == [] and handoff.threads_per_job == 0

    # When one job finishes and one fails, and a tolerant sweeper (Optuna's) ends the sweep
    _job(handoff, 0, "FINISHED")
    _job(handoff, 1, "FAILED")
    with pytest.raises(SystemExit) as exit_info:
        callback.on_multirun_end(config)

    # Then the command exits 1, and the parent ends FINISHED with the failure counted
    assert exit_info.value.code == 1
    parent = MlflowClient(tracking_uri).get_run(handoff.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["jobs_failed"] == 1
    assert parent.data.params["seed"] == "1,2"


def test_a_job_whose_run_went_offline_is_named_with_its_spool_and_upload_ends_it_true(
    tmp_path, tracking_uri
):
    # Given a sweep where one job finished and the other's run went offline mid-way (the store
    # failed one of its writes): the job ended, its run is RUNNING in the store and the rest of
    # its record, ending and all, is in a spool in its job dir
    callback, config = _start_sweep(tmp_path, tracking_uri)
    handoff = sweep.read_sweep_file(tmp_path / "sweep")
    _job(handoff, 0, "FINISHED")
    tags = {"sweep.job_num": "1", "sweep.overrides": '["seed=1"]'}
    run_id = tracking.create_run(
        tracking_uri, handoff.experiment_id, "seed=1", tags, handoff.parent_run_id
    )
    spool = Spool(tmp_path / "sweep" / "1" / SPOOL_DIR, run_id, tracking_uri, handoff.experiment_id)
    spool.open()
    spool.metrics([Metric("val_accuracy", 0.75, 0, 0)])
    split = SplitRecord("train", "insects-train", "/data", "abc123", {"images": 90})
    spool.artifact(INPUTS_FILE).write_text(json.dumps([asdict(split)]))
    spool.finish("FINISHED")

    # When the sweep ends
    with pytest.raises(SystemExit):
        callback.on_multirun_end(config)

    # Then that run is not "job process died": it is FAILED with the command that uploads it
    client = MlflowClient(tracking_uri)
    offline = client.get_run(run_id)
    assert offline.info.status == "FAILED"
    assert offline.data.tags["error"].endswith(f"python -m insect_exp.upload {spool.dir}")

    # And uploading the spool gives it its true ending, with no error left on it
    upload(spool.dir)
    offline = client.get_run(run_id)
    assert offline.info.status == "FINISHED" and "error" not in offline.data.tags
    assert offline.data.metrics["val_accuracy"] == 0.75
    (logged,) = offline.inputs.dataset_inputs  # its dataset, as an MLflow input again
    assert (logged.dataset.name, logged.dataset.digest) == ("insects-train", "abc123")


def test_sweep_where_every_job_failed_ends_its_parent_failed(tmp_path, tracking_uri):
    # Given a sweep whose only job failed
    callback, config = _start_sweep(tmp_path, tracking_uri)
    handoff = sweep.read_sweep_file(tmp_path / "sweep")
    _job(handoff, 0, "FAILED")

    # When it ends, Then the parent is FAILED too
    with pytest.raises(SystemExit):
        callback.on_multirun_end(config)
    parent = MlflowClient(tracking_uri).get_run(handoff.parent_run_id)
    assert parent.info.status == "FAILED"


# ---------------------------------------------------------------------------------------------
# The pure parts: planning, thread shares, the summary table


def _record(job: int, name: str, status: str, val: float | None, **tags: str) -> RunRecord:
    metrics = {} if val is None else {"val_accuracy": val, "loss": 1.0, "batch_loss": 2.0}
    return RunRecord(
        run_id=f"id{job}",
        name=name,
        status=status,
        tags={"sweep.job_num": str(job), "sweep.overrides": f'["optimizer={name}"]', **tags},
        metrics=metrics,
        history={"val_accuracy": [] if val is None else [val / 2, val]},
    )


def test_summary_lists_children_in_job_order_and_picks_the_best_finished_one():
    # Given three children, one of them failed
    children = [
        _record(2, "sgd", "FINISHED", 0.5),
        _record(0, "adam", "FINISHED", 0.75),
        _record(1, "rmsprop", "FAILED", None, error="DatasetError: no images"),
    ]

    # When the sweep is summarised
    summary = sweep.summarise(children)

    # Then rows follow job order with overrides, metrics (no per-batch ones) and errors
    assert [r["run_name"] for r in summary.rows] == ["adam", "rmsprop", "sgd"]
    assert summary.columns[:4] == ["job", "run_name", "status", "optimizer"]
    assert "batch_loss" not in summary.columns
    assert summary.rows[1]["error"] == "DatasetError: no images"
    assert (summary.best.name, summary.finished, summary.failed) == ("adam", 2, 1)
    assert summary.curves == {"adam": [0.375, 0.75], "sgd": [0.25, 0.5]}
    # And the CSV and Markdown renderings hold every row
    rows = list(csv.DictReader(sweep.to_csv(summary.columns, summary.rows).splitlines()))
    assert [r["status"] for r in rows] == ["FINISHED", "FAILED", "FINISHED"]
    markdown = sweep.to_markdown(summary.columns, summary.rows).splitlines()
    assert len(markdown) == 2 + 3 and markdown[2].startswith("| 0 | adam | FINISHED | adam |")


def test_summary_of_a_sweep_where_every_job_failed_has_no_best():
    summary = sweep.summarise([_record(0, "adam", "FAILED", None)])
    assert (summary.best, summary.finished, summary.failed) == (None, 0, 1)


def test_sweep_plan_separates_swept_keys_from_constant_ones():
    # A grid from the command line: 2 x 2 jobs, all in one batch
    plan = sweep.sweep_plan(
        ["experiment=debug", "model=cnn,hub_mobilenet", "optimizer=adam,sgd"], {}
    )
    assert plan.constant_keys == ["experiment"]
    assert plan.params == {
        "experiment": "debug",
        "model": "cnn,hub_mobilenet",
        "optimizer": "adam,sgd",
    }
    assert plan.batch_size == 4

    # An Optuna search: the search space comes from the sweeper's params, trials in batches
    optuna = {"n_trials": 20, "n_jobs": 2, "params": {"batch_size": "choice(8, 16)"}}
    plan = sweep.sweep_plan(["hparams_search=optuna"], optuna)
    assert plan.constant_keys == ["hparams_search"]
    assert plan.params["batch_size"] == "choice(8, 16)"
    assert plan.batch_size == 2


@pytest.mark.parametrize(
    ("launcher", "batch", "cpus", "threads"),
    [
        ({"_target_": BASIC}, 4, 16, 0),  # one job at a time: TensorFlow's default
        ({"_target_": JOBLIB, "n_jobs": 2}, 4, 16, 8),
        ({"_target_": JOBLIB, "n_jobs": -1}, 4, 16, 4),  # every core, but only 4 jobs
        ({"_target_": JOBLIB, "n_jobs": -1}, 8, 2, 1),
        ({"_target_": SUBMITIT_LOCAL, "cpus_per_task": None}, 2, 16, 8),
        ({"_target_": SUBMITIT_LOCAL, "cpus_per_task": 3}, 8, 16, 3),
        ({"_target_": SUBMITIT_SLURM, "cpus_per_task": None}, 8, 16, 0),  # its own allocation
    ],
)
def test_parallel_jobs_share_the_cores_between_their_tensorflow_threads(
    launcher, batch, cpus, threads
):
    assert sweep.threads_per_job(launcher, batch, cpus) == threads


def test_varying_overrides_name_the_run_and_long_floats_are_shortened():
    overrides = ["experiment=debug", "optimizer.learning_rate=0.0024713734184878826", "seed=1"]
    assert sweep.varying_overrides(overrides, ["experiment", "seed"]) == [overrides[1]]
    assert sweep.short(overrides[1]) == "optimizer.learning_rate=0.002471"
    assert sweep.short("dataset.root=/data/v1.2") == "dataset.root=/data/v1.2"


def test_outside_a_multirun_a_job_logs_a_plain_run():
    job = sweep.current_job(RuntimeConfig(overrides=["optimizer=sgd"]))
    assert (job.parent_run_id, job.experiment_id, job.threads) == (None, None, 0)
    assert job.overrides == ["optimizer=sgd"]


class _NeedsTwoArgs(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def test_a_failed_jobs_error_is_made_safe_to_send_back_to_the_launching_process():
    # Given a job that failed with an exception pickle cannot rebuild
    returned = JobReturn(overrides=["optimizer=sgd"], status=JobStatus.FAILED)
    returned.return_value = _NeedsTwoArgs("out of memory", 137)

    # When the callback sees the job end
    config = OmegaConf.create({"hydra": {"job": {"num": 0}, "sweep": {"dir": "nowhere"}}})
    sweep.MlflowSweepCallback().on_job_end(config=config, job_return=returned)

    # Then the error that goes back to the launcher pickles and keeps its message
    with pytest.raises(Exception) as raised:
        returned.return_value  # noqa: B018  (Hydra's getter raises a failed job's error)
    error = pickle.loads(pickle.dumps(raised.value))
    assert "_NeedsTwoArgs: out of memory" in str(error)


def test_a_sweep_prints_where_its_runs_are_once_shell_quoted(tmp_path):
    # Given a launch directory whose path holds a space
    root = tmp_path / "my sweeps"

    # When a sweep of two jobs runs there
    result = run_sweep(root, "seed=1,2")

    # Then it prints the UI footer once, not once per job
    assert result.returncode == 0, result.output
    out = result.process.stdout
    opens = [line for line in out.splitlines() if line.startswith("Open the UI: ")]
    exports = [line for line in out.splitlines() if "export MLFLOW_TRACKING_URI=" in line]
    assert len(opens) == 1 and len(exports) == 1, out
    # And both commands paste into a shell as they are: the store's URI stays one word
    ui = shlex.split(opens[0].removeprefix("Open the UI: "))
    assert ui[:4] == ["mlflow", "ui", "--backend-store-uri", result.tracking_uri], ui
    export = shlex.split(exports[0].split(": ", 1)[1])
    assert export == ["export", f"MLFLOW_TRACKING_URI={result.tracking_uri}"]
    # And it names the parent run, whose children are the two jobs
    assert f"MLflow sweep run id: {result.parent.info.run_id}" in out
    assert len(result.children) == 2
