"""MLflow behind one small module: where the store is, the run's lifecycle, and what gets logged."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

STORE_DIR = "mlruns"
_MAX_BATCH = 1000  # MLflow's limit of metrics in one log_batch call
_VERSIONED = ("tensorflow", "tf-keras", "tensorflow-hub", "mlflow", "hydra-core", "insect_exp")


def default_tracking_uri(launch_dir: str | Path) -> str:
    """SQLite database under mlruns/ in the directory the user launched from."""
    return f"sqlite:///{Path(launch_dir).resolve() / STORE_DIR / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None, launch_dir: str | Path) -> str:
    """Config first, then $MLFLOW_TRACKING_URI, then the default SQLite store."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    (Path(launch_dir) / STORE_DIR).mkdir(parents=True, exist_ok=True)
    return default_tracking_uri(launch_dir)


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Create the experiment if needed (artifacts beside a local SQLite store) and return its id."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        # Without this MLflow puts artifacts in ./mlruns of whatever the current directory is.
        db_path = Path(tracking_uri.removeprefix("sqlite:///"))
        location = (db_path.parent / "artifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another job created it between our lookup and create.
        return client.get_experiment_by_name(name).experiment_id


def run_name(model: str, optimizer: str, overrides: Sequence[str] = ()) -> str:
    """A readable run name: model, optimizer, then the other command-line overrides."""
    extra = [o for o in overrides if not o.startswith(("model=", "optimizer=", "hydra"))]
    return " ".join([f"{model}-{optimizer}", *extra])[:250]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping to dotted keys: {"model": {"name": "cnn"}} -> {"model.name": "cnn"}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def environment_tags(launch_dir: str | Path) -> dict[str, str]:
    """Git commit of the launch directory (if it is a repository) and package versions."""
    tags = {}
    for package in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[f"version.{package}"] = metadata.version(package)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=launch_dir,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        tags["mlflow.source.git.commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


class Run:
    """The active MLflow run; every logging call of a training job goes through here."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = MlflowClient()

    def log_params(self, params: Mapping[str, Any]) -> None:
        mlflow.log_params({k: _param_value(v) for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        mlflow.log_metrics(dict(metrics), step=step)

    def log_series(self, series: Mapping[str, Sequence[float]], first_step: int = 0) -> None:
        """Log whole metric histories (e.g. per-batch loss) in a few batched calls."""
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, first_step + i)
            for key, values in series.items()
            for i, value in enumerate(values)
        ]
        for start in range(0, len(metrics), _MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + _MAX_BATCH])

    def log_dict(self, data: Any, artifact_file: str) -> None:
        mlflow.log_dict(data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        mlflow.log_text(text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Log a matplotlib Figure as a PNG (laid out by its builder: no second tight-bbox pass).

        zlib level 1 instead of 6 halves the time to write image grids for ~20% larger files.
        """
        save_kwargs = {"dpi": 100, "pil_kwargs": {"compress_level": 1}}
        mlflow.log_figure(figure, artifact_file, save_kwargs=save_kwargs)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifacts(str(local_dir), artifact_path)

    def log_tf_model(
        self,
        module: Any,
        input_shape: Sequence[int],
        num_outputs: int,
        requirements: Sequence[str],
        name: str = "model",
    ) -> str:
        """Log a tf.Module SavedModel with an explicit signature and requirements; return its URI.

        A plain TensorFlow SavedModel reloads in any process with only TensorFlow installed: no
        Keras version flag, no pickled custom objects (hub.KerasLayer) at load time. Giving the
        signature and requirements skips MLflow's slow inference of both.
        """
        import mlflow.tensorflow
        import numpy as np
        import tensorflow as tf
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_outputs))]),
        )
        # TF2 loading restores variables by itself; the saver ops TF1 loaders need would take
        # a third of the save time of a hub model to build.
        options = tf.saved_model.SaveOptions(experimental_skip_saver=True)
        info = mlflow.tensorflow.log_model(
            module,
            name=name,
            signature=signature,
            pip_requirements=list(requirements),
            saved_model_kwargs={"options": options},
        )
        return info.model_uri


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:6000]  # MLflow's limit on a param value


@contextlib.contextmanager
def start_run(
    tracking_uri: str,
    experiment_name: str,
    name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    experiment_id: str | None = None,
) -> Iterator[Run]:
    """Open a run that ends FINISHED, or FAILED with the error recorded on it.

    Args:
        parent_run_id: nests this run under a sweep's parent run.
        experiment_id: the sweep's experiment, created once before its jobs; skips the lookup.
    """
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = experiment_id or ensure_experiment(tracking_uri, experiment_name)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=all_tags) as active:
        run = Run(active.info.run_id)
        try:
            yield run
        except BaseException as err:
            # Keep whatever was logged; add the error so a failed run explains itself in the UI.
            with contextlib.suppress(Exception):
                mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:5000])
                mlflow.log_text(traceback.format_exc(), "error.txt")
            raise


def ui_command(tracking_uri: str) -> str:
    """The shell command that opens the MLflow UI on this store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


# Sweeps: a parent run that the jobs of a multirun nest under. These work by run id through the
# client, never through the fluent API's active run, which belongs to whichever job runs here.


@dataclass
class RunRecord:
    """What a sweep summary reads of one run."""

    run_id: str
    name: str
    status: str
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    # Full histories of the metrics asked for, ordered by step.
    history: dict[str, list[float]] = field(default_factory=dict)


def create_run(
    tracking_uri: str,
    experiment_id: str,
    name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Open a RUNNING run (a sweep parent, or a stand-in for a job that died early); return id."""
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    client = MlflowClient(tracking_uri)
    return client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id


def log_to_run(
    tracking_uri: str,
    run_id: str,
    *,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
    texts: Mapping[str, str] | None = None,
    figures: Mapping[str, Any] | None = None,
) -> None:
    """Log params, metrics, tags, text artifacts and matplotlib figures into a run by its id."""
    from mlflow.entities import Param, RunTag

    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
        params=[Param(k, _param_value(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()],
    )
    for path, text in (texts or {}).items():
        client.log_text(run_id, text, path)
    for path, figure in (figures or {}).items():
        client.log_figure(run_id, figure, path, save_kwargs={"dpi": 100, "bbox_inches": "tight"})


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Close a run opened with create_run as FINISHED, FAILED or KILLED."""
    MlflowClient(tracking_uri).set_terminated(run_id, status)


def child_runs(
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    history_keys: Sequence[str] = (),
) -> list[RunRecord]:
    """Every run nested under a parent, with the metric histories asked for."""
    client = MlflowClient(tracking_uri)
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    found, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            break
    return [
        RunRecord(
            run_id=run.info.run_id,
            name=run.info.run_name,
            status=run.info.status,
            tags=dict(run.data.tags),
            metrics=dict(run.data.metrics),
            history={
                key: [
                    m.value
                    for m in sorted(client.get_metric_history(run.info.run_id, key), key=_step)
                ]
                for key in history_keys
            },
        )
        for run in found
    ]


def _step(metric: Metric) -> tuple[int, int]:
    return metric.step, metric.timestamp
