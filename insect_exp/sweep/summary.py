"""The summary a sweep's parent run gets when the sweep ends: table, curves, best child, counts,
and the children's groups (sweep/groups.py)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from omegaconf import OmegaConf

if TYPE_CHECKING:
    from insect_exp.sweep.context import SweepInfo
    from insect_exp.tracking import RunRecord

CURVE_METRIC = "val_accuracy"  # what the task function returns and sweepers optimise
SUMMARY_DIR = "summary"
# Summary columns first in this order, then any other metric alphabetically.
_METRIC_ORDER = ("val_accuracy", "val_loss", "accuracy", "loss", "test_accuracy", "test_loss")


@dataclass
class Summary:
    """The table, curves and counts a parent run gets when its sweep ends."""

    columns: list[str]
    rows: list[dict[str, Any]]
    curves: dict[str, list[float]]
    best: RunRecord | None  # the finished child with the highest val_accuracy (ties: first job)
    finished: int
    failed: int
    killed: int = 0


def summarise(children: Sequence[RunRecord], metric: str = CURVE_METRIC) -> Summary:
    """Table rows, curves, best child and counts from a sweep's child runs."""
    ordered = sorted(children, key=lambda r: (_job_num(r) is None, _job_num(r) or 0, r.name))
    rows: list[dict[str, Any]] = []
    override_keys: list[str] = []
    metric_keys: set[str] = set()
    curves: dict[str, list[float]] = {}
    for child in ordered:
        overrides = json.loads(child.tags.get("sweep.overrides", "[]"))
        values = dict(o.split("=", 1) for o in overrides)
        override_keys += [k for k in values if k not in override_keys]
        metrics = {k: v for k, v in child.metrics.items() if not k.startswith("batch_")}
        metric_keys |= metrics.keys()
        job = _job_num(child)
        row = {"job": "" if job is None else job, "run_name": child.name, "status": child.status}
        error = child.tags.get("error", "")
        rows.append({**row, **values, **metrics, "error": error, "run_id": child.run_id})
        if child.history.get(metric):
            label = child.name if child.name not in curves else f"{child.name} (#{job})"
            curves[label] = child.history[metric]
    ranked = [m for m in _METRIC_ORDER if m in metric_keys]
    ranked += sorted(metric_keys - set(ranked))
    columns = ["job", "run_name", "status", *override_keys, *ranked, "error", "run_id"]
    finished = [r for r in ordered if r.status == "FINISHED"]
    scored = [r for r in finished if metric in r.metrics]
    best = max(scored, key=lambda r: r.metrics[metric]) if scored else None
    failed = sum(r.status == "FAILED" for r in ordered)
    killed = sum(r.status == "KILLED" for r in ordered)
    return Summary(columns, rows, curves, best, len(finished), failed, killed)


def to_csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary table as CSV, one row per child."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_markdown(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary table as Markdown, readable in MLflow's artifact viewer."""

    def cell(value: Any) -> str:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def optuna_best(sweep_dir: Path) -> tuple[dict[str, Any], float | None]:
    """Best params and value the Optuna sweeper saved in the sweep dir ({} and None if none)."""
    path = Path(sweep_dir) / "optimization_results.yaml"
    if not path.is_file():
        return {}, None
    # The sweeper writes a mapping (OmegaConf's return type covers lists too).
    results = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.load(path)))
    return dict(results.get("best_params") or {}), results.get("best_value")


def close_orphans(info: SweepInfo, interrupted: bool) -> None:
    """End the children still RUNNING when their sweep is over: their process is gone.

    KILLED (and resumable) when the sweep was interrupted. A child whose job went offline (the
    store failed it mid-run, so its record is in a spool under the sweep dir) is FAILED with the
    command that uploads it, which then sets its true status. Any other is FAILED: its process
    died (killed by the OS, out of memory) without ending its run.
    """
    from insect_exp import tracking
    from insect_exp.tracking.spool import offline_note, spools_under

    children = tracking.child_runs(info.tracking_uri, info.experiment_id, info.parent_run_id)
    spools = spools_under(info.sweep_dir)
    for child in children:
        if child.status != "RUNNING":
            continue
        client = tracking.open_client(info.tracking_uri)
        if interrupted:
            client.set_tag(child.run_id, "error", "the sweep was interrupted")
            tracking.end_run(info.tracking_uri, child.run_id, "KILLED")
        elif child.run_id in spools:
            client.set_tag(child.run_id, "error", offline_note(spools[child.run_id]))
            tracking.end_run(info.tracking_uri, child.run_id, "FAILED")
        else:
            client.set_tag(child.run_id, "error", "job process died")
            tracking.end_run(info.tracking_uri, child.run_id, "FAILED")


def log_summary(info: SweepInfo) -> Summary:
    """Read the sweep's children, log the summary to its parent run and return it."""
    from insect_exp import plots, tracking

    children = tracking.child_runs(
        info.tracking_uri, info.experiment_id, info.parent_run_id, history_keys=[CURVE_METRIC]
    )
    summary = summarise(children)
    parent = tracking.Run(tracking.open_client(info.tracking_uri), info.parent_run_id)
    parent.log_text(to_csv(summary.columns, summary.rows), f"{SUMMARY_DIR}/children.csv")
    parent.log_text(to_markdown(summary.columns, summary.rows), f"{SUMMARY_DIR}/children.md")
    metrics: dict[str, float] = {
        "jobs_finished": summary.finished,
        "jobs_failed": summary.failed,
        "jobs_killed": summary.killed,
    }
    if summary.best is not None:
        metrics[f"best_{CURVE_METRIC}"] = summary.best.metrics[CURVE_METRIC]
        parent.set_tags({"best_run_id": summary.best.run_id, "best_run_name": summary.best.name})
    if summary.curves:
        figure = plots.overlay_curves(
            summary.curves, CURVE_METRIC, "Validation accuracy per child run"
        )
        parent.log_figure(figure, f"{SUMMARY_DIR}/{CURVE_METRIC}.png")
    from insect_exp.sweep.groups import log_groups  # groups reuses this module's tables

    log_groups(parent, children, CURVE_METRIC)
    sweep_dir = Path(info.sweep_dir)
    for name in ("multirun.yaml", "optimization_results.yaml"):
        if (sweep_dir / name).is_file():
            parent.log_text((sweep_dir / name).read_text(), f"{SUMMARY_DIR}/{name}")
    best_params, best_value = optuna_best(sweep_dir)
    parent.log_params({f"best.{k}": v for k, v in best_params.items()})
    if best_value is not None:
        metrics["optuna_best_value"] = best_value
    parent.log_metrics(metrics)
    return summary


def _job_num(run: RunRecord) -> int | None:
    value = run.tags.get("sweep.job_num")
    return int(value) if value is not None and value.isdigit() else None
