"""Evaluate a logged model on a labelled folder, as a new MLflow run:

    python -m insect_exp.evaluate model_uri=runs:/<run id>/model dataset=insects \\
        dataset.root=/path [split=test]

The folder is a dataset root with `train/` and `test/` (`split` picks one), or a bare folder of
`<class>/*` folders. Its files are found as training finds them (insect_exp/data), decoded and
resized by the model's own decoder (in its SavedModel: as its training images were, whichever
version of insect_exp logged it), and the model runs on them as its logged SavedModel.

The new run (in the source run's experiment unless `mlflow.experiment_name` says otherwise) is
tagged with the source run and model, and the source run gets a tag `evaluation.<run id>` pointing
back. It logs `<split>_loss`, `<split>_accuracy` (`test_...` by default), `<split>_top3_accuracy`
(with more than 3 classes), `macro_f1` (with `tta=flip` each of these also as `<name>_tta`: scored
on each image's probabilities averaged with its mirror image's), `<split>_ece`, `<split>_brier`,
`<split>_nll` of the model's probabilities (its calibrated ones, and their `..._uncalibrated`
values too, for a model trained with `calibrate=temperature`) with `plots/reliability.png`, and
`precision_<class>`, `recall_<class>`, `f1_<class>` (also as `per_class.tsv`, whose `metric_key`
column names each class's `<class>` part: characters MLflow refuses become `_`, and a name made
alike another's that way gets `_2`), `predictions.tsv`,
`confusion_matrix.json`, `plots/confusion_matrix.png`, `plots/misclassified.png`, and the files
skipped (`dataset/skipped.tsv`). Loss, accuracy and macro F1 are also linked to the logged model
(MLflow 3's model page lists them).

Classes that differ from the model's stop it with one line before any image is decoded.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from insect_exp import UserError, commands
from insect_exp.config import (
    TTA,
    DatasetConfig,
    EvaluateConfig,
    register_configs,
    to_object,
)
from insect_exp.errors import exit_with
from insect_exp.predict import CONFIG_DIR, ModelRef, find_model, load_classifier, store_uri

if TYPE_CHECKING:
    import numpy as np

    from insect_exp.calibration import Reliability
    from insect_exp.data.pipeline import ImageSplit
    from insect_exp.data.scan import FileList
    from insect_exp.tracking.run import Run

log = logging.getLogger(__name__)
_NOT_IN_KEYS = re.compile(r"[^\w.\- /]")  # what MLflow refuses in a metric key


register_configs()  # the dataset schemas the dataset/*.yaml files extend
ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


@dataclass
class Metrics:
    loss: float
    accuracy: float
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    matrix: np.ndarray
    # With more than 3 classes: the true class among the 3 most probable (else None).
    top3_accuracy: float | None = None
    # ece, brier, nll (and with a temperature their _uncalibrated values): calibration.report.
    calibration: dict[str, float] = field(default_factory=dict)

    @property
    def macro_f1(self) -> float:
        return float(self.f1.mean())


@dataclass
class Evaluation:
    """What a model made of a folder's files."""

    metrics: Metrics
    split: ImageSplit  # the files that decoded, as the model saw them
    predicted: np.ndarray  # the class of each image
    probability: np.ndarray  # ... and its probability
    skipped: list[tuple[str, str]]  # (path, reason) of the files that did not decode
    reliability: Reliability  # what plots/reliability.png draws
    probabilities: np.ndarray | None = None  # (images, classes)
    # tta=flip: the scores of the probabilities averaged with the mirror images' (else None).
    tta: Metrics | None = None


def per_class(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class (0 where undefined), and the confusion matrix."""
    import numpy as np

    from insect_exp.plots import confusion_matrix

    matrix = confusion_matrix(true, predicted, num_classes)
    hits = np.diag(matrix).astype(np.float64)
    predicted_n, true_n = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(hits, predicted_n, out=np.zeros_like(hits), where=predicted_n > 0)
    recall = np.divide(hits, true_n, out=np.zeros_like(hits), where=true_n > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": true_n, "matrix": matrix}


def class_keys(class_names: list[str]) -> list[str]:
    """Each class's part of its metric keys (`f1_<part>`), unique whatever the names.

    Characters MLflow refuses in a key become '_'; where that makes two names alike (`x,y` and
    `x;y`), the later class gets `_2` (`_3`, ...), so no class's metrics overwrite another's.
    """
    keys: list[str] = []
    for name in class_names:
        base = key = _NOT_IN_KEYS.sub("_", name)
        n = 2
        while key in keys:
            key, n = f"{base}_{n}", n + 1
        keys.append(key)
    return keys


def labelled_files(
    root: Path, split: str, class_names: list[str], max_per_class: int | None
) -> tuple[Path, FileList, list[tuple[str, str]]]:
    """The folder to evaluate (root/split, or root itself when it is a bare <class>/* folder),
    its files with labels, and the files skipped; the classes must be the model's."""
    from insect_exp.data.scan import DatasetError, existing_root, list_split, scan_split

    root = existing_root(root)
    splits = [name for name in ("train", "test") if (root / name).is_dir()]
    if (root / split).is_dir():
        folder = root / split
    elif splits:
        present = ", ".join(f"{name}/" for name in splits)
        raise DatasetError(f"{str(root)!r} has no {split}/ folder (it has {present})")
    else:
        folder = root
    skipped: list[tuple[str, str]] = []
    listed = list_split(folder, skipped)
    if listed != class_names:
        raise DatasetError(
            f"the classes in {str(folder)!r} ({', '.join(listed) or 'none'}) differ from the "
            f"model's ({', '.join(class_names)})"
        )
    files = scan_split(folder, class_names, max_per_class, skipped)
    if not files.paths:
        raise DatasetError(f"{str(folder)!r} has no image files")
    return folder, files, skipped


def run(cfg: EvaluateConfig) -> float:
    """Evaluate, log the evaluation run, and return the accuracy."""
    from insect_exp import tracking
    from insect_exp.data import resolve_root

    uri = store_uri(cfg.mlflow.tracking_uri, cfg.model_uri)
    if not cfg.model_uri.startswith(("runs:", "models:")):
        uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.runtime.launch_dir)
    tracking.prepare_store(uri)
    ref = find_model(cfg.model_uri, uri)
    root = Path(resolve_root(cfg.dataset)).expanduser().resolve()
    folder, files, skipped = labelled_files(
        root, cfg.split, ref.class_names, cfg.dataset.max_per_class
    )
    prefix = cfg.split if folder != root else "test"
    client = tracking.open_client(uri)
    source = _source_run(client, ref)
    experiment = cfg.mlflow.experiment_name or (source[1] if source else "insect_exp")
    where = f"{cfg.dataset.name}/{prefix}" if folder != root else cfg.dataset.name
    name = cfg.mlflow.run_name or f"evaluate {source[2] if source else ref.uri} on {where}"
    tags = {
        **tracking.environment_tags(),
        "insect_exp.job": "evaluate",
        "source_model_uri": ref.uri,
        **({"source_model_id": ref.model_id} if ref.model_id else {}),
        **({"source_run_id": ref.run_id} if source else {}),
        "mlflow.note.content": _note(ref, source, folder),
        **cfg.mlflow.tags,
    }
    refused = tracking.refusals_named(uri, f"write to experiment {experiment!r}")
    with refused, tracking.start_run(uri, experiment, name, tags) as run:
        run.log_params(
            {
                "model_uri": ref.uri,
                "split": prefix,
                "folder": str(folder),
                "batch_size": cfg.batch_size,
                **tracking.flatten({"dataset": _dataset_params(cfg.dataset)}),
            }
        )
        evaluation = evaluate_files(cfg, ref, files, skipped)
        _log(run, ref, evaluation, prefix, cfg.seed)
        metrics, skipped = evaluation.metrics, evaluation.skipped
        if source and ref.run_id:  # the run that logged the model (source says it has one)
            summary = f"{prefix} of {folder}: accuracy {metrics.accuracy:.4f}"
            client.set_tag(ref.run_id, f"evaluation.{run.run_id}", summary)
    print(
        f"{prefix}_accuracy {metrics.accuracy:.4f} ({int(metrics.matrix.trace())}/"
        f"{int(metrics.matrix.sum())}), {prefix}_loss {metrics.loss:.4f}, macro F1 "
        f"{metrics.macro_f1:.4f}, {len(skipped)} files skipped\n{_tta_line(evaluation, prefix)}"
        f"MLflow run id: {run.run_id} (evaluates {ref.uri})\n"
        f"Open the UI: {tracking.ui_command(uri)}"
    )
    return metrics.accuracy


def _tta_line(evaluation: Evaluation, prefix: str) -> str:
    """The test-time augmented accuracy, as a line of the summary ('' without tta)."""
    if evaluation.tta is None:
        return ""
    return f"{prefix}_accuracy_tta {evaluation.tta.accuracy:.4f} (flip)\n"


def _source_run(client, ref: ModelRef) -> tuple[str, str, str] | None:
    """(experiment id, experiment name, run name) of the run that logged the model, if any."""
    if not ref.run_id:
        return None
    try:
        found = client.get_run(ref.run_id)
        experiment = client.get_experiment(found.info.experiment_id)
    except Exception:  # noqa: BLE001  (a model copied from another store: nothing to link)
        return None
    return found.info.experiment_id, experiment.name, found.info.run_name or ref.run_id


def _note(ref: ModelRef, source: tuple[str, str, str] | None, folder: Path) -> str:
    """The run's description in the MLflow UI, linking to the source run."""
    if source is None:
        return f"Evaluation of `{ref.uri}` on `{folder}`."
    link = f"#/experiments/{source[0]}/runs/{ref.run_id}"
    return f"Evaluation of `{ref.uri}` (run [{source[2]}]({link})) on `{folder}`."


def _dataset_params(dataset: DatasetConfig) -> dict[str, object]:
    from omegaconf import OmegaConf

    # A structured config's container is a dict (OmegaConf's return type covers lists too).
    return cast(
        dict[str, object], OmegaConf.to_container(OmegaConf.structured(dataset), enum_to_str=True)
    )


def evaluate_files(
    cfg: EvaluateConfig, ref: ModelRef, files: FileList, skipped: list[tuple[str, str]]
) -> Evaluation:
    """Decode as the model's training did (with its own decoder), run the model, score.

    Args:
        skipped: the files the scan skipped; those that fail to decode join them.
    """
    import numpy as np

    from insect_exp import calibration, tta
    from insect_exp.data.pipeline import decode_files

    started = time.monotonic()
    classifier = load_classifier(ref)
    split, failed = decode_files(
        files, ref.image_size, cfg.dataset.decode_workers, decoder=classifier.decode
    )
    skipped = sorted(skipped + failed)
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    if not len(split):
        raise UserError(f"none of the {len(files)} files could be decoded")
    step = cfg.batch_size
    chunks = [split.images[i : i + step] for i in range(0, len(split), step)]
    logits = np.concatenate([classifier.logits(chunk) for chunk in chunks])
    temperature = calibration.saved_temperature(classifier.module)
    probs = calibration.probabilities(logits, temperature)
    predicted = probs.argmax(axis=1)
    # A model without calibration has T = 1: nothing to compare its probabilities with.
    calibrated_by = temperature if temperature != 1.0 else None
    metrics = score(logits, split.labels, len(ref.class_names))
    metrics.calibration = calibration.report(logits, split.labels, calibrated_by)
    augmented = None
    if cfg.tta is not TTA.none:  # scored as the plain ones are: on the logits, not divided by T
        averaged = np.concatenate(
            [tta.probabilities(classifier.logits, c, cfg.tta) for c in chunks]
        )
        augmented = score(tta.as_logits(averaged), split.labels, len(ref.class_names))
    log.info("evaluated %d images in %.1f s", len(split), time.monotonic() - started)
    probability = probs[np.arange(len(predicted)), predicted]
    reliability = calibration.Reliability.of(logits, split.labels, calibrated_by)
    return Evaluation(
        metrics, split, predicted, probability, skipped, reliability, probs, augmented
    )


def score(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> Metrics:
    """Loss, accuracy (and top-3 accuracy beyond 3 classes) and the per-class scores."""
    from insect_exp.callbacks import scores

    found = scores(logits, labels)
    stats = per_class(labels, logits.argmax(axis=1), num_classes)
    return Metrics(
        found["loss"],
        found["accuracy"],
        precision=stats["precision"],
        recall=stats["recall"],
        f1=stats["f1"],
        support=stats["support"],
        matrix=stats["matrix"],
        top3_accuracy=found.get("top3_accuracy"),
    )


def _log(run: Run, ref: ModelRef, evaluation: Evaluation, prefix: str, seed: int) -> None:
    """Everything the evaluation run holds."""
    from mlflow.entities import Metric

    from insect_exp import calibration, plots

    metrics, split, names = evaluation.metrics, evaluation.split, ref.class_names
    summary = summary_metrics(metrics, prefix)
    summary |= {f"{prefix}_{key}": value for key, value in metrics.calibration.items()}
    if evaluation.tta is not None:
        summary |= summary_metrics(evaluation.tta, prefix, suffix="_tta")
    now = int(time.time() * 1000)
    # Linked to the logged model too: its page in the MLflow UI lists its evaluations.
    run.client.log_batch(
        run.run_id,
        metrics=[Metric(k, float(v), now, 0, model_id=ref.model_id) for k, v in summary.items()],
    )
    _log_per_class(run, names, metrics)
    run.log_metrics({"skipped_files": len(evaluation.skipped), "images": len(split)})
    run.log_table(
        ["path", "true", "predicted", "probability"],
        (
            (p, names[t], names[q], f"{c:.6f}")
            for p, t, q, c in zip(
                split.paths, split.labels, evaluation.predicted, evaluation.probability, strict=True
            )
        ),
        "predictions.tsv",
    )
    if evaluation.skipped:
        run.log_table(["path", "reason"], evaluation.skipped, "dataset/skipped.tsv")
    run.log_dict({"class_names": names, "matrix": metrics.matrix.tolist()}, "confusion_matrix.json")
    title = f"Confusion matrix ({prefix})"
    figure = plots.confusion_matrix_figure(metrics.matrix, names, title=title)
    run.log_figure(figure, "plots/confusion_matrix.png")
    calibration.log_reliability(run, evaluation.reliability, f"Reliability ({prefix})")
    _log_misclassified(run, names, evaluation, seed)


def summary_metrics(metrics: Metrics, prefix: str, suffix: str = "") -> dict[str, float]:
    """<prefix>_loss, <prefix>_accuracy, <prefix>_top3_accuracy (beyond 3 classes), macro_f1,
    each name ending in `suffix`."""
    found = {
        f"{prefix}_loss": metrics.loss,
        f"{prefix}_accuracy": metrics.accuracy,
        f"{prefix}_top3_accuracy": metrics.top3_accuracy,
        "macro_f1": metrics.macro_f1,
    }
    return {f"{key}{suffix}": float(v) for key, v in found.items() if v is not None}


def _log_misclassified(run: Run, names: list[str], evaluation: Evaluation, seed: int) -> None:
    """A grid of up to 30 misclassified images, picked at random by `seed`."""
    import numpy as np

    from insect_exp import plots

    split, predicted = evaluation.split, evaluation.predicted
    wrong = np.flatnonzero(predicted != split.labels)
    if not len(wrong):
        return
    rng = np.random.default_rng(seed)
    shown = np.sort(rng.choice(wrong, size=min(30, len(wrong)), replace=False))
    figure = plots.prediction_grid(
        split.images[shown],
        predicted[shown],
        names,
        true=split.labels[shown],
        title=f"Misclassified: {len(wrong)} of {len(split)} (predicted (true))",
        rows=-(-len(shown) // 5),
    )
    run.log_figure(figure, "plots/misclassified.png")


def _log_per_class(run: Run, names: list[str], metrics: Metrics) -> None:
    """precision_, recall_ and f1_<key> of every class, and per_class.tsv saying whose key is whose
    (names were changed to make keys)."""
    keys = class_keys(names)
    classes = {}
    for i, part in enumerate(keys):
        for key in ("precision", "recall", "f1"):
            classes[f"{key}_{part}"] = float(getattr(metrics, key)[i])
    run.log_metrics(classes)
    rows = [
        (name, keys[i], metrics.precision[i], metrics.recall[i], metrics.f1[i],
         int(metrics.support[i]))
        for i, name in enumerate(names)
    ]  # fmt: skip
    header = ["class", "metric_key", "precision", "recall", "f1", "support"]
    run.log_table(header, rows, "per_class.tsv")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def _hydra_main(dict_cfg: DictConfig) -> float | None:
    try:
        cfg = to_object(dict_cfg, EvaluateConfig)  # typed, ranges checked: before TensorFlow loads
        return run(cfg)
    except UserError as err:
        exit_with("insect_exp.evaluate", f"error: {err}", 2)
    except KeyboardInterrupt:
        exit_with("insect_exp.evaluate", "interrupted", 130)
    return None


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()


commands.make_callable(__name__)  # insect_exp.evaluate(...) is insect_exp.api.evaluate
