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
import csv
import io
import json
import logging
import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from insect_exp.tracking import RunRecord

log = logging.getLogger(__name__)

SWEEP_FILE = "mlflow_sweep.json"
CURVE_METRIC = "val_accuracy"  # what the task function returns and sweepers optimise
SUMMARY_DIR = "summary"
# Summary columns first in this order, then any other metric alphabetically.
_METRIC_ORDER = ("val_accuracy", "val_loss", "accuracy", "loss", "test_accuracy", "test_loss")


@dataclass(frozen=True)
class JobContext:
    """Where a job logs: inside a multirun its parent run and experiment, outside one nothing."""

    # The overrides that name the run: inside a sweep only those the sweep varies.
    overrides: list[str]
    tracking_uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    # TensorFlow intra-op threads; 0 leaves TensorFlow's default (every core).
    threads: int = 0
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepPlan:
    """What the launching process knows of a sweep before its jobs run."""

    # Every override that defines the sweep, by key, as the user wrote its value.
    params: dict[str, str]
    # Keys whose value is the same in every job: left out of run names.
    constant_keys: list[str]
    # How many jobs start at once at most, when it can be told in advance.
    batch_size: int | None


@dataclass
class Summary:
    """The table, curves and counts a parent run gets when its sweep ends."""

    columns: list[str]
    rows: list[dict[str, Any]]
    curves: dict[str, list[float]]
    best: RunRecord | None  # the finished child with the highest val_accuracy
    finished: int
    failed: int


def current_job(overrides: Sequence[str]) -> JobContext:
    """The sweep context of the running Hydra job (an empty one outside a multirun)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return JobContext(list(overrides))
    hc = HydraConfig.get()
    sweep = read_sweep_file(Path(hc.runtime.cwd) / str(hc.sweep.dir))
    if sweep is None:
        log.warning(
            "no %s in the sweep dir: this job's run is not nested under a parent", SWEEP_FILE
        )
        return JobContext(list(overrides))
    varying = varying_overrides(overrides, sweep["constant_keys"])
    return JobContext(
        overrides=[_short(o) for o in varying],
        tracking_uri=sweep["tracking_uri"],
        experiment_id=sweep["experiment_id"],
        parent_run_id=sweep["parent_run_id"],
        threads=int(sweep["threads_per_job"]),
        tags={
            "sweep.job_num": str(hc.job.num),
            "sweep.overrides": json.dumps(varying),
            "sweep.threads_per_job": str(sweep["threads_per_job"]),
        },
    )


def read_sweep_file(sweep_dir: str | Path) -> dict[str, Any] | None:
    """The ids `on_multirun_start` left in a sweep dir, or None."""
    path = Path(sweep_dir) / SWEEP_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def varying_overrides(overrides: Iterable[str], constant_keys: Iterable[str]) -> list[str]:
    """The job's overrides whose key the sweep varies."""
    constant = set(constant_keys)
    return [o for o in overrides if o.split("=", 1)[0] not in constant]


def sweep_plan(task_overrides: Sequence[str], sweeper: Mapping[str, Any]) -> SweepPlan:
    """Read the sweep's overrides (command line plus `hydra.sweeper.params`) before it runs."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from_config = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*from_config, *task_overrides])
    params = {o.get_key_element(): o.input_line.split("=", 1)[1] for o in parsed}
    constant = [o.get_key_element() for o in parsed if not o.is_sweep_override()]
    if "n_trials" in sweeper:  # Optuna: trials go out in batches of n_jobs
        batch = min(int(sweeper["n_trials"]), int(sweeper.get("n_jobs") or 1))
    else:
        try:
            (jobs,) = BasicSweeper.split_arguments(parsed, None)
            batch = min(len(jobs), sweeper.get("max_batch_size") or len(jobs))
        except Exception:  # a sweeper or sweep syntax this cannot count
            batch = None
    return SweepPlan(params, constant, batch)


def threads_per_job(launcher: Mapping[str, Any], batch_size: int | None, cpus: int) -> int:
    """TensorFlow threads for each job so that concurrent jobs share the cores, 0 for the default.

    Args:
        launcher: the `hydra.launcher` config node.
        batch_size: most jobs the sweeper starts at once, if known.
        cpus: cores of this machine.
    """
    target = str(launcher.get("_target_", ""))
    if launcher.get("cpus_per_task"):  # submitit: what each job asked for (on SLURM, all it gets)
        return int(launcher["cpus_per_task"])
    if "joblib" in target:
        n_jobs = int(launcher.get("n_jobs") or -1)
        parallel = n_jobs if n_jobs > 0 else max(1, cpus + 1 + n_jobs)  # joblib: -1 = every core
    elif target.endswith("LocalLauncher"):  # submitit's local executor starts every job at once
        parallel = batch_size or cpus
    else:  # the basic launcher runs one job at a time; a SLURM job sees only its allocation
        return 0
    if batch_size:
        parallel = min(parallel, batch_size)
    return 0 if parallel <= 1 else max(1, cpus // parallel)


def summarise(children: Sequence[RunRecord], metric: str = CURVE_METRIC) -> Summary:
    """Table rows, curves, best child and counts from a sweep's child runs."""
    ordered = sorted(children, key=lambda r: (_job_num(r) is None, _job_num(r) or 0, r.name))
    rows, override_keys, metric_keys, curves = [], [], set(), {}
    for child in ordered:
        overrides = json.loads(child.tags.get("sweep.overrides", "[]"))
        values = dict(o.split("=", 1) for o in overrides)
        override_keys += [k for k in values if k not in override_keys]
        metrics = {k: v for k, v in child.metrics.items() if not k.startswith("batch_")}
        metric_keys |= metrics.keys()
        job = _job_num(child)
        row = {"job": "" if job is None else job, "run_name": child.name, "status": child.status}
        error = child.tags.get("error", "")
        rows.append({**row, **values, **metrics, "error": error, "run_id": child.run_id})
        if child.history.get(metric):
            label = child.name if child.name not in curves else f"{child.name} (#{job})"
            curves[label] = child.history[metric]
    ranked = [m for m in _METRIC_ORDER if m in metric_keys]
    ranked += sorted(metric_keys - set(ranked))
    columns = ["job", "run_name", "status", *override_keys, *ranked, "error", "run_id"]
    finished = [r for r in ordered if r.status == "FINISHED"]
    scored = [r for r in finished if metric in r.metrics]
    best = max(scored, key=lambda r: r.metrics[metric]) if scored else None
    failed = sum(r.status == "FAILED" for r in ordered)
    return Summary(columns, rows, curves, best, len(finished), failed)


def to_csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary table as CSV, one row per child."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_markdown(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary table as Markdown, readable in MLflow's artifact viewer."""

    def cell(value: Any) -> str:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class MlflowSweepCallback(Callback):
    """Hydra callback that groups a multirun in MLflow (see the module docstring)."""

    def __init__(self) -> None:
        # What on_multirun_start handed to the jobs; also travels, pickled, to joblib/submitit.
        self.sweep: dict[str, Any] | None = None
        self._open = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from insect_exp import tracking

        hydra = config.hydra
        launch_dir = Path.cwd()
        sweep_dir = launch_dir / str(hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # Never let this sweep's jobs find a parent left by an earlier sweep in the same dir.
        (sweep_dir / SWEEP_FILE).unlink(missing_ok=True)
        uri = tracking.resolve_tracking_uri(config.mlflow.tracking_uri, launch_dir)
        # Once, before any job: jobs creating a new experiment at the same moment can file their
        # runs under Default (MLflow 3.17); they get this id instead.
        experiment_id = tracking.ensure_experiment(uri, config.mlflow.experiment_name)

        task = list(hydra.overrides.task)
        plan = sweep_plan(task, OmegaConf.to_container(hydra.sweeper, resolve=True))
        launcher = OmegaConf.to_container(hydra.launcher, resolve=True)
        choices = hydra.runtime.choices
        tags = {
            **tracking.environment_tags(launch_dir),
            **config.mlflow.tags,
            "sweep.dir": str(sweep_dir),
            "sweep.launcher": str(choices.get("hydra/launcher")),
            "sweep.sweeper": str(choices.get("hydra/sweeper")),
        }
        name = " ".join(["sweep", *(o for o in task if not o.startswith("mlflow."))])[:250]
        parent = tracking.create_run(uri, experiment_id, name, tags)
        self.sweep = {
            "tracking_uri": uri,
            "experiment_id": experiment_id,
            "parent_run_id": parent,
            "constant_keys": plan.constant_keys,
            "threads_per_job": threads_per_job(launcher, plan.batch_size, _cpus()),
            "sweep_dir": str(sweep_dir),
        }
        self._open = True
        # Hydra skips on_multirun_end when its sweeper raises for a failed job (or on Ctrl-C):
        # the summary and the parent's status are then written as the process exits.
        atexit.register(self._close)
        tracking.log_to_run(uri, parent, params=plan.params)
        tmp = sweep_dir / f".{SWEEP_FILE}.tmp"
        tmp.write_text(json.dumps(self.sweep, indent=2) + "\n")
        tmp.replace(sweep_dir / SWEEP_FILE)  # jobs never read a half-written file
        log.info("MLflow parent run %s for this sweep in %s", parent, uri)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if job_return.status != JobStatus.FAILED:
            return
        if OmegaConf.select(config, "hydra.mode") not in (RunMode.MULTIRUN, "MULTIRUN"):
            return  # a single run reports its own error, traceback and all
        error = job_return._return_value  # the public getter re-raises it
        try:
            self._record_failure(config, job_return.overrides or [], error)
        finally:
            job_return.return_value = _portable(error)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = self._close()
        if failed:
            # The same exit code Hydra gives a failed job under its basic sweeper. SystemExit passes
            # through Hydra's callback error handling, which only catches Exception.
            raise SystemExit(1)

    def _record_failure(self, config: DictConfig, overrides: Sequence[str], error: Any) -> None:
        """Make sure a failed job has a FAILED child with its error (it may die before train)."""
        from insect_exp import tracking

        job = current_job(overrides)
        if job.parent_run_id is None:
            return
        children = tracking.child_runs(job.tracking_uri, job.experiment_id, job.parent_run_id)
        num = job.tags["sweep.job_num"]
        if any(c.tags.get("sweep.job_num") == num for c in children):
            return  # train.run opened the run and recorded the error itself
        model = OmegaConf.select(config, "model.name", default="model")
        optimizer = OmegaConf.select(config, "optimizer.name", default="optimizer")
        name = tracking.run_name(model, optimizer, job.overrides)
        tags = {**job.tags, "error": f"{type(error).__name__}: {error}"[:5000]}
        run_id = tracking.create_run(
            job.tracking_uri, job.experiment_id, name, tags, job.parent_run_id
        )
        tracking.end_run(job.tracking_uri, run_id, "FAILED")

    def _close(self) -> int:
        """Write the summary to the parent and end it; return how many children failed."""
        if not self._open or self.sweep is None:
            return 0
        self._open = False
        from insect_exp import plots, tracking

        uri, parent = self.sweep["tracking_uri"], self.sweep["parent_run_id"]
        status = "FAILED"
        try:
            children = tracking.child_runs(
                uri, self.sweep["experiment_id"], parent, history_keys=[CURVE_METRIC]
            )
            summary = summarise(children)
            texts = {
                f"{SUMMARY_DIR}/children.csv": to_csv(summary.columns, summary.rows),
                f"{SUMMARY_DIR}/children.md": to_markdown(summary.columns, summary.rows),
            }
            metrics = {"jobs_finished": summary.finished, "jobs_failed": summary.failed}
            params, tags, figures = {}, {}, {}
            if summary.best is not None:
                metrics[f"best_{CURVE_METRIC}"] = summary.best.metrics[CURVE_METRIC]
                tags = {"best_run_id": summary.best.run_id, "best_run_name": summary.best.name}
            if summary.curves:
                figure = plots.overlay_curves(
                    summary.curves, CURVE_METRIC, "Validation accuracy per child run"
                )
                figures[f"{SUMMARY_DIR}/{CURVE_METRIC}.png"] = figure
            sweep_dir = Path(self.sweep["sweep_dir"])
            for name in ("multirun.yaml", "optimization_results.yaml"):
                if (sweep_dir / name).is_file():
                    texts[f"{SUMMARY_DIR}/{name}"] = (sweep_dir / name).read_text()
            best_params, best_value = optuna_best(sweep_dir)
            params.update({f"best.{k}": v for k, v in best_params.items()})
            if best_value is not None:
                metrics["optuna_best_value"] = best_value
            tracking.log_to_run(
                uri, parent, params=params, metrics=metrics, tags=tags, texts=texts, figures=figures
            )
            status = "FINISHED" if summary.finished else "FAILED"
            best = summary.best
            best_text = f"; best {best.name}: {best.metrics[CURVE_METRIC]:.4f}" if best else ""
            log.info(
                "sweep parent run %s: %d children finished, %d failed%s",
                parent,
                summary.finished,
                summary.failed,
                best_text,
            )
            log.info(
                "compare the runs: %s, then #/experiments/%s/runs",
                tracking.ui_command(uri),
                self.sweep["experiment_id"],
            )
            return summary.failed
        finally:
            tracking.end_run(uri, parent, status)


def optuna_best(sweep_dir: Path) -> tuple[dict[str, Any], float | None]:
    """Best params and value the Optuna sweeper saved in the sweep dir ({} and None if none)."""
    path = Path(sweep_dir) / "optimization_results.yaml"
    if not path.is_file():
        return {}, None
    results = OmegaConf.to_container(OmegaConf.load(path))
    return dict(results.get("best_params") or {}), results.get("best_value")


def _short(override: str) -> str:
    """An override with a long float (as Optuna samples them) cut to 4 significant digits."""
    key, _, value = override.partition("=")
    if not any(c in value for c in ".e") or len(value) <= 8:
        return override
    try:
        return f"{key}={float(value):.4g}"
    except ValueError:
        return override


def _job_num(run: RunRecord) -> int | None:
    value = run.tags.get("sweep.job_num")
    return int(value) if value is not None and value.isdigit() else None


def _portable(error: Any) -> Any:
    """The error itself if it survives pickling, else a RuntimeError with its text.

    joblib and submitit send each job's result back pickled; an exception that cannot make the
    trip (many library errors take extra constructor arguments) would abort the whole sweep.
    """
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        portable = RuntimeError(f"{type(error).__name__}: {error}")
        portable.__cause__ = error  # in-process launchers still print the original traceback
        return portable


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset/cgroup CPU limits
    except AttributeError:
        return os.cpu_count() or 1
