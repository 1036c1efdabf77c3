"""The train job: config -> data -> model -> fit -> evaluate -> MLflow. Only wiring lives here."""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from insect_exp import commands, distribute, preflight, resuming, sweep
from insect_exp.config import Calibrate, Config, Precision, Strategy, Task
from insect_exp.tracking.spool import SPOOL_DIR

if TYPE_CHECKING:
    from concurrent.futures import Future

    import numpy as np
    from tf_keras import Model

    from insect_exp import precision, tracking
    from insect_exp.data import Loading
    from insect_exp.data.pipeline import Data
    from insect_exp.fit import FitSettings, History
    from insect_exp.models import Recipe
    from insect_exp.resilience import CheckpointState

log = logging.getLogger(__name__)

CHECKPOINT_TAG = resuming.CHECKPOINT_TAG
# Metrics a resumed run may log again for the epoch it redoes: only their first values count.
RESUMED_KEYS = (
    "loss", "accuracy", "val_loss", "val_accuracy", "val_top3_accuracy", "lr", "batch_loss",
    "batch_accuracy", "val_loss_raw", "val_accuracy_raw", "val_top3_accuracy_raw",
    "backbone_images_computed", "backbone_images_reused",
    "auc_pr", "val_micro_f1", "val_macro_f1", "val_map",  # task=multilabel's
)  # fmt: skip


def run(cfg: Config) -> float:
    """Train and log one model as `cfg` says; return the final validation accuracy for sweepers."""
    return run_job(cfg)[0]


def run_job(cfg: Config) -> tuple[float, tracking.Opened | None]:
    """Train and log one model as `cfg` says; return the final validation accuracy and the run
    (None: a worker's, which the chief logged).

    The steps: open the MLflow run (its logging process), start TensorFlow and its distribution,
    plan the checkpoints, load the data, build, fit, calibrate, evaluate, export the model, finish
    the run.
    With cfg.resume, continue that run from its last checkpoint, in the same MLflow run. A signal
    before the run finished ends it KILLED; either way resilience.Interrupted names the run.
    """
    preflight.check(cfg)  # a path that is not there fails before a run opens
    distribute.before_tensorflow(cfg.train)
    from insect_exp import resilience, tracking  # tracking's names load on use: no MLflow here

    job = sweep.current_job(cfg.runtime)  # inside a multirun: parent run, experiment, thread share
    run: tracking.TrackedRun | None = None
    try:
        with contextlib.ExitStack() as ending:
            lease = ending.enter_context(resuming.Lease())  # let go once the run has ended
            if cfg.train.strategy is not Strategy.multi_worker:
                # Started before TensorFlow's import: the logging process imports MLflow and
                # opens the run on the core that the import leaves idle.
                run = ending.enter_context(tracking.ending(_start_run(cfg, job)))
            dist, loading = _start_tensorflow(cfg, cfg.threads or job.threads)
            if run is None:  # a multi-worker run knows its chief now
                run = ending.enter_context(tracking.ending(_chief_or_worker(cfg, job, dist)))
            settings = _plan(cfg, run, dist, lease, ending)
            recipe, data = _load(cfg, run, loading, settings.resume_from)
            _set_precision(cfg, run, recipe, data, dist.is_chief)
            logged = _log_data(cfg, run, recipe, data, dist.is_chief)
            # Variables, optimizers and compiles of every stage: one copy per replica.
            with dist.strategy.scope(), distribute.peer_failures(dist):
                model = _build(run, recipe, data, dist)
                if not gc.isenabled():  # the process's first run: __main__ turned it off
                    gc.freeze()  # what start-up made lives on (benchmarks/gc_startup.py)
                    gc.enable()
                history = recipe.fit(model, data, settings, sink=_sink(cfg, run, settings))
                calibrated = _calibrate(cfg, run, recipe, model, data, history)
                test_accuracy, reported = _evaluate(
                    cfg, run, recipe, model, data, history, calibrated
                )
                if cfg.mlflow.log_model:
                    _export(cfg, run, model, data, history, calibrated)
                for done in [*logged, *reported]:
                    done.result()  # its error, if it failed, is the run's
            val_accuracy = run.metric_history(["val_accuracy"])["val_accuracy"][-1]
            opened = run.opened() if dist.is_chief else None
        _after_finish(cfg, opened, settings.checkpoint_dir)
        log.info("val_accuracy %.4f, test_accuracy %.4f", val_accuracy, test_accuracy)
        _print_summary(opened, dist.worker, in_sweep=job.parent_run_id is not None)
    except KeyboardInterrupt as err:
        resilience.acknowledge()
        signum = getattr(err, "signum", signal.SIGINT)
        raise resilience.Interrupted(signum, _id_of(run), getattr(run, "ended", None)) from None
    finally:
        gc.enable()  # on already, unless start-up failed: the next job in this process
    return val_accuracy, opened


def _start_tensorflow(cfg: Config, threads: int) -> tuple[distribute.Distribution, Loading]:
    """TensorFlow configured, its distribution started, the images decoding in its threads."""
    from insect_exp.data import Loading

    _configure_tensorflow(cfg.seed, threads, cfg.deterministic, cfg.precision)
    # Before any other TensorFlow op: a multi-worker strategy configures the runtime.
    dist = distribute.start(cfg.train, cfg.batch_size, resume=cfg.resume is not None)
    log.info(dist.describe())
    multilabel = cfg.task is Task.multilabel
    return dist, Loading(cfg.dataset, cfg.model.image_size, cfg.seed, multilabel)


def _chief_or_worker(
    cfg: Config, job: sweep.JobContext, dist: distribute.Distribution
) -> tracking.TrackedRun:
    """The chief's run; other workers run the same ops (collectives need every worker) and log
    nothing: their checkpoints go to a scratch dir, as Keras's multi-worker guide does."""
    from insect_exp import tracking

    return _start_run(cfg, job) if dist.is_chief else tracking.WorkerRun()


def _plan(
    cfg: Config,
    run: tracking.TrackedRun,
    dist: distribute.Distribution,
    lease: resuming.Lease,
    ending: contextlib.ExitStack,
) -> FitSettings:
    """The fit's settings, with where its checkpoints go and the state to resume from; a new
    run's config is logged. A worker's scratch checkpoints go when `ending` closes."""
    from insect_exp.fit import FitSettings

    # Before the images are used: a store that cannot be used stops the run here.
    checkpoints, resume_from = _checkpoints(cfg, run, dist, lease)
    if checkpoints is not None and not dist.is_chief:
        ending.callback(shutil.rmtree, checkpoints, ignore_errors=True)
    if not cfg.resume:
        _log_config(run, cfg)
    return FitSettings.from_config(cfg, checkpoints, resume_from)


def _load(
    cfg: Config, run: tracking.TrackedRun, loading: Loading, resume_from: CheckpointState | None
) -> tuple[Recipe, Data]:
    """The model's recipe, prepared, and the decoded data (a resumed run's checked the same)."""
    from insect_exp import models, resilience

    recipe = models.recipe_for(cfg.model)
    recipe.prepare()  # before waiting for the images: offline weights fail in seconds
    data = loading.result()
    resilience.check()  # a signal swallowed while decoding
    _check_resumed(cfg, run, data, resume_from)
    return recipe, data


def _set_precision(
    cfg: Config, run: tracking.TrackedRun, recipe: Recipe, data: Data, is_chief: bool
) -> None:
    """The dtype policy of the model about to be built, logged as `precision_used`: the one
    configured, or precision=auto's choice (a resumed run's: the one it trained in)."""
    import tf_keras as keras

    from insect_exp import precision

    used = cfg.precision.value
    if cfg.precision is Precision.auto:
        before = run.opened().tags.get("precision_used") if cfg.resume and is_chief else None
        if before:
            used = before
            log.info("precision=auto: %s, as the run trained before resuming", before)
        else:
            choice = precision.choose(
                precision.device_features(), _check(cfg, recipe, data), tflite=cfg.export.wanted
            )
            # Reseeded: the model's weights do not depend on what the check drew.
            keras.utils.set_random_seed(cfg.seed)
            used = choice.policy
            (log.warning if choice.fell_back else log.info)(choice.line)
    keras.mixed_precision.set_global_policy(used)
    if not cfg.resume:
        run.log_params({"precision_used": used})
    run.set_tags({"precision_used": used})


def _check(cfg: Config, recipe: Recipe, data: Data) -> precision.Check:
    """precision=auto's check: the recipe's model trained on the first training images."""
    import numpy as np

    from insect_exp import fit, precision

    n = min(len(data.train), precision.CHECK_STEPS * min(cfg.batch_size, 32))
    labels = np.asarray(data.train.labels[:n])
    if labels.ndim == 2:  # the check compares numerics: a label set's first class will do
        labels = labels.argmax(axis=1)
    return precision.Check(
        build=lambda: recipe.build(len(data.class_names)),
        optimizer=lambda: fit.make_optimizer(cfg.optimizer),
        images=np.asarray(data.train.images[:n]),
        labels=labels,
        tolerance=cfg.precision_tolerance,
    )


def _log_data(
    cfg: Config, run: tracking.TrackedRun, recipe: Recipe, data: Data, is_chief: bool
) -> list[Future]:
    """A new run's data summary and the recipe's own artifacts, drawn and logged by the logging
    process while this one trains."""
    from insect_exp import report

    if cfg.resume or not is_chief:
        return []
    logged = [run.submit(report.log_data_summary, report.summarize_data(data, cfg.seed))]
    artifacts = recipe.artifacts(data, cfg.seed)  # made here: they may run a model
    if artifacts:
        logged.append(run.submit(report.log_artifacts, artifacts))
    return logged


def _build(
    run: tracking.TrackedRun, recipe: Recipe, data: Data, dist: distribute.Distribution
) -> Model:
    """The recipe's model, its summary and the replicas it trains on logged."""
    model = recipe.build(len(data.class_names))
    run.log_text(_summary(model), "model_summary.txt")
    # The model's own strategy: what it really trains on, every worker together.
    replicas = model.distribute_strategy.num_replicas_in_sync
    run.set_tags({"replicas": replicas, "devices": dist.describe()})
    return model


def _sink(cfg: Config, run: tracking.TrackedRun, settings: FitSettings) -> tracking.MetricSink:
    """Where fit's metrics go. A resumed run first replays the epochs the store may have lost,
    and logs again only the first value of a step it redoes."""
    from insect_exp import resilience

    if not cfg.resume:
        return run.sink
    state = settings.resume_from
    replayed = state.metrics if state is not None else {}
    sink = run.resumed_sink({*RESUMED_KEYS, *resilience.keys_of(replayed)})
    resilience.replay(replayed, sink)
    return sink


@dataclass(frozen=True)
class Calibrated:
    """What the end of training tunes on the validation split for the exported probabilities or
    labels: calibrate=temperature's temperature, or task=multilabel's per-class thresholds."""

    temperature: float | None = None
    thresholds: np.ndarray | None = None


def _calibrate(
    cfg: Config,
    run: tracking.TrackedRun,
    recipe: Recipe,
    model: Model,
    data: Data,
    history: History,
) -> Calibrated:
    """With calibrate=temperature, the temperature fitted on the validation split, logged with
    the validation split's calibration before and after; with task=multilabel, the per-class
    thresholds tuned there; else neither."""
    from insect_exp import calibration

    if cfg.task is Task.multilabel:
        from insect_exp.multilabel import report as multilabel

        logits = recipe.predict(model, data.val, cfg.batch_size)
        thresholds = multilabel.tune(
            run, logits, data.val.labels, data.class_names, cfg.threshold, _last_epoch(cfg, history)
        )
        return Calibrated(thresholds=thresholds)
    if cfg.calibrate is Calibrate.none:
        return Calibrated()
    if data.test is None or data.val_is_test:
        log.warning(
            "calibrate=temperature fits on the validation split, which is the split tested on "
            "here: the calibrated test scores are optimistic (hold out dataset.val_split > 0)"
        )
    logits = recipe.predict(model, data.val, cfg.batch_size)
    temperature = calibration.fit_temperature(logits, data.val.labels)
    found = calibration.report(logits, data.val.labels, temperature)
    metrics = {"temperature": temperature, **{f"val_{k}": v for k, v in found.items()}}
    run.log_metrics(metrics, _last_epoch(cfg, history))
    log.info(
        "temperature %.3f: validation ECE %.4f -> %.4f",
        temperature, found["ece_uncalibrated"], found["ece"],
    )  # fmt: skip
    return Calibrated(temperature=temperature)


def _evaluate(
    cfg: Config,
    run: tracking.TrackedRun,
    recipe: Recipe,
    model: Model,
    data: Data,
    history: History,
    calibrated: Calibrated,
) -> tuple[float, list[Future]]:
    """The test split's (else validation's) scores and calibration (of the probabilities the
    model is exported with: with its temperature, if any) logged; the test accuracy, and the
    training, prediction, reliability and Grad-CAM reports handed to the logging process.
    With task=multilabel (scored at its per-class thresholds), multilabel/report.py's."""
    from insect_exp import calibration, callbacks, explain, report

    reported = [run.submit(report.log_training, history.best_epoch, history.stopped_epoch)]
    test = data.test if data.test is not None else data.val
    logits = recipe.predict(model, test, cfg.batch_size)
    if calibrated.thresholds is not None:  # task=multilabel
        from insect_exp.multilabel import report as multilabel

        log.info("task=multilabel: no reliability diagram, Grad-CAM or top losses (one label each)")
        step = _last_epoch(cfg, history)
        found = multilabel.evaluate(
            run, test, logits, data.class_names, calibrated.thresholds, cfg.threshold, step
        )
        return found[0], reported + found[1]
    temperature = calibrated.temperature
    scores = callbacks.scores(logits, test.labels)
    scores.update(calibration.report(logits, test.labels, temperature))
    run.log_metrics({f"test_{k}": v for k, v in scores.items()}, _last_epoch(cfg, history))
    predictions = report.summarize_predictions(test, logits, data.class_names, cfg.seed)
    reported.append(run.submit(report.log_prediction_summary, predictions))
    reliability = calibration.Reliability.of(logits, test.labels, temperature)
    reported.append(run.submit(calibration.log_reliability, reliability))
    reported += explain.submit(run, cfg, recipe, model, data, logits)  # Grad-CAM, top losses
    return scores["accuracy"], reported


def _last_epoch(cfg: Config, history: History) -> int:
    """The step the end of training logs at: a run trained further is evaluated at a later one."""
    return cfg.epochs - 1 if history.stopped_epoch is None else history.stopped_epoch


def _export(
    cfg: Config,
    run: tracking.TrackedRun,
    model: Model,
    data: Data,
    history: History,
    calibrated: Calibrated,
) -> None:
    """The model logged (and registered if asked) as a pyfunc over its SavedModel: encoded files
    or float images in; class names, probabilities (softmax(logits / temperature)) or logits for
    float images out; a multi-label model's label sets at its thresholds. See
    insect_exp/serving.py."""
    import tensorflow as tf

    from insect_exp import export
    from insect_exp.models.layers import ServingModule

    size, pixels = cfg.model.image_size, cfg.dataset.max_image_pixels
    if calibrated.thresholds is not None:  # task=multilabel
        from insect_exp.models.multilabel import MultiLabelServingModule

        module: ServingModule = MultiLabelServingModule(model, size, calibrated.thresholds, pixels)
    else:
        temperature = calibrated.temperature
        module = ServingModule(model, size, pixels, 1.0 if temperature is None else temperature)
    requirements = [f"tensorflow=={tf.__version__}"]
    test = data.test if data.test is not None else data.val
    with tempfile.TemporaryDirectory(prefix="insect_exp-model-") as tmp:
        files = export.write_model(module, data.class_names, tmp, cfg.export)
        uri_model = run.log_tf_model(
            {key: str(path) for key, path in files.items()},
            requirements,
            input_example=export.input_example(test.images[0]),
            metadata={
                **export.metadata(data.class_names, size, pixels),
                "task": cfg.task.value,
            },
            registered_model_name=cfg.mlflow.registered_model_name,
            step=_weights_epoch(cfg, history),
        )
    log.info("model logged: %s", uri_model)


def _after_finish(cfg: Config, opened: tracking.Opened | None, checkpoints: str | None) -> None:
    """The run is FINISHED (None: a worker's): a signal now only says so; its checkpoints go."""
    from insect_exp import resilience

    if opened is None:
        return
    resilience.finished(opened.run_id)
    # A signal whose exception a finalizer swallowed before `finished` took the signals over is
    # acted on here, as one that came after the run's end.
    resilience.check()
    if not cfg.train.keep_checkpoints:
        resuming.drop_checkpoints(checkpoints)


def _print_summary(opened: tracking.Opened | None, worker: int, in_sweep: bool) -> None:
    """Where the run is and how to look at it (a worker: that the chief logged it)."""
    from insect_exp import tracking

    if opened is None:
        print(f"worker {worker} done; the chief (worker 0) logged the run")
        return
    print(f"MLflow run id: {opened.run_id}")
    if not in_sweep:  # a sweep prints where its runs are once, at its end
        print(tracking.ui_footer(opened.ui_command, opened.ui_url, opened.tracking_uri))


def _weights_epoch(cfg: Config, history: History) -> int | None:
    """The epoch whose weights the model ends with: early stopping's best, or (None) the last."""
    es = cfg.train.early_stopping
    return history.best_epoch if es.enabled and es.restore_best else None


def _start_run(cfg: Config, job: sweep.JobContext) -> tracking.RemoteRun:
    """The logging process, opening a new run (named and tagged) or the run to resume."""
    from insect_exp.tracking import formats
    from insect_exp.tracking.remote import Opening, RemoteRun

    rt = cfg.runtime
    name = cfg.mlflow.run_name or formats.run_name(
        cfg.model.name, cfg.optimizer.name, job.overrides
    )
    return RemoteRun(
        Opening(
            tracking_uri=job.tracking_uri or cfg.mlflow.tracking_uri,
            launch_dir=rt.launch_dir,
            experiment_name=cfg.mlflow.experiment_name,
            run_name=name,
            tags={**job.tags, **cfg.mlflow.tags},
            parent_run_id=job.parent_run_id,
            experiment_id=job.experiment_id,
            check_store=job.parent_run_id is None,  # a sweep's store was checked before its jobs
            # Where the run goes on offline if its store stops answering (insect_exp.upload).
            spool_dir=str(Path(rt.output_dir) / SPOOL_DIR) if rt.output_dir else None,
            resume=cfg.resume,
        )
    )


def _checkpoints(
    cfg: Config, run: tracking.TrackedRun, dist: distribute.Distribution, lease: resuming.Lease
) -> tuple[str | None, CheckpointState | None]:
    """Where the run's checkpoints go (None: no output dir to keep them in), and the checkpoint
    state to resume from (None for a new run). Waits for the run to be open; a new run's lease
    is taken (a resumed one's was, before it opened)."""
    from insect_exp import resilience

    if not dist.is_chief:
        return tempfile.mkdtemp(prefix=f"insect_exp-worker{dist.worker}-"), None
    opened = run.opened()
    if cfg.resume:
        directory = opened.tags.get(CHECKPOINT_TAG)
        # None: it died before its first checkpoint, and starts over in the same run.
        state = resilience.read_state(directory) if directory else None
        done = resilience.epochs_done(state)
        log.info("resuming run %s %s", opened.run_id, resilience.progress(done, cfg.epochs))
        return directory, state
    directory = resuming.checkpoint_dir(cfg.runtime.output_dir, opened.run_id)
    if directory:
        lease.take(directory, opened.run_id)
        # Made now, empty until the first checkpoint: a resume tells "none yet" from "removed".
        Path(directory).mkdir(parents=True, exist_ok=True)
        resume = f"python -m insect_exp resume={opened.run_id}"
        run.set_tags({CHECKPOINT_TAG: directory, "resume_command": resume})
    log.info("MLflow run %s (%s) in %s", opened.run_id, opened.run_name, opened.tracking_uri)
    return directory, None


def _check_resumed(
    cfg: Config, run: tracking.TrackedRun, data: Data, state: CheckpointState | None
) -> None:
    """A resumed run goes on only with the data it trained on; then it says where it went on.

    Raises:
        resuming.RefusedAfterOpening: the data's digest differs (the run is put back as it was).
    """
    from insect_exp import report, resilience
    from insect_exp.tracking.worker import WorkerRun

    if not cfg.resume or isinstance(run, WorkerRun):
        return
    opened = run.opened()
    resuming.check_same_data(opened.run_id, opened.digests, report.lineage(data))
    # Epochs completed before the resume, as Keras counts them (`Epoch 3/5` done: 3).
    run.set_tags({"resumed_after_epoch": resilience.epochs_done(state), "epochs": cfg.epochs})


def _id_of(run: tracking.TrackedRun | None) -> str | None:
    """The run's id, or None where there is none (no run yet, a worker's, or it never opened)."""
    if run is None:
        return None
    with contextlib.suppress(Exception):  # a run that never opened raises what kept it closed
        return run.run_id
    return None


def _log_config(run: tracking.TrackedRun, cfg: Config) -> None:
    """The resolved config as params and YAML, the overrides, and Hydra's own snapshot."""
    from omegaconf import OmegaConf

    from insect_exp.tracking.formats import flatten

    rt = cfg.runtime
    run.log_params(flatten(cfg.params()))
    run.log_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)), "config/config.yaml")
    run.log_dict(list(rt.overrides), "config/overrides.json")
    if rt.output_dir and rt.config_subdir:
        snapshot = Path(rt.output_dir) / rt.config_subdir
        if snapshot.is_dir():
            run.log_artifacts(snapshot, "config/hydra")


def _configure_tensorflow(
    seed: int, threads: int, deterministic: bool, precision: Precision
) -> None:
    import tensorflow as tf
    import tf_keras as keras

    if threads > 0:
        # Only possible before TensorFlow's runtime starts; later jobs in the same process keep it.
        with contextlib.suppress(RuntimeError):
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed)  # Python, NumPy and TensorFlow
    # Set on every run: a policy is process-wide and outlives a job of an in-process sweep.
    # precision=auto decides once the data is loaded (_set_precision).
    keras.mixed_precision.set_global_policy(
        "float32" if precision is Precision.auto else precision.value
    )


def _summary(model) -> str:
    out = io.StringIO()
    model.summary(print_fn=lambda line, **_: out.write(line + "\n"), expand_nested=True)
    return out.getvalue()


commands.make_callable(__name__)  # insect_exp.train(...) is insect_exp.api.train
