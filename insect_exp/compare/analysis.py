"""The numbers of a comparison, from both sides' probabilities on the same images: each side's
metrics (intervals over replicates), the paired tests, the verdict and the gate. No I/O."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from insect_exp.compare.sources import Scores
from insect_exp.stats import (
    Difference,
    Interval,
    macro_f1,
    mcnemar_p,
    mean_interval,
    paired_bootstrap,
    per_class_differences,
)

SIGNIFICANCE = 0.05  # McNemar's p below it: the difference is called significant


@dataclass(frozen=True)
class SideMetrics:
    """One side's accuracy and macro F1: over its replicates (an interval when there are several)
    and of its ensemble (mean probabilities: one model's own when alone), whose predictions the
    paired tests use."""

    accuracy: Interval
    macro_f1: Interval
    predicted: np.ndarray
    ensemble_accuracy: float
    ensemble_macro_f1: float


@dataclass(frozen=True)
class Analysis:
    baseline: SideMetrics
    candidate: SideMetrics
    mcnemar_p: float
    accuracy: Difference  # candidate minus baseline
    macro_f1: Difference
    per_class: list[Difference | None]
    images: int


def side_metrics(labels: np.ndarray, probabilities: list[np.ndarray], classes: int) -> SideMetrics:
    each = [p.argmax(axis=1) for p in probabilities]
    ensemble = np.mean(probabilities, axis=0).argmax(axis=1)
    return SideMetrics(
        mean_interval([float(np.mean(p == labels)) for p in each]),
        mean_interval([float(macro_f1(labels, p, classes)) for p in each]),
        ensemble,
        float(np.mean(ensemble == labels)),
        float(macro_f1(labels, ensemble, classes)),
    )


def analyse(scores: Scores, baseline: str, candidate: str, resamples: int, seed: int) -> Analysis:
    """Compare the sides `baseline` and `candidate` (their specs) on `scores`' images."""
    labels, classes = scores.labels, len(scores.class_names)
    a = side_metrics(labels, scores.probabilities[baseline], classes)
    b = side_metrics(labels, scores.probabilities[candidate], classes)
    paired = paired_bootstrap(labels, a.predicted, b.predicted, classes, resamples, seed)
    return Analysis(
        a,
        b,
        mcnemar_p(a.predicted == labels, b.predicted == labels),
        paired["accuracy"],
        paired["macro_f1"],
        per_class_differences(labels, a.predicted, b.predicted, classes, resamples, seed),
        len(labels),
    )


def verdict(found: Analysis) -> str:
    """One line: `B better than A: +3.1 points [+1.2, +5.0], McNemar p=0.004, 180 images`."""
    d = found.accuracy
    figures = (
        f"{100 * d.estimate:+.1f} points [{100 * d.low:+.1f}, {100 * d.high:+.1f}], "
        f"McNemar p={found.mcnemar_p:.3g}, {found.images} images"
    )
    if found.mcnemar_p >= SIGNIFICANCE or d.estimate == 0:
        return f"no significant difference (B - A: {figures})"
    return f"B {'better' if d.estimate > 0 else 'worse'} than A: {figures}"


def gate_failures(
    found: Analysis, class_names: list[str], max_drop: float | None, max_class_drop: float | None
) -> list[str]:
    """Why the candidate fails the gate (empty: it passes): its accuracy below the baseline's
    by more than max_drop, or a class's by more than max_class_drop."""
    failures = []
    drop = found.baseline.ensemble_accuracy - found.candidate.ensemble_accuracy
    if max_drop is not None and drop > max_drop:
        failures.append(f"accuracy {-100 * drop:+.1f} points (max_drop={max_drop})")
    for name, d in zip(class_names, found.per_class, strict=True):
        if max_class_drop is not None and d is not None and -d.estimate > max_class_drop:
            failures.append(f"class {name!r} {100 * d.estimate:+.1f} points "
                            f"(max_class_drop={max_class_drop})")  # fmt: skip
    return failures
