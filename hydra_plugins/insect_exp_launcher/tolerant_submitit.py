"""Hydra's submitit launchers (SLURM and local), waiting for every job whatever happens to one.

hydra-submitit-launcher collects results with `[job.results()[0] for job in jobs]`: the first job
whose process died (killed, out of memory, `scancel`) raises there while the other jobs still
run, and the sweep ends without them. These subclasses wait for every job; a job that returned no
result becomes a FAILED `JobReturn` reported to Hydra's callbacks, as the job's own process would
have done.

Selected by `hydra/launcher=slurm`, `submitit_slurm` and `submitit_local`
(insect_exp/conf/hydra/launcher/).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from omegaconf import OmegaConf

from hydra_plugins.insect_exp_launcher._common import JobProcessDied, failed_job

log = logging.getLogger(__name__)

# The configs keep the plugin's schemas of the same names, which Hydra matches with a warning.
warnings.filterwarnings(
    "ignore", message=r"\n'hydra/launcher/submitit_(local|slurm)' is validated against"
)

try:  # the `sweep` extra; without it these launchers do not exist
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
except ImportError:  # pragma: no cover - depends on the installed extras
    BaseSubmititLauncher = None


if BaseSubmititLauncher is not None:

    class _WaitForAll(BaseSubmititLauncher):
        def launch(
            self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
        ) -> Sequence[JobReturn]:
            # As BaseSubmititLauncher.launch (hydra-submitit-launcher 1.2) up to the results.
            import submitit

            assert self.config is not None and self.hydra_context is not None
            params = self.params
            init_params = {"folder": params["submitit_folder"]}
            specific_init_keys = {"max_num_timeout"}
            init_params.update(
                {f"{self._EXECUTOR}_{k}": v for k, v in params.items() if k in specific_init_keys}
            )
            init_keys = specific_init_keys | {"submitit_folder"}
            executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
            base = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(
                **{
                    k if k in base else f"{self._EXECUTOR}_{k}": v
                    for k, v in params.items()
                    if k not in init_keys
                }
            )
            log.info("Submitit '%s' sweep output dir : %s", self._EXECUTOR,
                     self.config.hydra.sweep.dir)  # fmt: skip
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if "mode" in self.config.hydra.sweep:
                os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
            job_params: list[Any] = []
            for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
                log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
                job_params.append(
                    (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                     Singleton.get_state())
                )  # fmt: skip
            jobs = executor.map_array(self, *zip(*job_params, strict=True))
            return [
                self._result(job, idx, overrides)
                for idx, (job, overrides) in enumerate(
                    zip(jobs, job_overrides, strict=True), start=initial_job_idx
                )
            ]

        def _result(self, job: Any, idx: int, overrides: Sequence[str]) -> JobReturn:
            from submitit.core.utils import FailedJobError, UncompletedJobError

            try:
                return job.results()[0]
            except UncompletedJobError as err:
                error: BaseException = JobProcessDied(f"job process died ({_first_line(err)})")
            except FailedJobError as err:  # raised outside the job's task: setup, unpickling
                error = RuntimeError(f"job failed: {_first_line(err)}")
            assert self.config is not None and self.hydra_context is not None
            return failed_job(self.hydra_context, self.config, idx, overrides, error)

    class LocalLauncher(_WaitForAll):
        _EXECUTOR = "local"

    class SlurmLauncher(_WaitForAll):
        _EXECUTOR = "slurm"


def _first_line(err: BaseException) -> str:
    return next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
