"""What insect_exp's launchers share: a job's config, and a job whose process died."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.types import HydraContext
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


class JobProcessDied(RuntimeError):
    """A job's process ended without returning: killed by a signal or the OOM killer."""


def job_config(
    hydra_context: HydraContext, config: DictConfig, idx: int, overrides: Sequence[str]
) -> DictConfig:
    """Job idx's config as the job itself composes it (joblib's launcher does the same)."""
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    return sweep_config


def failed_job(
    hydra_context: HydraContext,
    config: DictConfig,
    idx: int,
    overrides: Sequence[str],
    error: BaseException,
) -> JobReturn:
    """A FAILED JobReturn for a job that could not return one, reported to Hydra's callbacks.

    The job's own process runs `on_job_end` for a job that fails; one that died could not, so the
    launcher does it for the job (insect_exp's sweep callback then ends the job's MLflow run).
    """
    log.error("job #%d (%s): %s", idx, " ".join(filter_overrides(overrides)), error)
    job = job_config(hydra_context, config, idx, overrides)
    ret = JobReturn(
        overrides=list(overrides),
        cfg=job,
        hydra_cfg=job,
        task_name=str(job.hydra.job.name),
        status=JobStatus.FAILED,
        _return_value=error,
    )
    hydra_context.callbacks.on_job_end(config=job, job_return=ret)
    return ret
