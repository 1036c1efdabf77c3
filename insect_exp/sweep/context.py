"""What a sweep hands its jobs, and how a job finds it: the sweep file, run names, thread shares."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from insect_exp.config import RuntimeConfig
from insect_exp.sweep.groups import GROUP_TAG, group_of

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override

log = logging.getLogger(__name__)

SWEEP_FILE = "mlflow_sweep.json"


@dataclass(frozen=True)
class SweepInfo:
    """What `on_multirun_start` hands to every job, through `<sweep dir>/mlflow_sweep.json`."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    # Override keys whose value is the same in every job: left out of run names.
    constant_keys: list[str]
    # TensorFlow intra-op threads for each job; 0 leaves TensorFlow's default (every core).
    threads_per_job: int
    sweep_dir: str

    def write(self) -> None:
        """Write the sweep file atomically: jobs never read a half-written one."""
        target = Path(self.sweep_dir) / SWEEP_FILE
        tmp = target.with_name(f".{SWEEP_FILE}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        tmp.replace(target)


def read_sweep_file(sweep_dir: str | Path) -> SweepInfo | None:
    """What `on_multirun_start` left in a sweep dir, or None."""
    path = Path(sweep_dir) / SWEEP_FILE
    return SweepInfo(**json.loads(path.read_text())) if path.is_file() else None


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


def current_job(runtime: RuntimeConfig) -> JobContext:
    """The sweep context of a job (an empty one outside a multirun)."""
    if not runtime.multirun or runtime.sweep_dir is None:
        return JobContext(list(runtime.overrides))
    sweep = read_sweep_file(Path(runtime.launch_dir) / runtime.sweep_dir)
    if sweep is None:
        log.warning(
            "no %s in the sweep dir: this job's run is not nested under a parent", SWEEP_FILE
        )
        return JobContext(list(runtime.overrides))
    varying = varying_overrides(runtime.overrides, sweep.constant_keys)
    return JobContext(
        overrides=[short(o) for o in varying],
        tracking_uri=sweep.tracking_uri,
        experiment_id=sweep.experiment_id,
        parent_run_id=sweep.parent_run_id,
        threads=sweep.threads_per_job,
        tags={
            "sweep.job_num": str(runtime.job_num),
            "sweep.overrides": json.dumps(varying),
            GROUP_TAG: group_of(varying),
            "sweep.threads_per_job": str(sweep.threads_per_job),
        },
    )


def varying_overrides(overrides: Iterable[str], constant_keys: Iterable[str]) -> list[str]:
    """The job's overrides whose key the sweep varies."""
    constant = set(constant_keys)
    return [o for o in overrides if o.split("=", 1)[0] not in constant]


def sweep_plan(task_overrides: Sequence[str], sweeper: Mapping[str, Any]) -> SweepPlan:
    """Read the sweep's overrides (command line plus `hydra.sweeper.params`) before it runs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from_config = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*from_config, *task_overrides])
    params = {o.get_key_element(): _value_as_written(o) for o in parsed}
    constant = [o.get_key_element() for o in parsed if not o.is_sweep_override()]
    batch: int | None
    if "n_trials" in sweeper:  # Optuna: trials go out in batches of n_jobs
        batch = min(int(sweeper["n_trials"]), int(sweeper.get("n_jobs") or 1))
    else:
        batch = _grid_size(parsed)
        if batch is not None and sweeper.get("max_batch_size"):
            batch = min(batch, int(sweeper["max_batch_size"]))
    return SweepPlan(params, constant, batch)


def _value_as_written(override: Override) -> str:
    """An override's value as the user wrote it (the parser keeps the line it parsed)."""
    return (override.input_line or "").split("=", 1)[1]


def _grid_size(parsed: Sequence[Any]) -> int | None:
    """Jobs in a grid of discrete sweeps (None for interval sweeps, which a grid cannot hold)."""
    sizes = []
    for override in parsed:
        if not override.is_sweep_override():
            continue
        if not override.is_discrete_sweep():
            return None
        sizes.append(sum(1 for _ in override.sweep_string_iterator()))
    return math.prod(sizes)


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


def short(override: str) -> str:
    """An override with a long float (as Optuna samples them) cut to 4 significant digits."""
    key, _, value = override.partition("=")
    if not any(c in value for c in ".e") or len(value) <= 8:
        return override
    try:
        return f"{key}={float(value):.4g}"
    except ValueError:
        return override
