"""Whether a model's probabilities mean what they say, and one temperature that makes them.

- Expected calibration error (ECE): the test images binned by confidence (the top probability)
  into 15 equal-width bins; the mean gap between each bin's accuracy and its mean confidence,
  weighted by its share of the images (Guo et al., "On Calibration of Modern Neural Networks").
- Brier score: the mean squared distance between the probabilities and the one-hot label, summed
  over classes (0 is perfect, 2 the worst).
- NLL: the mean negative log probability of the true class.
- Temperature scaling: one T > 0 fitted on the validation split by minimising NLL; the calibrated
  probabilities are softmax(logits / T). Dividing by T keeps the order of the logits, so the
  predicted class and the accuracy are the same.

NumPy, SciPy and Matplotlib only: the logging process draws the reliability diagram without
TensorFlow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from insect_exp.tracking.run import Run

BINS = 15
# The range a fitted temperature keeps to: wide enough for any model seen in practice; the bounds
# keep a degenerate validation split (every image right, or one class) from sending T to 0 or
# infinity.
LOWEST_TEMPERATURE, HIGHEST_TEMPERATURE = 0.05, 20.0
RELIABILITY_PLOT = "plots/reliability.png"


def log_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log softmax(logits / temperature), row by row, in float64."""
    return log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature), row by row, in float64."""
    return np.exp(log_probabilities(logits, temperature))


def saved_temperature(module: Any) -> float:
    """The temperature a loaded SavedModel's probabilities are divided by: its variable
    `temperature`, or 1 for a model logged before calibration existed. (Read from the SavedModel,
    not the pyfunc's wrapper: a logged model keeps the wrapper code it was logged with.)"""
    variable = getattr(module, "temperature", None)
    return float(variable.numpy()) if variable is not None else 1.0


def confidence_and_correct(
    probabilities: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top probability, and whether its class is the label."""
    probs = np.asarray(probabilities, dtype=np.float64)
    return probs.max(axis=1), probs.argmax(axis=1) == np.asarray(labels)


def bin_index(confidence: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Each confidence's bin of `bins` equal-width ones: (i/bins, (i+1)/bins], the first from 0."""
    return np.clip(np.ceil(np.asarray(confidence) * bins).astype(np.int64) - 1, 0, bins - 1)


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = BINS
) -> float:
    """sum over bins of (share of images) * |accuracy - mean confidence|; 0 for no images."""
    confidence = np.asarray(confidence, dtype=np.float64)
    if not confidence.size:
        return 0.0
    index = bin_index(confidence, bins)
    count = np.bincount(index, minlength=bins)
    gap = np.bincount(index, weights=np.asarray(correct, np.float64) - confidence, minlength=bins)
    return float(np.abs(gap).sum() / count.sum())


def scores(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> dict[str, float]:
    """ECE (15 bins), Brier score and NLL of softmax(logits / temperature)."""
    labels = np.asarray(labels, dtype=np.int64)
    log_probs = log_probabilities(logits, temperature)
    probs = np.exp(log_probs)
    one_hot = np.eye(probs.shape[1])[labels]
    rows = np.arange(len(labels))
    return {
        "ece": expected_calibration_error(*confidence_and_correct(probs, labels)),
        "brier": float(((probs - one_hot) ** 2).sum(axis=1).mean()),
        "nll": float(-log_probs[rows, labels].mean()),
    }


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [0.05, 20] that minimises the NLL of softmax(logits / T) on `labels`.

    Searched on log T (bounded Brent), where the NLL is smooth and the bounds are symmetric.
    """
    z = np.asarray(logits, dtype=np.float64)
    rows, labels = np.arange(len(z)), np.asarray(labels, dtype=np.int64)

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / math.exp(log_t), axis=1)[rows, labels].mean())

    bounds = (math.log(LOWEST_TEMPERATURE), math.log(HIGHEST_TEMPERATURE))
    found = minimize_scalar(nll, bounds=bounds, method="bounded", options={"xatol": 1e-4})
    return float(math.exp(found.x))


def report(
    logits: np.ndarray, labels: np.ndarray, temperature: float | None = None
) -> dict[str, float]:
    """`ece`, `brier`, `nll` of the probabilities a model gives (calibrated by `temperature`, if
    any); with a temperature, also those of the raw logits as `ece_uncalibrated`, ..."""
    found = scores(logits, labels, temperature or 1.0)
    if temperature is not None:
        raw = scores(logits, labels)
        found.update({f"{k}_uncalibrated": v for k, v in raw.items()})
    return found


@dataclass(frozen=True)
class Reliability:
    """What a reliability diagram draws: each image's confidence and whether it was right, and the
    confidences before calibration (None: not calibrated)."""

    confidence: np.ndarray
    correct: np.ndarray
    uncalibrated: np.ndarray | None = None

    @classmethod
    def of(
        cls, logits: np.ndarray, labels: np.ndarray, temperature: float | None = None
    ) -> Reliability:
        probs = np.exp(log_probabilities(logits, temperature or 1.0))
        confidence, correct = confidence_and_correct(probs, labels)
        raw = None
        if temperature is not None:
            raw = confidence_and_correct(np.exp(log_probabilities(logits)), labels)[0]
        return cls(confidence, correct, raw)


def _per_bin(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each bin's accuracy (NaN where empty) and its number of images."""
    index = bin_index(confidence)
    count = np.bincount(index, minlength=BINS)
    hits = np.bincount(index, weights=correct.astype(np.float64), minlength=BINS)
    return np.divide(hits, count, out=np.full(BINS, np.nan), where=count > 0), count


def reliability_figure(reliability: Reliability, title: str = "Reliability (test)") -> Figure:
    """Accuracy against confidence per bin (the diagonal is perfect calibration) with the ECE in
    the legend; below, how many images fall in each bin. The model's probabilities are bars;
    those before calibration, if any, an orange line over them."""
    from matplotlib.figure import Figure  # here: the training process never imports matplotlib

    fig = Figure(figsize=(6, 7))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    edges = np.linspace(0, 1, BINS + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    correct = np.asarray(reliability.correct)
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    calibrated = reliability.uncalibrated is not None
    accuracy, count = _per_bin(reliability.confidence, correct)
    ece = expected_calibration_error(reliability.confidence, correct)
    label = f"{'calibrated' if calibrated else 'model'}: ECE {ece:.3f}"
    style = {"color": "tab:blue", "alpha": 0.5, "edgecolor": "tab:blue"}
    top.bar(centers, accuracy, 1 / BINS, label=label, **style)
    bottom.bar(centers, count, 1 / BINS, **style)
    if reliability.uncalibrated is not None:
        accuracy, count = _per_bin(reliability.uncalibrated, correct)
        ece = expected_calibration_error(reliability.uncalibrated, correct)
        style = {"color": "tab:orange", "linewidth": 2}
        top.plot(centers, accuracy, "o-", label=f"uncalibrated: ECE {ece:.3f}", **style)
        bottom.stairs(count, edges, **style)
    top.set_ylabel("Accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_title(title)
    top.legend(loc="upper left", fontsize="small")
    bottom.set_xlabel(f"Confidence (top probability, {BINS} bins)")
    bottom.set_ylabel("Images")
    fig.tight_layout()
    return fig


def log_reliability(run: Run, reliability: Reliability, title: str = "Reliability (test)") -> None:
    """The reliability diagram as plots/reliability.png."""
    run.log_figure(reliability_figure(reliability, title), RELIABILITY_PLOT)
