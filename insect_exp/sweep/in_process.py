"""A sweep run in the calling process, one job after another, for `insect_exp.sweep`: what
`python -m insect_exp -m` does with Hydra's basic sweeper and launcher, without a subprocess
(a notebook's kernel keeps the results, its interrupt button reaches the job).

Hydra's multirun has no public in-process entry, so its steps are taken here with public pieces:
the jobs are expanded from the overrides as the basic sweeper expands them (`job_overrides`),
each job's config is composed with Hydra's compose API by the caller and made a multirun job as
the basic launcher makes it (`as_job`: job number, the sweep dir's subdir, the master's resolved
`${now:}`), and the MLflow record is MlflowSweepCallback's own hooks: the same parent run (tags,
params, summary, groups) and the same children as on the command line.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from insect_exp import UserError
from insect_exp.sweep import MlflowSweepCallback

if TYPE_CHECKING:
    from insect_exp.config import Config

# The launcher and sweeper whose work this module does; any other runs as the command.
BASIC = "basic"


@dataclass
class Job:
    """One job of the sweep: its overrides, its full config (hydra node included), typed config."""

    num: int
    overrides: list[str]
    config: DictConfig
    typed: Config


def split(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Hydra's overrides (`hydra/launcher=...`, `hydra.sweep.dir=...`) and the task's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    hydra = [o.input_line or "" for o in parsed if o.is_hydra_override()]
    task = [o.input_line or "" for o in parsed if not o.is_hydra_override()]
    return hydra, task


def constant(task: Sequence[str]) -> list[str]:
    """The task overrides that are no sweep (`epochs=1`, not `optimizer=adam,sgd`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(task))
    return [o.input_line or "" for o in parsed if not o.is_sweep_override()]


def runs_here(master: DictConfig) -> bool:
    """Whether the sweep's launcher and sweeper are Hydra's basic ones (jobs one at a time)."""
    choices = master.hydra.runtime.choices
    return choices.get("hydra/launcher") == BASIC and choices.get("hydra/sweeper") == BASIC


def as_master(cfg: DictConfig, task: Sequence[str]) -> DictConfig:
    """A config composed from the sweep's constant overrides made the multirun's own config:
    MULTIRUN mode, and the task overrides as the command line gave them (sweeps included)."""
    with read_write(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.overrides.task = list(task)
    # Resolved now, so that the jobs copy its `${now:}` (as_job): one sweep dir for them all.
    str(cfg.hydra.sweep.dir)
    return cfg


def sweeper_params(master: DictConfig) -> dict[str, Any]:
    """`hydra.sweeper.params`, resolved (replicates=N's seed sweep among them)."""
    sweeper = cast(dict[str, Any], OmegaConf.to_container(master.hydra.sweeper, resolve=True))
    return dict(sweeper.get("params") or {})


def job_overrides(task: Sequence[str], params: Mapping[str, Any]) -> list[list[str]]:
    """Every job's task overrides, in job order, as Hydra's basic sweeper expands them: the
    sweeper's params first, then the task's; a key given twice keeps its first place and its
    last value; the first key varies slowest.

    Raises:
        UserError: a range or interval sweep (`lr=interval(0.1,1)`), which needs a sweeper that
            samples it.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = [*(f"{k}={v}" for k, v in params.items()), *task]
    choices: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(given):
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            choices[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
        else:
            raise UserError(f"{override.input_line}: a grid takes lists of values, not intervals")
    return [list(job) for job in itertools.product(*choices.values())]


def as_job(cfg: DictConfig, master: DictConfig, num: int) -> DictConfig:
    """A job's composed config made job `num` of the master's sweep, as Hydra's basic launcher
    makes it: the master's resolved values (`${now:}` of the sweep dir), job number, output dir
    `<sweep dir>/<subdir>`; set as Hydra's current config."""
    OmegaConf.copy_cache(from_config=master, to_config=cfg)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.job.id = num
        cfg.hydra.job.num = num
    HydraConfig.instance().set_config(cfg)
    output = os.path.join(str(cfg.hydra.sweep.dir), str(cfg.hydra.sweep.subdir))
    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = os.path.abspath(output)
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_jobs(master: DictConfig, jobs: Sequence[Job], train: Callable[[Job], None]) -> str:
    """Open the sweep's parent run, train every job with `train`, close the parent; return the
    parent's id.

    A failed job is recorded as the command line records it (a FAILED child with its error) and
    the next one runs; Ctrl-C ends the current child KILLED (as `train` ends it) and the parent
    KILLED, then goes on up. The process's signal handlers are its own again afterwards.

    Raises:
        UserError: the sweep could not start (its message printed above), or a job failed
            (after every job ran; the first failure is the cause).
    """
    callback = MlflowSweepCallback()
    failures: list[tuple[Job, Exception]] = []
    with _signals_kept():
        try:
            callback.on_multirun_start(master)
        except SystemExit as err:  # the hook printed its one line, as on the command line
            raise UserError("the sweep could not start (see the line above)") from err
        assert callback.sweep is not None
        OmegaConf.save(master, Path(callback.sweep.sweep_dir) / "multirun.yaml")
        try:
            for job in jobs:
                print(f"sweep job #{job.num}: {' '.join(job.overrides)}", flush=True)
                error = _run_one(callback, job, train)
                if error is not None:
                    failures.append((job, error))
        finally:
            with contextlib.suppress(SystemExit):  # its exit code 1 for failed jobs
                callback.on_multirun_end(master)
    if failures:
        job, error = failures[0]
        raise UserError(
            f"{len(failures)} of {len(jobs)} sweep jobs failed; job #{job.num} "
            f"({' '.join(job.overrides)}): {error}"
        ) from error
    return callback.sweep.parent_run_id


def _run_one(
    callback: MlflowSweepCallback, job: Job, train: Callable[[Job], None]
) -> Exception | None:
    """Train one job; its error (recorded as the command line records it), or None."""
    HydraConfig.instance().set_config(job.config)
    try:
        train(job)
    except Exception as err:  # the job's own error, whatever it is: the others still run
        done = JobReturn(overrides=job.overrides, status=JobStatus.FAILED)
        done.return_value = err
        callback.on_job_end(job.config, done)
        return err
    return None


@contextlib.contextmanager
def _signals_kept() -> Iterator[None]:
    """SIGINT and SIGTERM handled as before the block once it ends (the sweep's callback makes
    them unwind the process while it runs; a notebook's kernel needs its own back)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in kept.items():
            if handler is not None:
                signal.signal(signum, handler)
