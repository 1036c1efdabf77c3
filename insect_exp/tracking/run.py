"""One MLflow run: what it logs, by its own id, and how it ends (or goes on offline)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as metadata_version
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from insect_exp import UserError
from insect_exp.errors import first_line
from insect_exp.tracking.formats import param_value, to_tsv
from insect_exp.tracking.interface import MetricSink, Opened, ending, unlogged_steps_only
from insect_exp.tracking.lineage import CONTEXT_TAG, SplitRecord
from insect_exp.tracking.spool import INPUTS_FILE, Spool
from insect_exp.tracking.store import (
    ensure_experiment,
    open_client,
    retry_if_raced,
    ui_command,
    ui_url,
    with_busy_timeout,
)

log = logging.getLogger(__name__)

CURRENT_MODEL_TAG = "current_model"  # the URI of the run's latest logged model
_MAX_BATCH = 1000  # MLflow's limit of metrics in one log_batch call
_MAX_PARAMS = 100  # ... and of params
__all__ = ["Run", "environment_tags", "reopen_run", "start_new_run", "start_run"]
_VERSIONED = ("tensorflow", "tf-keras", "tensorflow-hub", "mlflow", "hydra-core", "insect_exp")


def environment_tags() -> dict[str, str]:
    """Package versions, and the git commit of this package's source when it is a checkout.

    MLflow's own `mlflow.source.git.commit` (of the entry point's repository) is left as MLflow
    sets it: the launch directory may be another repository altogether.
    """
    tags = {}
    for package in _VERSIONED:
        with contextlib.suppress(PackageNotFoundError):
            tags[f"version.{package}"] = metadata_version(package)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        tags["insect_exp.git_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass  # an installed package, or git missing
    return tags


class Run:
    """One MLflow run, written by its id: two runs in one process never cross.

    Given a spool directory (`spool_to`), a run whose store stops answering goes on offline:
    whatever it logs from then on is saved there, to upload later (tracking/spool.py).
    """

    def __init__(self, client: MlflowClient, run_id: str, tracking_uri: str | None = None):
        self.client = client
        self.run_id = run_id
        # The store as the user named it (the client's own may carry a busy timeout).
        self._tracking_uri = tracking_uri
        self.experiment_id = client.get_run(run_id).info.experiment_id
        self._pending: list[Metric] = []
        # Every metric this process logged, by key and step: the curves when the store is gone.
        self._logged: dict[str, dict[int, float]] = {}
        self.spool: Spool | None = None
        self.offline = False
        # How a reopened run was found (status, error tag): where a refused resume leaves it.
        self.found_as: tuple[str, str | None] = ("FAILED", None)
        # train.py logs from a background thread while training logs metrics: one thread at a
        # time sends the metric buffer,
        self._buffer = threading.RLock()
        # and one at a time talks to the store (or the spool), or switches to the spool: two
        # writers of one process on an SQLite store wait on each other's locks (up to the busy
        # timeout) instead of taking turns.
        self._io = threading.Lock()

    def opened(self) -> Opened:
        """The run as the store holds it: name, tags, dataset digests, and how to look at it."""
        found = self.client.get_run(self.run_id)
        uri = self._tracking_uri or self.client.tracking_uri
        return Opened(
            self.run_id,
            found.info.run_name,
            self.experiment_id,
            uri,
            dict(found.data.tags),
            ui_command(uri),
            ui_url(uri, self.experiment_id),
            digests=_digests(found),
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run fn(self, *args) now, in this thread; its result or its error as a Future."""
        done: Future = Future()
        try:
            done.set_result(fn(self, *args))
        except Exception as err:
            done.set_exception(err)
        return done

    def spool_to(self, directory: str | Path, tracking_uri: str) -> None:
        self.spool = Spool(directory, self.run_id, tracking_uri, self.experiment_id)

    def _write(self, online: Callable[[], Any], offline: Callable[[Spool], Any]) -> None:
        """Send to the store; once it fails (and a spool is set), save locally from then on."""
        with self._io:
            if not self.offline:
                try:
                    online()
                    return
                except Exception as err:
                    if self.spool is None:
                        raise
                    self.spool.open()
                    self.offline = True
                    log.warning(
                        "the MLflow store stopped answering (%s): saving run %s in %s",
                        first_line(err),
                        self.run_id,
                        self.spool.dir,
                    )
            assert self.spool is not None  # offline: a spool took over
            offline(self.spool)  # the spool's JSON files are read, merged and written back

    def sink(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer metrics; send them once an epoch-level one arrives (per-batch ones wait).

        What cannot be sent (the store is down) stays buffered and is tried again next time.
        """
        now = int(time.time() * 1000)
        with self._buffer:
            self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
            full = len(self._pending) >= _MAX_BATCH
        if full or any(not k.startswith("batch_") for k in metrics):
            self.flush(raise_errors=False)

    def resumed_sink(self, keys: Iterable[str]) -> MetricSink:
        """A sink for a resumed run that sends no step of `keys` the run already holds."""
        return unlogged_steps_only(self.sink, self.last_steps(keys))

    def last_steps(self, keys: Iterable[str]) -> dict[str, int]:
        """The last step the run holds of each metric (-1: none)."""
        return {
            key: max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
            for key in keys
        }

    def flush(self, raise_errors: bool = True) -> None:
        """Send the buffered metrics (to the spool once offline)."""
        with self._buffer:
            while self._pending:
                chunk = self._pending[:_MAX_BATCH]
                try:
                    self._write(
                        functools.partial(self.client.log_batch, self.run_id, metrics=chunk),
                        functools.partial(Spool.metrics, metrics=chunk),
                    )
                except Exception as err:
                    if raise_errors:
                        raise
                    log.warning("metrics kept to send later: %s", first_line(err))
                    return
                for m in chunk:
                    self._logged.setdefault(m.key, {})[m.step] = m.value
                del self._pending[: len(chunk)]

    def metric_history(self, keys: Iterable[str]) -> dict[str, list[float]]:
        """Every value of each metric, by step: from the store, or offline what was logged here."""
        self.flush()
        if not self.offline:
            try:
                with self._io:
                    return {
                        key: [
                            m.value
                            for m in sorted(
                                self.client.get_metric_history(self.run_id, key), key=_step
                            )
                        ]
                        for key in keys
                    }
            except Exception:
                if self.spool is None:
                    raise
        return {k: [v for _, v in sorted(self._logged.get(k, {}).items())] for k in keys}

    def log_params(self, params: Mapping[str, Any]) -> None:
        values = {k: param_value(v) for k, v in params.items()}
        items = [Param(k, v) for k, v in values.items()]

        def online() -> None:
            for start in range(0, len(items), _MAX_PARAMS):
                self.client.log_batch(self.run_id, params=items[start : start + _MAX_PARAMS])

        self._write(online, lambda spool: spool.params(values))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.flush()
        self.sink(dict(metrics), step or 0)
        self.flush()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        values = {k: str(v)[:5000] for k, v in tags.items()}
        items = [RunTag(k, v) for k, v in values.items()]
        self._write(
            lambda: self.client.log_batch(self.run_id, tags=items),
            lambda spool: spool.tags(values),
        )

    def log_inputs(self, records: Sequence[SplitRecord]) -> None:
        """Log dataset inputs (lineage.py); offline, they are kept as dataset/inputs.json."""
        inputs = [r.to_input() for r in records]
        as_json = json.dumps([{**asdict(r)} for r in records], indent=2)
        self._write(
            lambda: retry_if_raced(lambda: self.client.log_inputs(self.run_id, datasets=inputs)),
            lambda spool: spool.artifact(INPUTS_FILE).write_text(as_json),
        )

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._write(
            lambda: self.client.log_text(self.run_id, text, artifact_file),
            lambda spool: spool.artifact(artifact_file).write_text(text),
        )

    def log_table(self, header: Sequence[str], rows: Iterable[Sequence[Any]], artifact_file: str):
        """Log a table as a TSV file that stays valid for any file name in it."""
        self.log_text(to_tsv(header, rows), artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Log a matplotlib Figure as a PNG (laid out by its builder: no second tight-bbox pass)."""
        save_kwargs = {"dpi": 100}  # plots.GRID_DPI: one image pixel is one pixel of the PNG
        self._write(
            lambda: self.client.log_figure(
                self.run_id, figure, artifact_file, save_kwargs=save_kwargs
            ),
            lambda spool: figure.savefig(spool.artifact(artifact_file), **save_kwargs),
        )

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._write(
            lambda: self.client.log_artifacts(self.run_id, str(local_dir), artifact_path),
            lambda spool: spool.artifacts(local_dir, artifact_path),
        )

    def end(self, status: str) -> None:
        """Set the run's final status; offline, say where it is saved and how to upload it."""
        self._write(
            lambda: self.client.set_terminated(self.run_id, status),
            lambda spool: spool.finish(status),
        )
        if self.offline and self.spool is not None:
            print(
                f"insect_exp: the MLflow store was unreachable: run {self.run_id} ({status}) is "
                f"saved in {self.spool.dir}; upload it with: "
                f"python -m insect_exp.upload {self.spool.dir}",
                file=sys.stderr,
            )

    def put_back(self) -> None:
        """End the run as it was found (a resume refused before it trained): status, error tag."""
        status, error = self.found_as
        if error is not None:
            self.set_tags({"error": error})
        self._write(
            lambda: self.client.set_terminated(self.run_id, status),
            lambda spool: spool.finish(status),
        )

    def log_tf_model(
        self,
        artifacts: Mapping[str, str | Path],
        requirements: Sequence[str],
        name: str = "model",
        *,
        input_example: Any = None,
        metadata: Mapping[str, Any] | None = None,
        registered_model_name: str | None = None,
        step: int | None = None,
    ) -> str:
        """Log a trained SavedModel as an MLflow pyfunc model (insect_exp/serving.py); its URI.

        `artifacts` are the model's files by key (insect_exp/export.py: the SavedModel, the class
        names, labels.txt, model.tflite); they land in the model's artifacts/ folder. The pyfunc
        is logged as code, not pickled: it reloads in any process with MLflow and TensorFlow
        only, no Keras flag, no custom objects. The signature (outputs only: inputs are either
        encoded files or float images) and the requirements are given, which skips MLflow's slow
        inference of both; the input example is stored, not run.

        The model is saved here and sent as the upload of a spooled one is
        (tracking/logged_model.py): the same files, the same links to the run's metrics.

        Args:
            requirements: pip requirements beyond MLflow, NumPy and pandas (TensorFlow's),
                pinned to the installed versions.
            registered_model_name: also register the model as a new version of this registered
                model (offline: when the spooled run is uploaded).
            step: the epoch whose weights the model holds (early stopping's best one); None: the
                last. The model's page shows the run's metrics at that epoch, and its test scores.
        """
        settings = _model_settings(artifacts, requirements, input_example, metadata)
        saved: list[tuple[str, int | None]] = []
        self.flush(raise_errors=False)  # the metrics the model is linked to are in the run
        with _artifact_progress_bars_off():
            self._write(
                lambda: saved.append(self._save_model(name, settings, step, registered_model_name)),
                lambda spool: saved.append(
                    _spool_model(spool, settings, step, registered_model_name)
                ),
            )
        uri, version = saved[0]
        if registered_model_name and version is not None:
            log.info("model registered as %s version %s", registered_model_name, version)
        if not self.offline:
            # A run trained further (resume=<id> epochs=<more>) logs a model each time: the tag
            # says which one its final metrics belong to.
            self.set_tags({CURRENT_MODEL_TAG: uri})
        return uri

    def _save_model(
        self, name: str, settings: dict[str, Any], step: int | None, registered: str | None
    ) -> tuple[str, int | None]:
        """Save the model as this run's logged model, linked to its metrics; (URI, version)."""
        import mlflow.pyfunc
        from mlflow.models import Model

        from insect_exp.tracking import logged_model

        # In this run's experiment, linked to the run by id (the fluent log_model would file it
        # under the process's active run, and there is none).
        logged = self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=self.run_id
        )
        description = Model(
            artifact_path=logged.artifact_location,
            run_id=self.run_id,
            model_uuid=logged.model_id,
            model_id=logged.model_id,
        )
        with tempfile.TemporaryDirectory(prefix="insect_exp-mlmodel-") as tmp:
            local = Path(tmp) / name
            mlflow.pyfunc.save_model(str(local), mlflow_model=description, **settings)
            version = logged_model.complete(
                self.client, self.run_id, logged.model_id, local, step, registered
            )
        return f"models:/{logged.model_id}", version


def _model_settings(
    artifacts: Mapping[str, str | Path],
    requirements: Sequence[str],
    input_example: Any,
    metadata: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """mlflow.pyfunc.save_model's arguments for a model served by insect_exp/serving.py."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Map, Schema

    from insect_exp import serving

    if isinstance(input_example, Mapping):  # columns (export.input_example)
        import pandas as pd

        input_example = pd.DataFrame(input_example)
    outputs = Schema(
        [
            ColSpec(DataType.string, "label"),
            ColSpec(DataType.double, "probability"),
            ColSpec(Map(DataType.double), "probabilities"),
        ]
    )
    pinned = [
        f"{package}=={metadata_version(package)}" for package in ("mlflow", "numpy", "pandas")
    ]
    return {
        "python_model": str(Path(serving.__file__).resolve()),
        "artifacts": {key: str(path) for key, path in artifacts.items()},
        "signature": ModelSignature(outputs=outputs),
        "input_example": input_example,
        "pip_requirements": [*pinned, *requirements],
        "metadata": dict(metadata or {}),
    }


def _spool_model(
    spool: Spool, settings: dict[str, Any], step: int | None, registered: str | None
) -> tuple[str, None]:
    """Save the model in the spool, registered (if asked) when the spool is uploaded."""
    import mlflow.pyfunc
    from mlflow.models import Model

    mlflow.pyfunc.save_model(
        str(spool.model_dir), mlflow_model=Model(run_id=spool.run_id), **settings
    )
    spool.model_step(step)
    if registered:
        spool.register_as(registered)
        log.warning("the model is saved offline; the upload registers it as %s", registered)
    return str(spool.model_dir), None


@contextlib.contextmanager
def _artifact_progress_bars_off() -> Iterator[None]:
    """Copying a model's artifacts would draw MLflow's progress bars in the training log."""
    quiet = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(quiet)
    os.environ[quiet] = before or "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(quiet, None)


@contextlib.contextmanager
def start_run(
    tracking_uri: str,
    experiment_name: str,
    name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    experiment_id: str | None = None,
) -> Iterator[Run]:
    """Open a run that ends FINISHED, FAILED with the error recorded on it, or KILLED on Ctrl-C.

    Args:
        parent_run_id: nests this run under a sweep's parent run.
        experiment_id: the sweep's experiment, created once before its jobs; skips the lookup.
    """
    run = start_new_run(tracking_uri, experiment_name, name, tags, parent_run_id, experiment_id)
    with ending(run):
        yield run


def start_new_run(
    tracking_uri: str,
    experiment_name: str,
    name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    experiment_id: str | None = None,
) -> Run:
    """A new RUNNING run (end it with `ending`); arguments as for `start_run`."""
    from mlflow.tracking.context.registry import resolve_tags

    # For MLflow's registry, which looks a models:/ source up in the process's store.
    mlflow.set_tracking_uri(with_busy_timeout(tracking_uri))
    client = open_client(tracking_uri)
    experiment_id = experiment_id or ensure_experiment(tracking_uri, experiment_name)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    # MLflow's own context tags (user, source name and type, git commit of the entry point), as
    # its fluent start_run would set them.
    all_tags = resolve_tags(all_tags)
    # The entry point, not the file MLflow sees (`__main__.py`), in the UI's Source column.
    all_tags["mlflow.source.name"] = "insect_exp"
    return Run(client, client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id)


def reopen_run(tracking_uri: str, run_id: str) -> Run:
    """An existing run, RUNNING again, to resume into (end it with `ending`)."""
    client = open_client(tracking_uri)
    mlflow.set_tracking_uri(with_busy_timeout(tracking_uri))
    try:
        found = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise UserError(f"no run {run_id!r} in the MLflow store {tracking_uri}") from err
    error = found.data.tags.get("error")
    if error is not None:  # what stopped it last time is history now
        client.delete_tag(run_id, "error")
    client.update_run(run_id, status="RUNNING")
    run = Run(client, run_id, tracking_uri)
    run.found_as = (found.info.status, error)
    return run


def _digests(found: mlflow.entities.Run) -> dict[str, str]:
    """A run's dataset digests by split, as its inputs hold them (tracking/lineage.py)."""
    digests = {}
    for item in found.inputs.dataset_inputs if found.inputs else []:
        context = {tag.key: tag.value for tag in item.tags}.get(CONTEXT_TAG)
        if context:
            digests[context] = item.dataset.digest
    return digests


def _step(metric: Metric) -> tuple[int, int]:
    return metric.step, metric.timestamp
