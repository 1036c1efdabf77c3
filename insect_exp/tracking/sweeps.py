"""Runs of a sweep: a parent that the jobs of a multirun nest under, and reading its children.

These work by run id through the client, never through the fluent API's active run, which
belongs to whichever job runs in the process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mlflow.entities import Metric, Run

from insect_exp.tracking.store import open_client


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
    client = open_client(tracking_uri)
    return client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Close a run opened with create_run as FINISHED, FAILED or KILLED."""
    open_client(tracking_uri).set_terminated(run_id, status)


def child_runs(
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    history_keys: Sequence[str] = (),
) -> list[RunRecord]:
    """Every run nested under a parent, with the metric histories asked for."""
    client = open_client(tracking_uri)
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    found: list[Run] = []
    token: str | None = None
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
