"""Command line: `python -m insect_exp [overrides]` or `insect-exp [overrides]`."""

import contextlib
import gc
import sys
import warnings
from pathlib import Path
from typing import NoReturn

# Start-up makes objects that live on: no collector passes over them (benchmarks/gc_startup.py).
if __name__ == "__main__":
    gc.disable()

import hydra
from omegaconf import DictConfig, OmegaConf

from insect_exp import UserError
from insect_exp.config import Config, register_configs, to_object
from insect_exp.errors import exit_with

# The config ships inside the package (insect_exp/conf/, package data in the wheel), so editable
# and regular installs find it alike; an absolute path works both for `python -m insect_exp` and
# for the console script. A user's own config dir adds to it: --config-dir DIR or
# hydra.searchpath=[file:///DIR].
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")

register_configs()
# hydra/launcher=joblib, submitit_local and submitit_slurm are insect_exp's launchers (conf/hydra/
# launcher/) on the plugins' schemas of the same names, which Hydra matches with a warning.
warnings.filterwarnings(
    "ignore", message=r"\n'hydra/launcher/(joblib|submitit_local|submitit_slurm)' is validated"
)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(dict_cfg: DictConfig) -> float:
    multirun = OmegaConf.select(dict_cfg, "runtime.job_num", default=None) is not None
    try:
        return _train(dict_cfg, multirun)
    except (Exception, KeyboardInterrupt) as err:  # resilience.Interrupted is a KeyboardInterrupt
        if multirun:
            raise  # the sweep records the failed job and goes on
        ending = _ending(err)
        if ending is None:
            raise
        _exit(*ending)


def _train(dict_cfg: DictConfig, multirun: bool) -> float:
    """The job: its config typed (a resumed run's composed again), then the run trained."""
    from insect_exp.resilience import interrupts

    resume = OmegaConf.select(dict_cfg, "resume")
    # A resumed run's lease (resuming.lease) is held from before its checks to the job's end.
    with contextlib.ExitStack() as held:
        # Typed from here on; ranges checked before TensorFlow loads.
        cfg = _resumed_config(resume, dict_cfg, held) if resume else to_object(dict_cfg)
        # Imported here so that --help, --cfg and config errors never pay for TensorFlow.
        from insect_exp import train

        with interrupts(after_finish=not multirun):
            return train.run(cfg)


def _ending(err: BaseException) -> tuple[str, int, bool] | None:
    """How a single run's command ends on `err`: message, exit code, at once (None: a traceback)."""
    from insect_exp.data.cache import damage_reported
    from insect_exp.distribute import WorkerLost
    from insect_exp.resilience import CheckpointFailed, Interrupted, TrainingDiverged, finished_line
    from insect_exp.tracking.remote import LoggingProcessDied

    if isinstance(err, UserError):
        return f"error: {err}", 2, False
    if isinstance(err, TrainingDiverged):
        return f"error: {err}; the run is FAILED and no model was logged", 1, False
    if isinstance(err, CheckpointFailed):
        return f"error: {err}", 1, False
    damaged = damage_reported(err)
    if damaged:
        return f"error: {damaged}", 1, False
    if isinstance(err, WorkerLost):
        # At once: the aborted collectives leave TensorFlow's runtime half torn down, and the
        # interpreter's own exit would print its finalizers' tracebacks (the run is ended).
        return f"error: {err}; the chief's run is FAILED", 1, True
    resume = f"Resume it with: python -m insect_exp resume={getattr(err, 'run_id', None)}"
    if isinstance(err, LoggingProcessDied) and err.run_id is not None:
        return f"error: {err}: run {err.run_id} is FAILED with what it logged. {resume}", 1, False
    if not isinstance(err, Interrupted):
        return None
    print(file=sys.stderr)  # past Keras's progress bar
    if err.run_id and err.ended == "FINISHED":  # the signal came after the run's end
        return finished_line(err.signum, err.run_id), err.exit_code, False
    if err.run_id:
        killed = f"run {err.run_id} is KILLED with what it logged. {resume}"
        return f"interrupted ({err}): {killed}", err.exit_code, False
    return f"interrupted ({err})", err.exit_code, False


def _exit(message: str, code: int, at_once: bool = False) -> NoReturn:
    exit_with("insect_exp", message, code, at_once)


def _resumed_config(run_id: str, dict_cfg: DictConfig, held: contextlib.ExitStack) -> Config:
    """The config of the run to resume: its logged overrides composed again, epochs as given.

    Its lease is taken into `held`, then the run is checked (resuming.check_resumable).
    """
    import json

    from hydra import compose

    from insect_exp import resilience, resuming, tracking

    configured = OmegaConf.select(dict_cfg, "mlflow.tracking_uri")
    uri = tracking.resolve_tracking_uri(configured, dict_cfg.runtime.launch_dir)
    tracking.prepare_store(uri)
    client = tracking.open_client(uri)
    try:
        run = client.get_run(run_id)
        local = client.download_artifacts(run_id, "config/overrides.json")
        logged = json.loads(Path(local).read_text())
    except Exception as err:
        raise UserError(f"cannot resume run {run_id!r} from {uri}: {err}") from err
    overrides = resilience.resume_overrides(logged, list(dict_cfg.runtime.overrides))
    resumed = to_object(compose("config", overrides=overrides))
    params = tracking.flatten(resumed.params())
    resilience.check_same_config(
        dict(run.data.params), {k: tracking.param_value(v) for k, v in params.items()}
    )
    directory = run.data.tags.get(resuming.CHECKPOINT_TAG)
    if directory:
        held.enter_context(resuming.lease(directory, run_id))
    run = client.get_run(run_id)  # as it is now that no other process may train it
    logged = len(client.get_metric_history(run_id, "loss"))
    found = resuming.Found(run_id, run.info.status, directory, logged)
    resuming.check_resumable(found, resumed.epochs)
    return resumed


def main() -> None:
    """Console-script entry point (same as `python -m insect_exp`)."""
    from insect_exp.resilience import Interrupted

    gc.disable()  # as above, for the console script
    try:
        _hydra_main()
    except Interrupted as err:  # a sweep's job, or the sweep itself, was interrupted
        # The sweep's runs are closed as the process exits (see insect_exp/sweep).
        _exit(f"interrupted ({err}): the sweep's running jobs end KILLED", err.exit_code)
    except ValueError as err:  # Hydra's check of its own flags, before any job: one line
        if not str(err).startswith("Only one of --run"):
            raise
        _exit(f"error: {err}", 2)
    gc.freeze()  # no final collections over start-up's objects (benchmarks/gc_startup.py)


if __name__ == "__main__":
    main()
