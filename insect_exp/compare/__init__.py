"""Compare two models, runs or sweep groups on the same test images, as a new MLflow run:

    python -m insect_exp.compare A B
    python -m insect_exp.compare baseline=models:/insects@champion candidate=runs:/<id>/model \\
        dataset.root=/path max_drop=0.01 max_class_drop=0.05 promote=true

A and B: runs:/<run id>[/model], a run id, models:/<name>/<version>, models:/<name>@<alias>,
models:/<model id>, or a sweep parent run (its children; runs:/<parent id>#<group> picks one group
by the children's `insect_exp.group` tag). A group is scored as its replicates' metrics (mean with
a Student's t interval) and, for the paired tests, as the ensemble of its replicates (their mean
probabilities). The paired tests: the exact McNemar test on right/wrong, and seeded paired
bootstrap intervals of the accuracy, macro F1 and per-class accuracy differences.

Exit codes: 0 the comparison is logged and the candidate passes the gate; 1 it fails the gate
(accuracy below the baseline's by more than max_drop, or a class's by more than max_class_drop);
2 bad input (a config error, an unknown run or model, different classes or test images).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from insect_exp.compare.analysis import Analysis, analyse, gate_failures, verdict
from insect_exp.compare.sources import Scores, Side, resolve, score
from insect_exp.config import CompareConfig

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

BASELINE_TAG = "insect_exp.compare.baseline"
CANDIDATE_TAG = "insect_exp.compare.candidate"


@dataclass(frozen=True)
class Outcome:
    run_id: str
    verdict: str
    failures: list[str]  # why the candidate fails the gate; empty: it passes
    analysis: Analysis


def run(cfg: CompareConfig) -> Outcome:
    """Score both sides on the same images, log the comparison run, apply the gate, promote."""
    from insect_exp import tracking
    from insect_exp.compare import report
    from insect_exp.predict import store_uri

    uri = store_uri(cfg.mlflow.tracking_uri, "runs:")
    tracking.prepare_store(uri)
    client = tracking.open_client(uri)
    baseline = resolve(cfg.baseline, client, uri)
    candidate = resolve(cfg.candidate, client, uri)
    scores = score(cfg, [baseline, candidate], client)
    found = analyse(scores, baseline.spec, candidate.spec, cfg.resamples, cfg.seed)
    line = verdict(found)
    failures = gate_failures(found, scores.class_names, cfg.max_drop, cfg.max_class_drop)
    tables = report.tables(
        found, scores.class_names, config_difference(client, baseline, candidate)
    )
    run_id = _log(cfg, uri, (baseline, candidate), tables, line, found)
    for run_of_side in {*baseline.run_ids, *candidate.run_ids}:
        client.set_tag(run_of_side, f"comparison.{run_id}", line[:500])
    print(report.printed(tables[0], line))
    if failures:
        print("gate: FAILED: " + "; ".join(failures))
    elif cfg.promote:
        print(promote(cfg, client, baseline, candidate))
    print(f"MLflow run id: {run_id}\nOpen the UI: {tracking.ui_command(uri)}")
    return Outcome(run_id, line, failures, found)


def config_difference(
    client: MlflowClient, baseline: Side, candidate: Side
) -> dict[str, tuple[str, str]]:
    """The params whose values differ between the sides; a param that varies within a side (a
    group's seed) is no difference between them and is left out."""
    sides = []
    for side in (baseline, candidate):
        if not side.run_ids:
            return {}
        params = [client.get_run(run_id).data.params for run_id in side.run_ids]
        keys = set().union(*params)
        varying = {k for k in keys if len({p.get(k) for p in params}) > 1}
        sides.append(({k: params[0].get(k, "-") for k in keys}, varying))
    (a, a_varies), (b, b_varies) = sides
    keys = (a.keys() | b.keys()) - a_varies - b_varies
    return {k: (a.get(k, "-"), b.get(k, "-")) for k in keys if a.get(k, "-") != b.get(k, "-")}


def _curves(client: MlflowClient, sides: tuple[Side, Side]) -> dict[str, list[float]]:
    curves = {}
    for label, side in zip("AB", sides, strict=True):
        for member in side.members:
            if member.ref.run_id:
                history = client.get_metric_history(member.ref.run_id, "val_accuracy")
                steps = sorted(history, key=lambda m: m.step)
                curves[f"{label}: {member.name}"] = [m.value for m in steps]
    return curves


def _log(
    cfg: CompareConfig,
    uri: str,
    sides: tuple[Side, Side],
    tables: list,
    line: str,
    found: Analysis,
) -> str:
    """The comparison run: its report files, the figures of the test as metrics, both sources."""
    from insect_exp import plots, tracking
    from insect_exp.compare import report

    client = tracking.open_client(uri)
    curves = _curves(client, sides)
    png = None
    if any(curves.values()):
        buffer = io.BytesIO()
        title = "Validation accuracy: A (baseline) and B (candidate)"
        plots.overlay_curves(curves, title=title).savefig(buffer, format="png", dpi=100)
        png = buffer.getvalue()
    experiment = cfg.mlflow.experiment_name or _experiment_of(client, sides[1])
    tags = {
        **tracking.environment_tags(),
        "insect_exp.job": "compare",
        BASELINE_TAG: sides[0].spec,
        CANDIDATE_TAG: sides[1].spec,
        "mlflow.note.content": f"`{sides[1].spec}` (B) against `{sides[0].spec}` (A): {line}",
        **cfg.mlflow.tags,
    }
    name = cfg.mlflow.run_name or f"compare {sides[1].spec} with {sides[0].spec}"
    title = f"{sides[1].spec} (B) against {sides[0].spec} (A)"
    with tracking.start_run(uri, experiment, name, tags) as new:
        new.log_params({"baseline": sides[0].spec, "candidate": sides[1].spec,
                        "dataset.root": cfg.dataset.root, "resamples": cfg.resamples,
                        "seed": cfg.seed})  # fmt: skip
        new.log_metrics(_figures(found))
        new.log_text(report.markdown(title, line, tables, "comparison_curves.png" if png else None),
                     "comparison.md")  # fmt: skip
        new.log_text(report.page(title, line, tables, png), "comparison.html")
        if png:
            client.log_image(new.run_id, _png_image(png), "comparison_curves.png")
        return str(new.run_id)


def _png_image(png: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(png))


def _experiment_of(client: MlflowClient, side: Side) -> str:
    if side.run_ids:
        run = client.get_run(side.run_ids[0])
        return client.get_experiment(run.info.experiment_id).name
    return "insect_exp"


def _figures(found: Analysis) -> dict[str, float]:
    return {
        "baseline_accuracy": found.baseline.ensemble_accuracy,
        "candidate_accuracy": found.candidate.ensemble_accuracy,
        "accuracy_difference": found.accuracy.estimate,
        "accuracy_difference_low": found.accuracy.low,
        "accuracy_difference_high": found.accuracy.high,
        "macro_f1_difference": found.macro_f1.estimate,
        "macro_f1_difference_low": found.macro_f1.low,
        "macro_f1_difference_high": found.macro_f1.high,
        "mcnemar_p": found.mcnemar_p,
        "images": found.images,
    }


def promote(cfg: CompareConfig, client: MlflowClient, baseline: Side, candidate: Side) -> str:
    """Set the alias on the candidate's registered version (registered first if it is none)."""
    from insect_exp import UserError
    from insect_exp.tracking.logged_model import register

    alias = cfg.alias or baseline.alias
    name = (baseline.registered or candidate.registered or (None, None))[0]
    if not alias or not name:
        raise UserError(
            "promote=true needs an alias and a registered model: a baseline models:/<name>@<alias>"
            ", or alias=... with a registered baseline or candidate"
        )
    if candidate.registered and candidate.registered[0] == name:
        version = candidate.registered[1]
    else:
        (member,) = candidate.members[:1]
        if len(candidate.members) > 1 or not member.ref.model_id or not member.ref.run_id:
            raise UserError("promote=true needs a single logged model as the candidate")
        version = str(register(client, name, member.ref.model_id, member.ref.run_id))
    client.set_registered_model_alias(name, alias, version)
    return f"promoted: models:/{name}@{alias} is version {version}"


__all__ = ["Outcome", "Scores", "run"]
