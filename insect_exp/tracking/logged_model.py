"""A run's logged model (MLflow 3): one per run, finished, linked to the run's metrics, registered.

Every step can be repeated: an upload tried again after a fault, or a spool uploaded twice,
leaves one READY model per run, linked once, and at most one registered version of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

PER_BATCH = "batch_"  # metrics of one training step, not of the model (a run's sink)
REGISTERED_TAG = "registered_model"  # on the run: name/version of the registered model


def finished_model(
    client: MlflowClient, experiment_id: str, run_id: str, name: str
) -> LoggedModel | None:
    """The run's READY model named `name`, if any; unfinished ones are deleted.

    A PENDING (or FAILED) model of the run is what a fault left between the model's creation
    and its finalisation: the model being sent again replaces it.
    """
    found = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'"
    )
    ready = None
    for model in sorted(found, key=lambda m: m.creation_timestamp):
        if model.status == LoggedModelStatus.READY:
            ready = ready or model
        else:
            client.delete_logged_model(model.model_id)
    return ready


def complete(
    client: MlflowClient,
    run_id: str,
    model_id: str,
    model_dir: str | Path | None,
    step: int | None = None,
    registered_model_name: str | None = None,
) -> int | None:
    """Finish a created model: files (unless None: there already), READY, output, metrics.

    Args:
        step: the run's step (epoch) whose weights the model holds; None: the last epoch.
        registered_model_name: also register it (once per run); its version is returned.
    """
    if model_dir is not None:
        client.log_model_artifacts(model_id, str(model_dir))
        client.finalize_logged_model(model_id, LoggedModelStatus.READY)
    if step is None:
        step = max((m.step for m in client.get_metric_history(run_id, "loss")), default=0)
    outputs = client.get_run(run_id).outputs
    if not any(o.model_id == model_id for o in (outputs.model_outputs if outputs else [])):
        client.log_outputs(run_id, [LoggedModelOutput(model_id, step=step)])
    link_metrics(client, run_id, model_id, step)
    if registered_model_name is None:
        return None
    return register(client, registered_model_name, model_id, run_id)


def link_metrics(client: MlflowClient, run_id: str, model_id: str, step: int) -> None:
    """Link the run's metrics to the model, so that the model's page shows what the run ended with.

    Each metric of the run but the per-batch ones: its value at `step` (the epoch whose weights
    the model holds) where it has one there, else its last value (test scores, best_epoch). The
    run's own rows are linked, with their timestamps: the run gains no new value.
    """
    linked = {m.key for m in client.get_logged_model(model_id).metrics or []}
    chosen = []
    for key in client.get_run(run_id).data.metrics:
        if key.startswith(PER_BATCH) or key in linked:
            continue
        history = client.get_metric_history(run_id, key)
        at_step = [m for m in history if m.step == step]
        value = max(at_step or history, key=lambda m: (m.step, m.timestamp))
        chosen.append(Metric(key, value.value, value.timestamp, value.step, model_id=model_id))
    for start in range(0, len(chosen), 1000):  # MLflow's limit of metrics in one log_batch call
        client.log_batch(run_id, metrics=chosen[start : start + 1000])


def register(client: MlflowClient, name: str, model_id: str, run_id: str) -> int:
    """The version of registered model `name` made from this run (a new one if there is none)."""
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    # By run only: a name in a filter string would need quoting rules of its own.
    mine = [v for v in client.search_model_versions(f"run_id = '{run_id}'") if v.name == name]
    if mine:
        version: Any = min(mine, key=lambda v: int(v.version))
    else:
        version = client.create_model_version(
            name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id
        )
    client.set_tag(run_id, REGISTERED_TAG, f"{name}/{version.version}")
    return int(version.version)
