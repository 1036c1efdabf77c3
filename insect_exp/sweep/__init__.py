"""Multiruns in MLflow: every job of a sweep becomes a child of one parent run with a summary.

How it fits together (all hooks are Hydra's; the callback is set in conf/config.yaml):

- `on_multirun_start`, in the launching process before any job: creates the experiment once
  (jobs racing to create it can file runs under Default), opens a RUNNING parent run and writes
  the ids to `<sweep dir>/mlflow_sweep.json`. Every launcher's jobs can read that file: the basic
  launcher's in-process jobs, joblib's loky workers, submitit's processes and, on a filesystem
  they share, SLURM nodes.
- each job: `train.run` asks `current_job` and opens its run as a child of the parent, in the
  parent's experiment, named by the overrides the sweep varies, with TensorFlow threads sized so
  that concurrent jobs share the cores.
- `on_job_end`, in the job's process: a failed job is recorded as a FAILED child with its error
  even if it died before opening a run, and its exception is made safe to send back to the
  launching process, so one failure never stops the other jobs.
- `on_multirun_end` (or at exit when Hydra stops early): the summary goes to the parent, which ends
  FINISHED when at least one child finished and FAILED when none did.

Exit code: 1 when any job failed, after every job has run (Hydra's own rule for its basic sweeper;
applied here to sweepers that tolerate failures too, such as Optuna's), 0 otherwise.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from insect_exp import UserError, commands, replicates
from insect_exp.config import RuntimeConfig
from insect_exp.errors import portable
from insect_exp.hardware import cpus
from insect_exp.sweep.context import (
    SWEEP_FILE,
    JobContext,
    SweepInfo,
    SweepPlan,
    current_job,
    read_sweep_file,
    short,
    sweep_plan,
    threads_per_job,
    varying_overrides,
)
from insect_exp.sweep.summary import (
    CURVE_METRIC,
    Summary,
    close_orphans,
    log_summary,
    optuna_best,
    summarise,
    to_csv,
    to_markdown,
)

__all__ = [
    "CURVE_METRIC",
    "SWEEP_FILE",
    "JobContext",
    "MlflowSweepCallback",
    "Summary",
    "SweepInfo",
    "SweepPlan",
    "current_job",
    "optuna_best",
    "read_sweep_file",
    "short",
    "summarise",
    "sweep_plan",
    "threads_per_job",
    "to_csv",
    "to_markdown",
    "varying_overrides",
]

log = logging.getLogger(__name__)


def _job_runtime(config: DictConfig, overrides: Sequence[str]) -> RuntimeConfig:
    """A job's runtime as its train.run sees it, read from the config Hydra gives the hooks."""
    hydra = config.hydra
    return RuntimeConfig(
        launch_dir=OmegaConf.select(hydra, "runtime.cwd", default=str(Path.cwd())),
        overrides=list(overrides),
        sweep_dir=str(hydra.sweep.dir),
        job_num=int(OmegaConf.select(hydra, "job.num", default=0)),
    )


class MlflowSweepCallback(Callback):
    """Hydra callback that groups a multirun in MLflow (see the module docstring)."""

    def __init__(self) -> None:
        # What on_multirun_start handed to the jobs; also travels, pickled, to joblib/submitit.
        self.sweep: SweepInfo | None = None
        self._open = False
        self._signals_at_start = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from insect_exp import resilience, tracking

        hydra = config.hydra
        task = list(hydra.overrides.task)
        # Config nodes, so dicts (OmegaConf's return type covers lists too).
        sweeper = cast(dict[str, Any], OmegaConf.to_container(hydra.sweeper, resolve=True))
        _check_replicates(config, task, sweeper)
        launch_dir = Path(OmegaConf.select(hydra, "runtime.cwd", default=str(Path.cwd())))
        sweep_dir = launch_dir / str(hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # Never let this sweep's jobs find a parent left by an earlier sweep in the same dir.
        (sweep_dir / SWEEP_FILE).unlink(missing_ok=True)
        uri = tracking.resolve_tracking_uri(config.mlflow.tracking_uri, launch_dir)
        experiment = config.mlflow.experiment_name
        with _store_errors_exit(uri, experiment):
            tracking.prepare_store(uri)
            # Once, before any job: jobs creating a new experiment at the same moment can file
            # their runs under Default (MLflow 3.17); they get this id instead.
            experiment_id = tracking.ensure_experiment(uri, experiment)

        launcher = cast(dict[str, Any], OmegaConf.to_container(hydra.launcher, resolve=True))
        plan = sweep_plan(task, sweeper)
        choices = hydra.runtime.choices
        tags = {
            **tracking.environment_tags(),
            **config.mlflow.tags,
            "sweep.dir": str(sweep_dir),
            "sweep.launcher": str(choices.get("hydra/launcher")),
            "sweep.sweeper": str(choices.get("hydra/sweeper")),
        }
        name = " ".join(["sweep", *(o for o in task if not o.startswith("mlflow."))])[:250]
        with _store_errors_exit(uri, experiment):  # the first write: a read-only user stops here
            parent = tracking.create_run(uri, experiment_id, name, tags)
        self.sweep = SweepInfo(
            tracking_uri=uri,
            experiment_id=experiment_id,
            parent_run_id=parent,
            constant_keys=plan.constant_keys,
            threads_per_job=threads_per_job(launcher, plan.batch_size, cpus()),
            sweep_dir=str(sweep_dir),
        )
        self._open = True
        self._signals_at_start = resilience.signal_count()
        # Hydra skips on_multirun_end when its sweeper raises for a failed job (or on Ctrl-C):
        # the summary and the parent's status are then written as the process exits. SIGTERM
        # (SLURM preemption, kill) must unwind like Ctrl-C for that to happen.
        atexit.register(self._close)
        resilience.interrupt_on_sigterm()
        tracking.Run(tracking.open_client(uri), parent).log_params(plan.params)
        self.sweep.write()
        log.info("MLflow parent run %s for this sweep in %s", parent, uri)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED:
            return
        if OmegaConf.select(config, "hydra.job.num", default=None) is None:
            return  # a single run reports its own error, traceback and all
        try:
            job_return.return_value  # noqa: B018  (the public getter raises the job's error)
        except BaseException as err:  # the job's own error, whatever it is
            error = err
        try:
            self._record_failure(config, job_return.overrides or [], error)
        finally:
            job_return.return_value = portable(error)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = self._close()
        if failed:
            # The same exit code Hydra gives a failed job under its basic sweeper. SystemExit passes
            # through Hydra's callback error handling, which only catches Exception.
            raise SystemExit(1)

    def _record_failure(self, config: DictConfig, overrides: Sequence[str], error: Any) -> None:
        """Make sure a failed job has a FAILED child with its error (it may die before train)."""
        from insect_exp import tracking

        job = current_job(_job_runtime(config, overrides))
        uri, experiment_id, parent = job.tracking_uri, job.experiment_id, job.parent_run_id
        if uri is None or experiment_id is None or parent is None:  # not nested in a sweep
            return
        children = tracking.child_runs(uri, experiment_id, parent)
        num = job.tags["sweep.job_num"]
        mine = [c for c in children if c.tags.get("sweep.job_num") == num]
        if mine:
            # train.run recorded its own error, unless its process died: the launcher then
            # reports the job (see hydra_plugins/insect_exp_launcher) and its run is still open.
            for child in mine:
                if child.status == "RUNNING":
                    tracking.open_client(uri).set_tag(child.run_id, "error", str(error)[:5000])
                    tracking.end_run(uri, child.run_id, "FAILED")
            return
        model = OmegaConf.select(config, "model.name", default="model")
        optimizer = OmegaConf.select(config, "optimizer.name", default="optimizer")
        name = tracking.run_name(model, optimizer, job.overrides)
        tags = {**job.tags, "error": f"{type(error).__name__}: {error}"[:5000]}
        run_id = tracking.create_run(uri, experiment_id, name, tags, parent)
        tracking.end_run(uri, run_id, "FAILED")

    def _close(self) -> int:
        """Write the summary to the parent and end it; return how many children failed."""
        if not self._open or self.sweep is None:
            return 0
        self._open = False
        from insect_exp import resilience, tracking

        interrupted = resilience.signal_count() > self._signals_at_start
        status = "KILLED" if interrupted else "FAILED"
        try:
            close_orphans(self.sweep, interrupted)
            summary = log_summary(self.sweep)
            if not interrupted:
                status = "FINISHED" if summary.finished else "FAILED"
            best = summary.best
            best_text = f"; best {best.name}: {best.metrics[CURVE_METRIC]:.4f}" if best else ""
            log.info(
                "sweep parent run %s: %d children finished, %d failed%s",
                self.sweep.parent_run_id,
                summary.finished,
                summary.failed,
                best_text,
            )
            uri = self.sweep.tracking_uri
            ui = tracking.ui_command(uri), tracking.ui_url(uri, self.sweep.experiment_id)
            print(f"MLflow sweep run id: {self.sweep.parent_run_id}")
            print(tracking.ui_footer(*ui, uri))
            return summary.failed
        finally:
            tracking.end_run(self.sweep.tracking_uri, self.sweep.parent_run_id, status)


def _check_replicates(config: DictConfig, task: Sequence[str], sweeper: dict[str, Any]) -> None:
    """Stop the sweep with one line and exit 2 when replicates=N cannot set its seeds."""
    try:
        count = int(OmegaConf.select(config, "replicates", default=1))
        seed = int(OmegaConf.select(config, "seed", default=0))
        replicates.check(count, seed, task, sweeper.get("params") or {})
    except UserError as err:  # Hydra logs and swallows a callback's exceptions
        print(f"insect_exp: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


@contextlib.contextmanager
def _store_errors_exit(uri: str, experiment: str) -> Iterator[None]:
    """A store that cannot be used, or refuses us, stops the sweep with one line and exit 2."""
    from insect_exp import tracking

    try:
        with tracking.refusals_named(uri, f"write to experiment {experiment!r}"):
            yield
    except tracking.StoreError as err:
        # Hydra logs and swallows a callback's exceptions; the sweep must not start.
        print(f"insect_exp: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


commands.make_callable(__name__)  # insect_exp.sweep(...) is insect_exp.api.sweep
