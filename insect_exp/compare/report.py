"""A comparison's report: its tables, as Markdown (comparison.md), as a self-contained HTML page
(comparison.html, the plot embedded as base64 PNG) and as the short table printed."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from insect_exp.compare.analysis import Analysis, SideMetrics
from insect_exp.stats import Difference, Interval


@dataclass(frozen=True)
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]


def _interval(value: Interval) -> str:
    if value.n == 1:
        return f"{value.mean:.4f}"
    return f"{value.mean:.4f} [{value.low:.4f}, {value.high:.4f}] (n={value.n})"


def _points(d: Difference | None) -> str:
    if d is None:
        return "no image"
    return f"{100 * d.estimate:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"


def metrics_table(found: Analysis) -> Table:
    """Metrics side by side: replicates' mean with its 95% t interval, and the ensemble's."""
    a, b = found.baseline, found.candidate

    def rows(side: SideMetrics) -> list[str]:
        ensemble = f"{side.ensemble_accuracy:.4f} / {side.ensemble_macro_f1:.4f}"
        return [_interval(side.accuracy), _interval(side.macro_f1), ensemble]

    header = ["", "accuracy", "macro F1", "ensemble accuracy / macro F1"]
    return Table("Metrics", header, [["A (baseline)", *rows(a)], ["B (candidate)", *rows(b)]])


def tables(
    found: Analysis, class_names: Sequence[str], config_diff: Mapping[str, tuple[str, str]]
) -> list[Table]:
    """Every table of the report, the metrics first (the one printed)."""
    tests = Table(
        "Paired tests on the same images (B - A, points, 95% bootstrap interval)",
        ["test", "value"],
        [
            ["accuracy difference", _points(found.accuracy)],
            ["macro F1 difference", _points(found.macro_f1)],
            ["exact McNemar p (right/wrong)", f"{found.mcnemar_p:.4g}"],
            ["images", str(found.images)],
        ],
    )
    classes = Table(
        "Per-class accuracy difference (B - A, points, 95% bootstrap interval)",
        ["class", "difference"],
        [[name, _points(d)] for name, d in zip(class_names, found.per_class, strict=True)],
    )
    config = Table(
        "Config difference",
        ["param", "A", "B"],
        [[key, a, b] for key, (a, b) in sorted(config_diff.items())] or [["(none)", "", ""]],
    )
    return [metrics_table(found), tests, classes, config]


def markdown(title: str, verdict: str, found: list[Table], plot: str | None) -> str:
    lines = [f"# {title}", "", f"**{verdict}**", ""]
    for table in found:
        lines += [f"## {table.title}", "", "| " + " | ".join(table.header) + " |"]
        lines.append("|" + "---|" * len(table.header))
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
                  for row in table.rows]  # fmt: skip
        lines.append("")
    if plot:
        lines += ["## Training curves", "", f"![validation accuracy]({plot})", ""]
    return "\n".join(lines)


def page(title: str, verdict: str, found: list[Table], png: bytes | None) -> str:
    """A self-contained HTML page: no file beside it needed."""
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>body{{font-family:sans-serif;max-width:60em}}"
        "td,th{padding:2px 8px;border-bottom:1px solid #ccc;text-align:left}</style></head>",
        f"<body><h1>{e(title)}</h1><p><b>{e(verdict)}</b></p>",
    ]
    for table in found:
        head = "".join(f"<th>{e(h)}</th>" for h in table.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in table.rows
        )
        parts.append(f"<h2>{e(table.title)}</h2><table><tr>{head}</tr>{body}</table>")
    if png:
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f"<h2>Training curves</h2><img alt='curves' src='data:image/png;base64,{data}'>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def printed(table: Table, verdict: str) -> str:
    """The short table for a terminal, then the verdict."""
    widths = [max(len(r[i]) for r in [table.header, *table.rows]) for i in range(len(table.header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [table.header, *table.rows]]  # fmt: skip
    return "\n".join([*lines, verdict])
