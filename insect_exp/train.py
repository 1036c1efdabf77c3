"""The train job: config -> data -> model -> fit -> evaluate -> MLflow. Only wiring lives here."""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import shlex
import shutil
import signal
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from insect_exp import distribute, sweep
from insect_exp.config import Config, Precision
from insect_exp.upload import SPOOL_DIR

if TYPE_CHECKING:
    from insect_exp import tracking

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "checkpoint_dir"
# Metrics a resumed run may log again for the epoch it redoes: only their first values count.
RESUMED_KEYS = (
    "loss", "accuracy", "val_loss", "val_accuracy", "lr", "batch_loss", "batch_accuracy",
    "backbone_images_computed", "backbone_images_reused",
)  # fmt: skip


def run(cfg: Config) -> float:
    """Train and log one model as `cfg` says; return the final validation accuracy for sweepers.

    With cfg.resume, continue that run from its last checkpoint, in the same MLflow run.
    """
    distribute.before_tensorflow(cfg.train)
    import tensorflow as tf

    from insect_exp import callbacks, models, resilience
    from insect_exp.data import Loading
    from insect_exp.fit import FitSettings
    from insect_exp.models.common import ServingModule

    rt = cfg.runtime
    job = sweep.current_job(rt)  # inside a multirun: parent run, experiment, thread share
    _configure_tensorflow(cfg.seed, cfg.threads or job.threads, cfg.deterministic, cfg.precision)
    # Before any other TensorFlow op: a multi-worker strategy configures the runtime.
    dist = distribute.start(cfg.train, cfg.batch_size, resume=cfg.resume is not None)
    log.info(dist.describe())
    # The train split decodes in TensorFlow's threads, on the cores that importing MLflow, opening
    # its store and starting the run leave idle (they hold the GIL, the decoding does not).
    loading = Loading(cfg.dataset, cfg.model.image_size, cfg.seed)
    from insect_exp import report, tracking

    uri = job.tracking_uri or tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri, rt.launch_dir)
    if dist.is_chief:
        if job.parent_run_id is None:  # a sweep's store was checked once before its jobs
            tracking.prepare_store(uri)
        run, checkpoints, resume_from = _open_run(cfg, job, uri)
    else:
        # Other workers run the same ops (collectives need every worker) and log nothing; their
        # checkpoints go to a scratch dir, as Keras's multi-worker guide does.
        run, resume_from = distribute.WorkerRun(), None
        checkpoints = tempfile.mkdtemp(prefix=f"insect_exp-worker{dist.worker}-")
    # Logging that nothing downstream waits for runs here while the model builds, trains,
    # predicts and exports (TensorFlow's kernels release the GIL): the data's stats, lineage and
    # sample grids, then the plots of training and predictions.
    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="insect_exp-logging")
    try:
        with tracking.ending(run), background:
            if not cfg.resume:
                _log_config(run, cfg)
            recipe = models.recipe_for(cfg.model)
            recipe.prepare()  # before waiting for the images: offline weights fail in seconds
            data = loading.result()
            resilience.check()  # a signal swallowed while decoding
            data_logged = None
            if not cfg.resume:  # one thread: matplotlib draws one figure at a time
                data_logged = background.submit(_log_data, run, data, recipe, cfg.seed)
            # Variables, optimizers and compiles of every stage: one copy per replica.
            with dist.strategy.scope(), distribute.peer_failures(dist):
                model = recipe.build(len(data.class_names))
                run.log_text(_summary(model), "model_summary.txt")
                # The model's own strategy: what it really trains on, every worker together.
                replicas = model.distribute_strategy.num_replicas_in_sync
                run.set_tags({"replicas": replicas, "devices": dist.describe()})
                settings = FitSettings.from_config(cfg, checkpoints, resume_from)
                sink = run.resumed_sink(RESUMED_KEYS) if cfg.resume else run.sink
                # The command turned the collector off for start-up (__main__); what start-up
                # made lives on, so later collections skip it.
                if not gc.isenabled():  # the process's first run (a sweep's next job finds it on)
                    gc.freeze()
                    gc.enable()
                history = recipe.fit(model, data, settings, sink=sink)
                # The plots are drawn in the background too, while the model predicts and exports.
                logged = [data_logged, background.submit(report.log_training, run, history)]

                test = data.test if data.test is not None else data.val
                logits = recipe.predict(model, test, cfg.batch_size)
                test_scores = callbacks.scores(logits, test.labels)
                run.log_metrics({f"test_{k}": v for k, v in test_scores.items()})
                logged.append(
                    background.submit(
                        report.log_predictions, run, test, logits, data.class_names, cfg.seed
                    )
                )

                if cfg.mlflow.log_model:
                    from insect_exp import export

                    # A pyfunc over the SavedModel: encoded files or float images in; class names,
                    # probabilities (or logits for float images) out. See insect_exp/serving.py.
                    module = ServingModule(model, cfg.model.image_size)
                    requirements = [f"tensorflow=={tf.__version__}"]
                    with tempfile.TemporaryDirectory(prefix="insect_exp-model-") as tmp:
                        files = export.write_model(module, data.class_names, tmp, cfg.export)
                        uri_model = run.log_tf_model(
                            files,
                            requirements,
                            input_example=export.input_example(test.images[0]),
                            metadata=export.metadata(data.class_names, cfg.model.image_size),
                            registered_model_name=cfg.mlflow.registered_model_name,
                        )
                    log.info("model logged: %s", uri_model)
                for done in logged:
                    if done is not None:
                        done.result()  # its error, if it failed, is the run's
    except KeyboardInterrupt as err:
        resilience.acknowledge()
        signum = getattr(err, "signum", signal.SIGINT)
        raise resilience.Interrupted(signum, run.run_id) from None
    finally:
        gc.enable()  # on already, unless start-up failed: the next job in this process
        if not dist.is_chief:
            shutil.rmtree(checkpoints, ignore_errors=True)
    val_accuracy = run.metric_history(["val_accuracy"])["val_accuracy"][-1]
    log.info("val_accuracy %.4f, test_accuracy %.4f", val_accuracy, test_scores["accuracy"])
    if not dist.is_chief:
        print(f"worker {dist.worker} done; the chief (worker 0) logged the run")
        return val_accuracy
    print(
        f"MLflow run id: {run.run_id}\nOpen the UI: {tracking.ui_command(uri)}\n"
        f"  then: {tracking.ui_url(uri, run.experiment_id)}\n"
        f"For MLflow's commands and API: export MLFLOW_TRACKING_URI={shlex.quote(uri)}"
    )
    return val_accuracy


def _open_run(cfg: Config, job: sweep.JobContext, uri: str):
    """A new run with its config logged, or the run to resume and its last checkpoint.

    Returns:
        The run, where its checkpoints go (None: no output dir to keep them in), and the
        checkpoint state to resume from (None for a new run).
    """
    from insect_exp import resilience, tracking

    if cfg.resume:
        run = tracking.reopen_run(uri, cfg.resume)
        directory = run.client.get_run(run.run_id).data.tags.get(CHECKPOINT_TAG)
        # None: it died before its first checkpoint, and starts over in the same run.
        state = resilience.read_state(directory) if directory else None
        after = -1 if state is None else state.epoch
        run.set_tags({"resumed_after_epoch": after, "epochs": cfg.epochs})
        log.info("resuming run %s after epoch %d", run.run_id, after)
        return run, directory, state
    name = cfg.mlflow.run_name or tracking.run_name(
        cfg.model.name, cfg.optimizer.name, job.overrides
    )
    tags = {**tracking.environment_tags(), **job.tags, **cfg.mlflow.tags}
    run = tracking.start_new_run(
        uri, cfg.mlflow.experiment_name, name, tags, job.parent_run_id, job.experiment_id
    )
    directory = None
    if cfg.runtime.output_dir:
        # Where the run goes on offline if its store stops answering (python -m insect_exp.upload).
        run.spool_to(Path(cfg.runtime.output_dir) / SPOOL_DIR, uri)
        directory = str(Path(cfg.runtime.output_dir) / "checkpoints")
        resume = f"python -m insect_exp resume={run.run_id}"
        run.set_tags({CHECKPOINT_TAG: directory, "resume_command": resume})
    log.info("MLflow run %s (%s) in %s", run.run_id, name, uri)
    return run, directory, None


def _log_data(run: tracking.Run, data, recipe, seed: int) -> None:
    """The data's stats, lineage and sample grids, and the recipe's own artifacts."""
    from insect_exp import report

    report.log_data(run, data, seed)
    report.log_artifacts(run, recipe.artifacts(data, seed))


def _log_config(run: tracking.Run, cfg: Config) -> None:
    """The resolved config as params and YAML, the overrides, and Hydra's own snapshot."""
    from omegaconf import OmegaConf

    from insect_exp import tracking

    rt = cfg.runtime
    run.log_params(tracking.flatten(cfg.params()))
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
    keras.mixed_precision.set_global_policy(precision.value)


def _summary(model) -> str:
    out = io.StringIO()
    model.summary(print_fn=lambda line, **_: out.write(line + "\n"), expand_nested=True)
    return out.getvalue()
