"""A sweep's children grouped by their configuration (every override but the seed), each group's
final metrics as a mean with its Student's t interval, and the figures of them.

A child's group is its tag `insect_exp.group`, set when its run opens, so that the MLflow UI can
group runs by it: the overrides the sweep varies, the seed left out, sorted by key
(`model=cnn,optimizer.learning_rate=0.01`), or `default` when only the seed varies. Failed and
killed children are left out of the statistics and counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from insect_exp.stats import Interval, mean_interval

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from insect_exp.tracking import Run, RunRecord

GROUP_TAG = "insect_exp.group"
DEFAULT_GROUP = "default"
SEED_KEY = "seed"
# Final metrics summarised per group: validation and test scores.
_PREFIXES = ("val_", "test_")
_FIRST = ("val_accuracy", "val_loss", "test_accuracy", "test_loss")
_STATS = ("mean", "std", "low", "high")


@dataclass
class Group:
    """The children of one configuration: the finished ones' scores, how many did not finish."""

    name: str
    # Final metric -> its value in each finished child that logged it, in job order.
    finals: dict[str, list[float]] = field(default_factory=dict)
    # Per-epoch values of the curve metric, one list per finished child.
    curves: list[list[float]] = field(default_factory=list)
    n: int = 0
    failed: int = 0

    def interval(self, metric: str) -> Interval | None:
        """The mean of `metric` over the finished children, with its 95% t interval."""
        values = self.finals.get(metric)
        return mean_interval(values) if values else None

    def curve(self) -> list[Interval]:
        """The curve metric's mean and interval per epoch, over the children that reached it."""
        epochs = max((len(c) for c in self.curves), default=0)
        return [mean_interval([c[e] for c in self.curves if len(c) > e]) for e in range(epochs)]


def group_of(overrides: Iterable[str]) -> str:
    """The group of a job's overrides: all but the seed, sorted by key, or `default`."""
    keyed = [(o.split("=", 1)[0].lstrip("+~"), o) for o in overrides]
    kept = sorted((key, o) for key, o in keyed if key != SEED_KEY)
    return ",".join(o for _, o in kept) or DEFAULT_GROUP


def child_group(child: RunRecord) -> str:
    """A child's group: its tag, or (a child logged before the tag) its overrides' group."""
    tagged = child.tags.get(GROUP_TAG)
    if tagged:
        return tagged
    return group_of(json.loads(child.tags.get("sweep.overrides", "[]")))


def group_children(children: Sequence[RunRecord], curve_metric: str) -> list[Group]:
    """The children by group, groups in the order of their first child (by job number)."""
    groups: dict[str, Group] = {}
    for child in sorted(children, key=_job_order):
        group = groups.setdefault(child_group(child), Group(child_group(child)))
        if child.status != "FINISHED":
            group.failed += 1
            continue
        group.n += 1
        for key, value in child.metrics.items():
            if key.startswith(_PREFIXES) and math.isfinite(value):
                group.finals.setdefault(key, []).append(value)
        if child.history.get(curve_metric):
            group.curves.append(list(child.history[curve_metric]))
    return list(groups.values())


def final_metrics(groups: Sequence[Group]) -> list[str]:
    """The final metrics any group has: accuracy and loss first, then the others by name."""
    found = {m for g in groups for m in g.finals}
    return [m for m in _FIRST if m in found] + sorted(found - set(_FIRST))


def table(groups: Sequence[Group]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and one row per group: group, n, failed, then mean, std, low, high per metric."""
    metrics = final_metrics(groups)
    columns = ["group", "n", "failed", *(f"{m}_{s}" for m in metrics for s in _STATS)]
    rows = []
    for group in groups:
        row: dict[str, Any] = {"group": group.name, "n": group.n, "failed": group.failed}
        for metric in metrics:
            found = group.interval(metric)
            if found is not None:
                values = (found.mean, found.std, found.low, found.high)
                row |= {f"{metric}_{s}": v for s, v in zip(_STATS, values, strict=True)}
        rows.append(row)
    return columns, rows


def curves_figure(groups: Sequence[Group], metric: str) -> Figure:
    """Each group's mean curve per epoch, with its 95% t interval as a band."""
    from matplotlib.figure import Figure  # here: training processes import this module
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for group in groups:
        points = group.curve()
        if not points:
            continue
        epochs = np.arange(1, len(points) + 1)
        means = np.array([p.mean for p in points])
        low, high = np.array([p.low for p in points]), np.array([p.high for p in points])
        # Caps as well as the band: a one-epoch band has no width to show.
        bars = ax.errorbar(
            epochs, means, yerr=[means - low, high - means], marker="o", capsize=4,
            label=_label(group),
        )  # fmt: skip
        ax.fill_between(epochs, low, high, color=bars.lines[0].get_color(), alpha=0.2)
    ax.set_xlabel("Epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"Mean {metric} per group, 95% t interval")
    if ax.lines:
        last = max(len(g.curve()) for g in groups)
        ax.set_xlim(0.5, last + 0.5)  # whole epochs, one epoch included
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best", fontsize="small")
    return fig


def finals_figure(groups: Sequence[Group], metrics: Sequence[str]) -> Figure:
    """Each group's final metrics: the children's values and their mean with its 95% t interval."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 4.0 * len(metrics)), 4.5))
    names = [_label(g) for g in groups]
    for i, metric in enumerate(metrics or [""]):
        ax = fig.add_subplot(1, max(1, len(metrics)), i + 1)
        for x, group in enumerate(groups):
            found = group.interval(metric)
            if found is None:
                continue
            values = group.finals[metric]
            ax.plot([x] * len(values), values, "o", color="grey", alpha=0.5, fillstyle="none")
            error = [[found.mean - found.low], [found.high - found.mean]]
            ax.errorbar([x], [found.mean], yerr=error, fmt="s", color="C0", capsize=6)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize="small")
        ax.set_ylabel(metric)
        ax.set_title(f"Final {metric}")
    fig.tight_layout()
    return fig


def log_groups(parent: Run, children: Sequence[RunRecord], curve_metric: str) -> list[Group]:
    """Log the group table (summary/groups.csv, .md) and figures (plots/) to a sweep's parent."""
    from insect_exp.sweep.summary import SUMMARY_DIR, to_csv, to_markdown

    groups = group_children(children, curve_metric)
    columns, rows = table(groups)
    parent.log_text(to_csv(columns, rows), f"{SUMMARY_DIR}/groups.csv")
    parent.log_text(to_markdown(columns, rows), f"{SUMMARY_DIR}/groups.md")
    parent.log_figure(curves_figure(groups, curve_metric), "plots/group_curves.png")
    shown = [m for m in (curve_metric, "test_accuracy") if m in final_metrics(groups)]
    parent.log_figure(finals_figure(groups, shown), "plots/group_final.png")
    return groups


def _label(group: Group) -> str:
    return f"{group.name} (n={group.n})"


def _job_order(child: RunRecord) -> tuple[bool, int, str]:
    job = child.tags.get("sweep.job_num", "")
    return (not job.isdigit(), int(job) if job.isdigit() else 0, child.name)
