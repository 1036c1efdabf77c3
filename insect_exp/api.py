"""insect_exp from Python and notebooks: train, sweep, predict and evaluate, results as objects.

Each function composes the same config as its command (Hydra's compose API, the same overrides),
checks it before TensorFlow loads, and calls the command's own code in this process (a sweep on
another launcher than Hydra's basic one runs as its command): the MLflow record is the command
line's. Errors are exceptions (UserError, ConfigError, resilience.Interrupted), never
exits.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from insect_exp import UserError
from insect_exp.__main__ import CONFIG_DIR
from insect_exp.config import ConfigError

if TYPE_CHECKING:
    import pandas as pd
    from omegaconf import DictConfig

    from insect_exp.config import Config, EvaluateConfig
    from insect_exp.sweep.in_process import Job

# Logged once an epoch, at the epoch's step; the others are per batch or final.
_PER_BATCH = ("batch_",)
# calibrate=temperature's (insect_exp/calibration.py) are final too.
_FINAL = ("test_", "temperature", "val_ece", "val_brier", "val_nll")


@dataclass
class TrainResult:
    """One training run as its MLflow record has it."""

    run_id: str
    status: str
    # The last value of each metric (validation and test scores among them).
    metrics: dict[str, float]
    # One row per epoch (index: epoch from 0), one column per metric logged every epoch.
    history: pd.DataFrame
    # runs:/<run id>/model, or None where mlflow.log_model=false.
    model_uri: str | None
    # Hydra's output dir of the run (config snapshot, checkpoints).
    output_dir: str | None
    tracking_uri: str

    def load_model(self) -> Any:
        """The logged model as an MLflow pyfunc (TensorFlow loads here)."""
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        return mlflow.pyfunc.load_model(self._model_uri())

    def predict(self, files: str | Path | Iterable[str | Path], top_k: int = 3) -> pd.DataFrame:
        """The model's labels for image files (or folders), as `insect_exp.predict` gives them."""
        return predict(self._model_uri(), files, top_k=top_k, tracking_uri=self.tracking_uri)

    def plots(self) -> dict[str, Path]:
        """The run's plots (training_curves, confusion_matrix, ...), downloaded: name -> PNG."""
        from insect_exp import tracking

        client = tracking.open_client(self.tracking_uri)
        dest = tempfile.mkdtemp(prefix="insect_exp-plots-")
        local = Path(client.download_artifacts(self.run_id, "plots", dest))
        return {path.stem: path for path in sorted(local.glob("*.png"))}

    def _model_uri(self) -> str:
        if self.model_uri is None:
            raise UserError(f"run {self.run_id} logged no model (mlflow.log_model=false)")
        return self.model_uri


@dataclass
class SweepResult:
    """A sweep's parent run and its jobs' runs, in job order."""

    parent_run_id: str
    # The parent run's metrics (the sweep's summary: best values and where they were reached).
    summary: dict[str, float]
    children: list[TrainResult] = field(default_factory=list)


@dataclass
class EvaluateResult:
    """An evaluation run: its id and its metrics (`<split>_accuracy`, `<split>_loss`, ...)."""

    run_id: str
    accuracy: float
    metrics: dict[str, float]
    tracking_uri: str


def as_overrides(overrides: Sequence[str], keys: Mapping[str, Any]) -> list[str]:
    """The command line's overrides: `overrides` as given, then `key=value` for each keyword
    (`__` stands for a dot: model__image_size=[32, 32] is model.image_size=[32,32])."""
    return [*overrides, *(f"{k.replace('__', '.')}={_value(v)}" for k, v in keys.items())]


def _value(value: Any) -> str:
    """A Python value as an override's value (True: true, None: null, [1, 2]: [1,2])."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if isinstance(value, Path):
        return str(value)
    return str(value)


def train(*overrides: str, config_dir: str | Path | None = None, **keys: Any) -> TrainResult:
    """Train one model as `python -m insect_exp OVERRIDES` would; return its run.

    Args:
        overrides: the command line's overrides, e.g. "model=hub_mobilenet", "epochs=2".
        config_dir: a team config dir, as the command line's --config-dir.
        keys: more overrides as keywords, e.g. epochs=2, mlflow__log_model=False.

    Raises:
        ConfigError: a key, value or group option the config does not have, before TensorFlow
            loads and before a run opens (UserError: any other input the user can fix).
        resilience.Interrupted: Ctrl-C (or the notebook's interrupt): the run ends KILLED and
            resumable, its id in the exception.
    """
    from insect_exp.resilience import interrupts

    # A resumed run's lease (resuming.lease) is held from before its checks to the job's end.
    with contextlib.ExitStack() as held:
        cfg, output_dir = compose_train(as_overrides(overrides, keys), config_dir, held)
        # The command line makes replicates a multirun; one TrainResult cannot hold it. (A resumed
        # replicate keeps its logged replicates=N: it is one run.)
        if cfg.replicates > 1 and cfg.resume is None:
            raise UserError(
                f"replicates={cfg.replicates} trains {cfg.replicates} runs: call "
                f"insect_exp.sweep(grid, replicates={cfg.replicates}) instead"
            )
        job = importlib.import_module("insect_exp.train")  # TensorFlow loads in run_job
        # Signals go back to the caller's handlers afterwards: the process lives on.
        with interrupts(after_finish=False):
            try:
                _, opened = job.run_job(cfg)
            finally:
                _reset_keras()
    if opened is None:
        raise UserError("this process is a non-chief worker: the chief logged the run")
    return read_run(opened.run_id, opened.tracking_uri, output_dir)


def compose_train(
    overrides: list[str], config_dir: str | Path | None, held: contextlib.ExitStack
) -> tuple[Config, str]:
    """The typed train config and its output dir, with Hydra's config snapshot written there as
    a plain run writes it. With resume=<run id>, that run's config, its lease taken into `held`.

    Raises:
        ConfigError, UserError: as `train`.
    """
    from insect_exp.config import to_object

    dict_cfg = compose("config", overrides, config_dir)
    output_dir = str(dict_cfg.hydra.runtime.output_dir)
    task = _task_config(dict_cfg)
    if task.get("resume"):  # the command line's resume: its logged overrides composed again
        from hydra import initialize_config_dir

        from insect_exp.__main__ import _resumed_config

        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = _typed(lambda: _resumed_config(str(task.resume), task, held))
    else:
        cfg = _typed(lambda: to_object(task))
    _save_snapshot(dict_cfg, task, output_dir)
    return cfg, output_dir


def _save_snapshot(dict_cfg: DictConfig, task: DictConfig, output_dir: str) -> None:
    """Hydra's config snapshot (`.hydra/`) in the output dir, as Hydra's run_job writes it."""
    from omegaconf import OmegaConf

    if dict_cfg.hydra.output_subdir is not None:
        snapshot = Path(output_dir) / str(dict_cfg.hydra.output_subdir)
        snapshot.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(task, snapshot / "config.yaml")
        OmegaConf.save(OmegaConf.masked_copy(dict_cfg, ["hydra"]), snapshot / "hydra.yaml")
        OmegaConf.save(dict_cfg.hydra.overrides.task, snapshot / "overrides.yaml")


def compose(name: str, overrides: list[str], config_dir: str | Path | None) -> DictConfig:
    """The config `name` composed with Hydra's config and set as Hydra's current one, as a
    plain run (`hydra.main`) sets it, so that `${hydra:...}` interpolations resolve.

    Raises:
        ConfigError: Hydra's message for a key, value or option the config does not have.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    from insect_exp.config import register_configs

    register_configs()
    if config_dir is not None:  # what --config-dir does: the dir first on the search path
        found = Path(config_dir).expanduser().resolve()
        if not found.is_dir():
            raise UserError(f"config_dir {str(config_dir)!r}: no such folder")
        overrides = [*overrides, f"hydra.searchpath=[file://{found}]"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = _typed(lambda: hydra_compose(name, overrides=overrides, return_hydra_config=True))
    with read_write(cfg.hydra):
        cfg.hydra.mode = RunMode.RUN
    HydraConfig.instance().set_config(cfg)  # the run dir's ${now:} resolves as Hydra's does
    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = os.path.abspath(str(cfg.hydra.run.dir))
    HydraConfig.instance().set_config(cfg)
    return cfg


def _task_config(cfg: DictConfig) -> DictConfig:
    """The job's config: `cfg` without its hydra node (its ${hydra:...} values still resolve)."""
    import copy

    from omegaconf import open_dict, read_write

    task = copy.deepcopy(cfg)  # as Hydra's run_job makes it: the schema's types kept
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def _typed(make: Any) -> Any:
    """`make()`, with Hydra's and OmegaConf's config errors raised as ConfigError (same text)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return make()
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(str(err).strip()) from err


def _reset_keras() -> None:
    """Drop the finished model's graph state: the next call in this process starts clean."""
    import gc

    keras = sys.modules.get("tf_keras")
    if keras is None:  # the run failed before TensorFlow loaded
        return
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("float32")
    gc.collect()  # the run's model, datasets and their cycles, before the next call allocates


def read_run(run_id: str, tracking_uri: str, output_dir: str | None = None) -> TrainResult:
    """A training run's result, read back from its MLflow record."""
    import pandas as pd

    from insect_exp import tracking

    client = tracking.open_client(tracking_uri)
    run = client.get_run(run_id)
    metrics = dict(run.data.metrics)
    columns = {}
    for key in sorted(metrics):
        if key.startswith(_PER_BATCH + _FINAL):
            continue
        history = client.get_metric_history(run_id, key)
        columns[key] = pd.Series({m.step: m.value for m in history}, dtype="float64")
    frame = pd.DataFrame(columns).sort_index()
    frame.index.name = "epoch"
    logged = [a.path for a in client.list_artifacts(run_id)]
    has_model = "model" in logged or bool(run.outputs and run.outputs.model_outputs)
    return TrainResult(
        run_id=run_id,
        status=run.info.status,
        metrics=metrics,
        history=frame,
        model_uri=f"runs:/{run_id}/model" if has_model else None,
        output_dir=output_dir,
        tracking_uri=tracking_uri,
    )


def predict(
    model_uri: str,
    files: str | Path | Iterable[str | Path],
    top_k: int = 3,
    batch_size: int = 64,
    tracking_uri: str | None = None,
    tta: str = "none",
) -> pd.DataFrame:
    """Label image files (or every image of folders) with a logged model, as
    `python -m insect_exp.predict` does: its columns, a file it cannot read skipped with its
    reason on stderr; tta="flip" averages each image's probabilities with its mirror image's.

    Raises:
        UserError: a model_uri or an input that cannot be used (the command's message).
    """
    import pandas as pd

    from insect_exp import predict as command
    from insect_exp.config import TTA, PredictConfig
    from insect_exp.multilabel.scores import saved_thresholds

    # Its checks give the command's errors; a name becomes the TTA member there, as from YAML.
    cfg = PredictConfig(
        model_uri=model_uri, inputs=".", top_k=top_k, batch_size=batch_size, tta=cast(TTA, tta)
    )
    ref = command.find_model(model_uri, command.store_uri(tracking_uri, model_uri), True)
    inputs = [files] if isinstance(files, str | Path) else list(files)
    paths: list[str] = []
    for item in inputs:
        found, skipped = command.list_inputs(str(item))
        paths += found
        for path, reason in skipped:
            print(f"skipped {path}: {reason}", file=sys.stderr)
    classifier = command.load_classifier(ref)
    names = classifier.class_names
    thresholds = saved_thresholds(classifier.module)  # a multi-label model's

    def on_skip(path: str, reason: str) -> None:
        print(f"skipped {path}: {reason}", file=sys.stderr)

    rows = [
        command.row(p, names, top_k, thresholds)
        for p in command.stream_predictions(
            classifier, paths, batch_size, on_skip=on_skip, tta=cfg.tta
        )
    ]
    frame = pd.DataFrame(rows, columns=command.header(names, top_k, thresholds is not None))
    if thresholds is not None:  # `;`-separated label sets and probabilities: text
        return frame
    probabilities = [c for c in frame.columns if c.startswith("probability")]
    return frame.astype({c: "float64" for c in probabilities})


def evaluate(model_uri: str, folder: str | Path, *overrides: str, **keys: Any) -> EvaluateResult:
    """Evaluate a logged model on a labelled folder as a new MLflow run, as
    `python -m insect_exp.evaluate model_uri=... dataset=insects dataset.root=FOLDER` does.

    Args:
        overrides, keys: more of the command's overrides (split=val, mlflow.tracking_uri=...).

    Raises:
        UserError: a model, folder or value that cannot be used (the command's message).
    """
    from insect_exp import evaluate as command
    from insect_exp.config import EvaluateConfig, to_object

    given = [
        f"model_uri={model_uri}",
        "dataset=insects",
        f"dataset.root={Path(folder).expanduser().resolve()}",
        *as_overrides(overrides, keys),
    ]
    dict_cfg = compose("evaluate", given, None)
    task = _task_config(dict_cfg)
    cfg: EvaluateConfig = _typed(lambda: to_object(task, EvaluateConfig))
    accuracy = command.run(cfg)
    return _evaluation_run(cfg, accuracy)


def _evaluation_run(cfg: EvaluateConfig, accuracy: float) -> EvaluateResult:
    """The evaluation run just logged: the newest run of the store that evaluates the model."""
    from insect_exp import predict as command
    from insect_exp import tracking

    uri = command.store_uri(cfg.mlflow.tracking_uri, cfg.model_uri)
    if not cfg.model_uri.startswith(("runs:", "models:")):
        uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.runtime.launch_dir)
    client = tracking.open_client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(
        experiments,
        filter_string="tags.`insect_exp.job` = 'evaluate'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return EvaluateResult(run.info.run_id, accuracy, dict(run.data.metrics), uri)


def sweep(
    grid: Mapping[str, Sequence[Any]],
    *overrides: str,
    config_dir: str | Path | None = None,
    **keys: Any,
) -> SweepResult:
    """Train every combination of `grid` as `python -m insect_exp -m` does: one parent run with
    the sweep's summary, one child run a job, in job order.

    The jobs run one after another in this process (Hydra's basic launcher's order, each job's
    config composed with Hydra's compose API). Another launcher or sweeper
    ("hydra/launcher=joblib", "hparams_search=optuna") runs as that command in a subprocess
    from the current directory, and its runs are read back from the store.

    Args:
        grid: key -> values, e.g. {"optimizer": ["adam", "sgd"], "seed": [1, 2]}.
        overrides, keys: overrides every job shares ("epochs=2", "hydra/launcher=joblib").

    Raises:
        ConfigError, UserError: a bad value in any job's config (before TensorFlow loads and
            before any run opens), or a failed job (after every job ran; the parent is closed).
        resilience.Interrupted: Ctrl-C (or the notebook's interrupt): the current child and the
            parent end KILLED, the child resumable, its id in the exception.
    """
    from insect_exp import tracking
    from insect_exp.sweep import in_process

    if not isinstance(grid, Mapping) or not grid:
        raise UserError("sweep(grid): give a dict of key -> list of values")
    given = [_grid_override(k, v) for k, v in grid.items()] + as_overrides(overrides, keys)
    hydra, task = _typed(lambda: in_process.split(given))
    constant = _typed(lambda: in_process.constant(task))
    master = in_process.as_master(compose("config", [*hydra, *constant], config_dir), task)
    params = _typed(lambda: in_process.sweeper_params(master))
    jobs = [
        _sweep_job(master, num, job, hydra, config_dir)
        for num, job in enumerate(_typed(lambda: in_process.job_overrides(task, params)))
    ]
    configured = jobs[0].typed.mlflow.tracking_uri
    uri = tracking.resolve_tracking_uri(configured, Path.cwd())
    if not in_process.runs_here(master):
        return _sweep_as_command(given, config_dir, uri)
    parent = in_process.run_jobs(master, jobs, _train_swept)
    return _read_sweep(uri, parent)


def _sweep_job(
    master: DictConfig,
    num: int,
    overrides: list[str],
    hydra: list[str],
    config_dir: str | Path | None,
) -> Job:
    """Job `num` of the sweep, its config composed and checked (an in_process.Job)."""
    from insect_exp.config import to_object
    from insect_exp.sweep import in_process

    dict_cfg = in_process.as_job(compose("config", [*hydra, *overrides], config_dir), master, num)
    typed = _typed(lambda: to_object(_task_config(dict_cfg)))
    return in_process.Job(num, overrides, dict_cfg, typed)


def _train_swept(job: Job) -> None:
    """One job of an in-process sweep, as the command line's multirun trains it."""
    from insect_exp.resilience import interrupts

    output_dir = str(job.config.hydra.runtime.output_dir)
    _save_snapshot(job.config, _task_config(job.config), output_dir)
    module = importlib.import_module("insect_exp.train")  # TensorFlow loads in run
    with interrupts(after_finish=False):
        try:
            module.run(job.typed)
        finally:
            _reset_keras()


def _sweep_as_command(
    args: list[str], config_dir: str | Path | None, tracking_uri: str
) -> SweepResult:
    """The sweep as `python -m insect_exp -m ARGS` in a subprocess, its runs read back."""
    if config_dir is not None:
        args = ["--config-dir", str(Path(config_dir).expanduser().resolve()), *args]
    done = _run_sweep(args)
    sys.stdout.write(done.stdout)
    parents = [ln.split(":", 1)[1].strip() for ln in done.stdout.splitlines() if _PARENT in ln]
    if done.returncode != 0 or not parents:
        sys.stderr.write(done.stderr[-4000:])
        raise UserError(_failure(done.stderr) or f"the sweep exited with {done.returncode}")
    return _read_sweep(tracking_uri, parents[-1])


_PARENT = "MLflow sweep run id:"


def _run_sweep(args: list[str]) -> subprocess.CompletedProcess:
    """`python -m insect_exp -m ARGS` to its end. Ctrl-C here (a notebook's interrupt reaches
    this process only) is passed on, so that the sweep ends its runs KILLED as on a terminal,
    then raises resilience.Interrupted."""
    from insect_exp.resilience import Interrupted

    command = [sys.executable, "-m", "insect_exp", "-m", *args]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            stdout, stderr = process.communicate()
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)
            process.communicate()
            raise Interrupted(signal.SIGINT) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _grid_override(key: str, values: Sequence[Any]) -> str:
    """One key's values as a sweep override (`optimizer=adam,sgd`)."""
    return f"{key.replace('__', '.')}={','.join(_value(v) for v in values)}"


def _failure(stderr: str) -> str:
    """The command's last error line, without its prefix."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln.split("error: ", 1)[-1] for ln in lines if "error" in ln.lower()]
    return (errors or lines[-1:] or [""])[-1]


def _read_sweep(tracking_uri: str, parent_run_id: str) -> SweepResult:
    """The sweep's parent and its children (in job order), read from the store."""
    from insect_exp import tracking

    client = tracking.open_client(tracking_uri)
    parent = client.get_run(parent_run_id)
    children = tracking.child_runs(tracking_uri, parent.info.experiment_id, parent_run_id)
    children.sort(key=lambda run: int(run.tags.get("sweep.job_num", 0)))
    return SweepResult(
        parent_run_id=parent_run_id,
        summary=dict(parent.data.metrics),
        children=[read_run(child.run_id, tracking_uri) for child in children],
    )
