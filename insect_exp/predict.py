"""Label image files with a logged model, no labels needed:

    python -m insect_exp.predict model_uri=runs:/<run id>/model inputs=/path/to/file_or_folder \\
        [output=preds.csv] [top_k=3] [batch_size=64] [tta=flip] [explain=true]

`model_uri`: runs:/<run id>/model, models:/<name>/<version>, models:/<name>/latest,
models:/<name>@<alias>, models:/<model id>, or a model folder. One CSV row per image:
path,label,probability, then label_2,probability_2 ... up to top_k; without `output`, the CSV
goes to stdout. `tta=flip` averages each image's probabilities with its mirror image's. Files are
found as in training
(insect_exp/data: the same rules for what counts as an image, hidden names ignored) and decoded
and resized by the model's own decoder, in its SavedModel: as its training images were, whichever
version of insect_exp logged it. A file that cannot be used is reported on stderr with its reason
and skipped; so is one whose header gives more pixels than the model's limit (`too many pixels
(<width>x<height>)`), before it is decoded. Images stream through tf.data in batches (decoding
overlapped with the model), so the number of files is bounded by the list of their paths only;
progress goes to stderr on long inputs. `explain=true` also writes each image's Grad-CAM overlay
beside the CSV (insect_exp/explain.py), from the model's SavedModel.

Config errors, a bad model URI, an empty or missing `inputs` stop it with one line and exit code 2
before TensorFlow is loaded.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from insect_exp import UserError, commands
from insect_exp.config import TTA, PredictConfig, to_object
from insect_exp.errors import exit_with, first_line
from insect_exp.progress import Progress

if TYPE_CHECKING:
    import numpy as np

    from insect_exp.explain import OverlayWriter
    from insect_exp.serving import ImageClassifier

log = logging.getLogger(__name__)

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")
# The artifact repositories MLflow 3 knows, besides runs:/ and models:/.
_ARTIFACT_SCHEMES = frozenset(
    {"file", "s3", "r2", "b2", "gs", "wasbs", "abfss", "ftp", "sftp", "dbfs", "hdfs", "viewfs"}
    | {"http", "https", "mlflow-artifacts"}
)
_URI_FORMS = (
    "runs:/<run id>/model, models:/<name>/<version>, models:/<name>/latest, "
    "models:/<name>@<alias>, models:/<model id> or a model folder"
)
# Quiet MLflow's per-file download progress bars on stderr (set the variable to see them).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

ConfigStore.instance().store(name="predict_schema", node=PredictConfig)


# -- the model -------------------------------------------------------------------------------


@dataclass
class ModelRef:
    """A logged model found in the store, before anything large is downloaded."""

    uri: str
    class_names: list[str]
    image_size: tuple[int, int]
    run_id: str | None
    model_id: str | None
    task: str = "single"  # multilabel: a set of classes per image (docs/multilabel.md)


def store_uri(configured: str | None, model_uri: str) -> str:
    """The tracking URI (config, $MLFLOW_TRACKING_URI, or ./mlruns/mlflow.db), never created here.

    Raises:
        UserError: a runs:/ or models:/ URI with no SQLite store where the URI says.
    """
    from insect_exp.tracking import default_tracking_uri

    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(Path.cwd())
    needs_store = model_uri.startswith(("runs:", "models:"))
    if needs_store and uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
        if not db.is_file():
            raise UserError(
                f"no MLflow store at {db}: run from the directory you trained in, or set "
                "mlflow.tracking_uri=... (or $MLFLOW_TRACKING_URI)"
            )
    return uri


def find_model(uri: str, tracking_uri: str, multilabel_ok: bool = False) -> ModelRef:
    """Check `uri` names a model this tool logged, from its MLmodel file only (no TensorFlow).

    Args:
        multilabel_ok: whether the caller takes a multi-label model (predict does; evaluate and
            compare score one label per image).

    Raises:
        UserError: a scheme MLflow does not know (named), no such run/model/version, a model
            that was not logged by insect_exp with its class names, or an unwanted multi-label
            model.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    scheme = urllib.parse.urlparse(uri).scheme
    if scheme and len(scheme) > 1 and scheme not in {"runs", "models", *_ARTIFACT_SCHEMES}:
        raise UserError(f"model_uri {uri!r}: unknown scheme {scheme + ':'!r}; use {_URI_FORMS}")
    if not scheme and not Path(uri).expanduser().exists():
        raise UserError(f"model_uri {uri!r}: no such folder (use {_URI_FORMS})")
    if not scheme:
        uri = str(Path(uri).expanduser().resolve())
    mlflow.set_tracking_uri(tracking_uri)
    try:
        info = mlflow.models.get_model_info(uri)
    except (MlflowException, OSError) as err:
        where = f" in the MLflow store {tracking_uri}" if scheme in ("runs", "models") else ""
        raise UserError(f"model_uri {uri!r}{where}: {first_line(err)}") from None
    meta = info.metadata or {}
    if "class_names" not in meta or "image_size" not in meta:
        raise UserError(
            f"model_uri {uri!r} was not logged by this version of insect_exp (it has no class "
            "names); train it again to predict, evaluate or serve with it"
        )
    height, width = (int(v) for v in meta["image_size"])
    task = str(meta.get("task", "single"))
    if task == "multilabel" and not multilabel_ok:
        raise UserError(
            f"model_uri {uri!r} is a multi-label model (task=multilabel): evaluate and compare "
            "score one label per image; its run logged its test scores, and predict labels files"
        )
    names = list(meta["class_names"])
    return ModelRef(uri, names, (height, width), info.run_id, info.model_id, task)


def load_classifier(ref: ModelRef) -> ImageClassifier:
    """Download and load the model (TensorFlow loads here)."""
    import mlflow

    try:
        return mlflow.pyfunc.load_model(ref.uri).unwrap_python_model()
    except Exception as err:  # noqa: BLE001  (download or load: one line either way)
        raise UserError(f"cannot load model_uri {ref.uri!r}: {first_line(err)}") from err


# -- the inputs ------------------------------------------------------------------------------


def list_inputs(inputs: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The image files under `inputs` (a file or a folder), and (path, reason) for the others.

    Raises:
        UserError: `inputs` does not exist, or holds no file to try.
    """
    from insect_exp.data.scan import class_files, file_reason, stat_entry

    path = Path(inputs).expanduser()
    st = stat_entry(path)
    if isinstance(st, str):
        raise UserError(f"inputs {inputs!r}: {st}")
    found = class_files(path) if path.is_dir() else [(path, file_reason(path, st))]
    paths = [str(p) for p, reason in found if reason is None]
    skipped = [(str(p), reason) for p, reason in found if reason is not None]
    if not paths:
        if not skipped:
            raise UserError(f"inputs {inputs!r}: no files in this folder")
        first = f"{skipped[0][0]}: {skipped[0][1]}"
        raise UserError(f"inputs {inputs!r}: no image to label ({len(skipped)} skipped; {first})")
    return paths, skipped


# -- prediction ------------------------------------------------------------------------------


@dataclass
class Prediction:
    path: str
    probabilities: np.ndarray  # (classes,)


def _scorer(classifier: ImageClassifier, tta: TTA) -> Callable[[Any], np.ndarray]:
    """images -> the model's probabilities over `tta`'s views: softmax(logits / T), or a
    multi-label model's sigmoid(logits)."""
    from insect_exp import calibration
    from insect_exp.multilabel.scores import saved_thresholds
    from insect_exp.tta import multilabel_probabilities, probabilities

    if saved_thresholds(classifier.module) is not None:  # one sigmoid per class
        return lambda images: multilabel_probabilities(classifier.logits, images, tta)
    temperature = calibration.saved_temperature(classifier.module)
    return lambda images: probabilities(classifier.logits, images, tta, temperature)


def stream_predictions(
    classifier: ImageClassifier,
    paths: Sequence[str],
    batch_size: int = 64,
    workers: int = 0,
    on_skip: Any = None,
    tta: TTA = TTA.none,
) -> Iterator[Prediction]:
    """Probabilities for each path that decodes, in order; `on_skip(path, reason)` for the others.
    With tta=flip, each is the mean of the image's and its mirror image's (insect_exp/tta.py).

    Decoding (the model's own, from its SavedModel: the decoder, resize and rounding its training
    images had) runs in tf.data's threads while the model runs on the batch before. A file tf.data
    fails on is tried once more alone, as in training, and only if that fails too is it diagnosed
    (scan.diagnose) and skipped.
    """
    import numpy as np
    import tensorflow as tf

    from insect_exp.data.decode import refusal
    from insect_exp.data.pipeline import without_autotuning
    from insect_exp.data.scan import diagnose

    score = _scorer(classifier, tta)

    def decode(path: tf.Tensor) -> tf.Tensor:
        return classifier.decode(tf.io.read_file(path))

    ds = without_autotuning(
        tf.data.Dataset.from_tensor_slices(list(paths))
        .enumerate()
        .map(lambda i, p: (i, decode(p)), num_parallel_calls=workers or tf.data.AUTOTUNE)
        .ignore_errors()  # a failed file's index never arrives
        .batch(batch_size)
        .map(lambda i, x: (i, tf.cast(x, tf.float32)))
        .prefetch(2)
    )
    single = tf.function(decode, input_signature=[tf.TensorSpec([], tf.string)])

    def missing(upto: int, start: int) -> Iterator[Prediction]:
        for i in range(start, upto):
            try:
                image = single(tf.constant(paths[i])).numpy()[None].astype(np.float32)
            except tf.errors.OpError as err:  # refused for its size, or cannot be decoded
                if on_skip is not None:
                    on_skip(paths[i], refusal(err) or diagnose(paths[i]))
                continue
            found = score(image)
            yield Prediction(paths[i], found[0])

    expected = 0  # the next index in order: any below an index that arrives were dropped
    for index, images in ds:
        probs = score(images)
        for i, p in zip(index.numpy().tolist(), probs, strict=True):
            yield from missing(i, expected)
            yield Prediction(paths[i], p)
            expected = i + 1
    yield from missing(len(paths), expected)


def progress_for(total: int, setting: bool | None, stream: TextIO | None = None) -> Progress:
    """Progress on stderr (`stream`): `setting` None shows it on a terminal or from 1000 images."""
    stream = stream if stream is not None else sys.stderr
    enabled = setting if setting is not None else (stream.isatty() or total >= 1000)

    def report(line: str) -> None:  # predict's logging is off: its stderr is for the user
        print(line, file=stream, flush=True)

    return Progress(total, "predict", stream=stream, report=report, enabled=enabled)


def header(class_names: Sequence[str], top_k: int, multilabel: bool = False) -> list[str]:
    """The CSV's columns; a multi-label model's: path, labels, probabilities (`;`-separated)."""
    if multilabel:
        return ["path", "labels", "probabilities"]
    k = min(top_k, len(class_names))
    extra = [f"{name}_{i}" for i in range(2, k + 1) for name in ("label", "probability")]
    return ["path", "label", "probability", *extra]


def row(
    prediction: Prediction,
    class_names: Sequence[str],
    top_k: int,
    thresholds: np.ndarray | None = None,
) -> list[str]:
    """The CSV row of a prediction: the top_k classes; with a multi-label model's `thresholds`,
    every class at or above its threshold, most probable first."""
    if thresholds is not None:
        return label_set_row(prediction, class_names, thresholds)
    order = prediction.probabilities.argsort()[::-1][: min(top_k, len(class_names))]
    cells = [prediction.path]
    for i in order:
        cells += [class_names[i], f"{prediction.probabilities[i]:.6f}"]
    return cells


def label_set_row(
    prediction: Prediction, class_names: Sequence[str], thresholds: np.ndarray
) -> list[str]:
    """path, the labels at or above their thresholds and their probabilities, `;`-separated."""
    from insect_exp.data.multilabel import SEPARATOR

    probs = prediction.probabilities
    order = [i for i in probs.argsort()[::-1] if probs[i] >= thresholds[i]]
    labels = SEPARATOR.join(class_names[i] for i in order)
    return [prediction.path, labels, SEPARATOR.join(f"{probs[i]:.6f}" for i in order)]


def explain_writer(cfg: PredictConfig, classifier: ImageClassifier) -> OverlayWriter | None:
    """explain=true: where each image's Grad-CAM overlay goes (beside the CSV)."""
    if not cfg.explain or cfg.output is None:
        return None
    from insect_exp.explain import OverlayWriter
    from insect_exp.multilabel.scores import saved_thresholds

    if saved_thresholds(classifier.module) is not None:
        raise UserError("explain=true maps one predicted class: not for a multi-label model")

    return OverlayWriter.for_predict(classifier, cfg.output, cfg.inputs, cfg.batch_size)


def run(cfg: PredictConfig, stdout: TextIO | None = None) -> int:
    """Label every image of cfg.inputs; return how many were labelled."""
    from insect_exp.multilabel.scores import saved_thresholds

    started = time.monotonic()
    ref = find_model(cfg.model_uri, store_uri(cfg.mlflow.tracking_uri, cfg.model_uri), True)
    paths, skipped = list_inputs(cfg.inputs)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    classifier = load_classifier(ref)
    names = classifier.class_names
    thresholds = saved_thresholds(classifier.module)
    overlays = explain_writer(cfg, classifier)
    progress = progress_for(len(paths), cfg.progress)
    done = 0

    def on_skip(path: str, reason: str) -> None:
        skipped.append((path, reason))
        print(f"skipped {path}: {reason}", file=sys.stderr)
        progress.update(0, skipped=1)

    out = stdout or sys.stdout
    handle = open(cfg.output, "w", newline="") if cfg.output else None  # noqa: SIM115
    try:
        writer = csv.writer(handle or out, lineterminator="\n")
        writer.writerow(header(names, cfg.top_k, thresholds is not None))
        stream = stream_predictions(
            classifier, paths, cfg.batch_size, cfg.decode_workers, on_skip=on_skip, tta=cfg.tta
        )
        for prediction in stream:
            writer.writerow(row(prediction, names, cfg.top_k, thresholds))
            if overlays is not None:
                overlays.add(prediction.path)
            done += 1
            progress.update(1)
        if overlays is not None:
            overlays.close()
    finally:
        progress.close()
        if handle is not None:
            handle.close()
    seconds = time.monotonic() - started
    where = f" -> {cfg.output}" if cfg.output else ""
    print(
        f"predict: labelled {done} images, skipped {len(skipped)}, in {seconds:.1f} s{where}",
        file=sys.stderr,
    )
    return done


# -- command line ----------------------------------------------------------------------------


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def _hydra_main(dict_cfg: DictConfig) -> None:
    try:
        cfg = to_object(dict_cfg, PredictConfig)  # typed, ranges checked: before TensorFlow loads
        run(cfg)
    except UserError as err:
        exit_with("insect_exp.predict", f"error: {err}", 2)
    except KeyboardInterrupt:
        exit_with("insect_exp.predict", "interrupted", 130)
    except BrokenPipeError:  # `... | head`: the reader is gone
        sys.stderr.close()
        os._exit(0)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()


commands.make_callable(__name__)  # insect_exp.predict(...) is insect_exp.api.predict
