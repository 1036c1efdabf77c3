"""Hydra launcher: joblib's, except that every job runs in a process of its own.

joblib's launcher runs a sweep's jobs on one pool of loky workers. When the OS kills a worker
(out of memory, `kill -9`), loky declares the whole pool broken: joblib raises
`TerminatedWorkerError`, kills the jobs running beside the dead one and the sweep stops. Here each
job gets a one-worker loky executor of its own, at most `n_jobs` at a time, so a job whose process
dies is one failed job and the others run on. The dead job is reported to Hydra's callbacks
(`on_job_end`, with a FAILED `JobReturn`), which its own process could not do.

A fresh process per job also means no TensorFlow state (thread pools, the mixed-precision policy)
carries over from one job to the next. The cost is one interpreter start per job instead of one
per worker.

Selected by `hydra/launcher=joblib` (insect_exp/conf/hydra/launcher/joblib.yaml).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from hydra_plugins.insect_exp_launcher._common import JobProcessDied, failed_job, job_config

log = logging.getLogger(__name__)

# This launcher's config (conf/hydra/launcher/joblib.yaml) keeps joblib's schema of the same name,
# which Hydra matches with a deprecation warning, once per process that loads a job's config.
warnings.filterwarnings("ignore", message=r"\n'hydra/launcher/joblib' is validated against")


class IsolatedJoblibLauncher(Launcher):
    """Runs each job in its own loky process, `n_jobs` at a time (-1: one per core).

    The config keeps joblib's launcher schema, so its other keys (backend, prefer, batch_size,
    ...) still compose; they have no effect here, where every job is a process of its own.
    """

    def __init__(self, n_jobs: int = -1, **joblib_options: Any) -> None:
        self.n_jobs = int(n_jobs)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.task_function = task_function
        self.hydra_context = hydra_context

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from joblib.externals.loky import ProcessPoolExecutor

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        parallel = self._parallel(len(job_overrides))
        log.info("launching %d jobs, %d at a time, each in its own process", len(job_overrides),
                 parallel)  # fmt: skip
        log.info("sweep output dir: %s", sweep_dir)
        for idx, overrides in enumerate(job_overrides):
            log.info("\t#%d : %s", initial_job_idx + idx, " ".join(filter_overrides(overrides)))

        state = Singleton.get_state()
        results: list[JobReturn | None] = [None] * len(job_overrides)
        pending = list(enumerate(job_overrides))
        running: dict[Future, tuple[int, Any]] = {}
        try:
            while pending or running:
                while pending and len(running) < parallel:
                    idx, overrides = pending.pop(0)
                    executor = ProcessPoolExecutor(max_workers=1)
                    future = executor.submit(
                        _execute_job,
                        initial_job_idx + idx,
                        list(overrides),
                        self.hydra_context,
                        self.config,
                        self.task_function,
                        state,
                    )
                    running[future] = (idx, executor)
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    idx, executor = running.pop(future)
                    results[idx] = self._result(future, initial_job_idx + idx, job_overrides[idx])
                    executor.shutdown(wait=True)
        except BaseException:
            # Ctrl-C or SIGTERM to the sweep: stop the jobs still running with it.
            for _, executor in running.values():
                executor.shutdown(wait=False, kill_workers=True)
            raise
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _parallel(self, jobs: int) -> int:
        cores = os.cpu_count() or 1
        n = self.n_jobs if self.n_jobs > 0 else max(1, cores + 1 + self.n_jobs)
        return max(1, min(n, jobs))

    def _result(self, future: Future, idx: int, overrides: Sequence[str]) -> JobReturn:
        """The job's own JobReturn, or a FAILED one (reported to callbacks) if its process died."""
        from joblib.externals.loky.process_executor import BrokenProcessPool

        try:
            return future.result()
        except BrokenProcessPool as err:
            cause = str(err).split("\n", 1)[0]
            error = JobProcessDied(f"job process died ({cause})")
        assert self.config is not None and self.hydra_context is not None
        return failed_job(self.hydra_context, self.config, idx, overrides, error)


def _execute_job(
    idx: int,
    overrides: Sequence[str],
    hydra_context: HydraContext,
    config: DictConfig,
    task_function: TaskFunction,
    singleton_state: dict[Any, Any],
) -> JobReturn:
    """In the job's process: what joblib's launcher does in each of its workers."""
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = job_config(hydra_context, config, idx, overrides)
    HydraConfig.instance().set_config(sweep_config)
    return run_job(
        hydra_context=hydra_context,
        config=sweep_config,
        task_function=task_function,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
