"""What a logged model runs: an MLflow pyfunc over the trained SavedModel and its class names.

MLflow loads this file from the logged model's own directory ("models from code"): a logged model
needs MLflow, TensorFlow, NumPy and pandas only, so nothing here imports insect_exp, and nothing is
pickled. `mlflow.pyfunc.load_model(uri).predict(x)` and `mlflow models serve` take:

- a DataFrame with a column `image` of encoded image files (JPEG, PNG, GIF, BMP, WebP), as bytes or
  as base64 text (what `mlflow models serve` hands over from a JSON request). Each file is decoded
  and resized inside the SavedModel, by the function training decoded its images with. Returns a
  DataFrame, one row per image: `label` (the class name), `probability` (its probability) and
  `probabilities` ({class name: probability} for every class). The probabilities are
  softmax(logits / T), T the temperature in the SavedModel (1 unless the run was trained with
  `calibrate=temperature`; models logged before it existed have none: 1).
- float32 images (N, H, W, 3) in 0..255, already decoded and resized: returns the raw logits (N,
  classes), never divided by T, as the models logged before this wrapper did.

A multi-label model (task=multilabel: its SavedModel has per-class `thresholds`) answers encoded
files with `labels` ({class name: probability} for every class at or above its threshold, most
probable first) and `probabilities` ({class name: probability} for every class), each class's
probability its own sigmoid(logit).

Bad input (a file that is not a decodable image, a missing `image` column, an array of the wrong
shape) raises MlflowException(INVALID_PARAMETER_VALUE) naming the row and the reason: the scoring
server answers HTTP 400 with it and goes on serving. A file whose header gives more pixels than the
model's limit (`dataset.max_image_pixels` of its run, in its SavedModel) is refused that way
before a pixel of it is allocated: `row 0: too many pixels (20000x20000) ...`. Models logged
before the limit existed decode such files as they always did.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

IMAGE_COLUMN = "image"
# Artifact keys of the logged model (its artifacts/ folder).
SAVED_MODEL = "saved_model"
CLASS_NAMES = "class_names"
_BATCH = 64  # encoded images decoded and classified per call of the SavedModel
# How the SavedModel's decoder says it refused a file (insect_exp/data/decode.py; not imported:
# see above).
_REFUSAL = re.compile(r"too many pixels\W{1,6}(\d+)\W{1,3}(\d+)")


class BadInput(MlflowException):
    """Input the model cannot take; HTTP 400 from the scoring server."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def decode_error(err: Exception) -> str:
    """TensorFlow's reason a decode failed, without its graph trace: `Input is empty.`, `Unknown
    image file format. One of JPEG, ... required.`, `jpeg::Uncompress failed. ...`"""
    text = getattr(err, "message", None) or str(err)
    skip = ("[[", "File ", "Detected at", "Graph execution error")
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(skip)]
    return lines[-1].split(" [Op:")[0] if lines else type(err).__name__


class ImageClassifier(PythonModel):
    """The pyfunc: see the module docstring. Also the object insect_exp's own tools use."""

    def load_context(self, context: Any) -> None:
        self.load(context.artifacts[SAVED_MODEL], context.artifacts[CLASS_NAMES])

    def load(self, saved_model: str | Path, class_names: str | Path) -> None:
        import tensorflow as tf

        self._tf = tf
        self.module = tf.saved_model.load(str(saved_model))
        self.class_names: list[str] = json.loads(Path(class_names).read_text())
        spec = self.module.signatures["serving_default"].structured_input_signature[1]
        _, height, width, _ = next(iter(spec.values())).shape
        self.image_size = (int(height), int(width))
        temperature = getattr(self.module, "temperature", None)
        self.temperature = float(temperature.numpy()) if temperature is not None else 1.0
        thresholds = getattr(self.module, "thresholds", None)  # a multi-label model's
        self.thresholds = None if thresholds is None else np.asarray(thresholds.numpy(), float)

    def decode(self, contents: Any) -> Any:
        """One encoded file (a scalar string tensor) -> uint8 (H, W, 3), as the model's training
        images were decoded: the decoder is in its SavedModel, whichever version logged it. Usable
        inside tf.data and tf.function."""
        return self.module.decode(contents)

    # -- the two inputs ----------------------------------------------------------------------

    def logits(self, images: Any) -> np.ndarray:
        """Logits of images (N, H, W, 3) in 0..255: an array or a tensor, cast to float32."""
        return self.module.__call__(self._tf.cast(images, self._tf.float32)).numpy()

    def logits_of_files(self, encoded: list[bytes]) -> np.ndarray:
        """Logits of encoded image files, decoded and resized inside the SavedModel."""
        tf = self._tf
        out = []
        for start in range(0, len(encoded), _BATCH):
            chunk = encoded[start : start + _BATCH]
            try:
                out.append(self.module.classify_encoded(tf.constant(chunk, tf.string)).numpy())
            except tf.errors.OpError:  # not an image, corrupt, too large to decode, ...
                self._raise_for_bad_files(chunk, start)
                raise
        if not out:
            return np.zeros((0, len(self.class_names)), np.float32)
        return np.concatenate(out)

    def _raise_for_bad_files(self, chunk: list[bytes], offset: int) -> None:
        """Decode one by one to name the files that fail, and why."""
        bad = []
        for i, contents in enumerate(chunk):
            if not contents:
                bad.append(f"row {offset + i}: empty file")
                continue
            try:
                self.module.decode(self._tf.constant(contents, self._tf.string))
            except self._tf.errors.OpError as err:
                bad.append(f"row {offset + i}: {self._problem(err)}")
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise BadInput("; ".join(bad[:3]) + more)

    def _problem(self, err: Exception) -> str:
        """Why the model's decoder failed on a file, in a few words."""
        refused = _REFUSAL.search(getattr(err, "message", None) or str(err))
        if refused is None:
            return f"cannot decode the image ({decode_error(err)})"
        limit = getattr(self.module, "max_image_pixels", None)
        most = f"{int(limit.numpy())} pixels" if limit is not None else "its limit"
        size = f"{refused.group(1)}x{refused.group(2)}"
        return f"too many pixels ({size}): the model decodes images of at most {most}"

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The model's probabilities for its logits: softmax(logits / T), calibrated if it was; a
        multi-label model's: sigmoid(logits)."""
        if self.thresholds is not None:
            return 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))
        return softmax(np.asarray(logits, dtype=np.float64) / self.temperature)

    def label_sets(self, probs: np.ndarray) -> pd.DataFrame:
        """A multi-label model's rows: labels at or above their thresholds, every probability."""
        assert self.thresholds is not None
        names, thresholds = self.class_names, self.thresholds
        labels = []
        for row in probs:
            order = [i for i in row.argsort()[::-1] if row[i] >= thresholds[i]]
            labels.append({names[i]: float(row[i]) for i in order})
        every = [{n: float(p) for n, p in zip(names, row, strict=True)} for row in probs]
        return pd.DataFrame({"labels": labels, "probabilities": every})

    def table(self, logits: np.ndarray) -> pd.DataFrame:
        """One row per image: label, probability, and every class's probability (a multi-label
        model's: `label_sets`)."""
        probs = self.probabilities(logits)
        if self.thresholds is not None:
            return self.label_sets(probs)
        best = probs.argmax(axis=1)
        names = self.class_names
        return pd.DataFrame(
            {
                "label": [names[i] for i in best],
                "probability": probs[np.arange(len(best)), best].astype(float),
                "probabilities": [
                    {name: float(p) for name, p in zip(names, row, strict=True)} for row in probs
                ],
            }
        )

    # -- pyfunc ------------------------------------------------------------------------------

    # A DataFrame or an array: MLflow neither validates nor converts input typed as a DataFrame
    # (no hint at all gets a warning at every logging).
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> Any:
        if isinstance(model_input, dict) and IMAGE_COLUMN in model_input:
            model_input = pd.DataFrame({IMAGE_COLUMN: list(model_input[IMAGE_COLUMN])})
        if isinstance(model_input, pd.DataFrame):
            if IMAGE_COLUMN not in model_input.columns:
                raise BadInput(
                    f"expected a column {IMAGE_COLUMN!r} of encoded image files (bytes, or "
                    f"base64 text); got columns {list(model_input.columns)}"
                )
            encoded = [_as_bytes(v, i) for i, v in enumerate(model_input[IMAGE_COLUMN])]
            return self.table(self.logits_of_files(encoded))
        try:
            images = np.asarray(model_input, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise BadInput(f"expected float images (N, H, W, 3) in 0..255: {err}") from None
        height, width = self.image_size
        if images.ndim != 4 or images.shape[1:] != (height, width, 3):
            raise BadInput(
                f"expected float images of shape (N, {height}, {width}, 3) in 0..255, or a "
                f"DataFrame with a column {IMAGE_COLUMN!r} of encoded image files; got an array "
                f"of shape {images.shape}"
            )
        return self.logits(images)


def _as_bytes(value: Any, row: int) -> bytes:
    """An encoded file from a cell: bytes as they are, text as base64."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:  # MLflow's own base64 (of input examples) has line breaks
            return base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            raise BadInput(f"row {row}: the {IMAGE_COLUMN!r} value is not base64 text") from None
    raise BadInput(
        f"row {row}: the {IMAGE_COLUMN!r} value is {type(value).__name__}, not the bytes of an "
        "image file (or their base64 text)"
    )


# MLflow runs this file under a module name of its own when it logs or loads the model; imported
# as insect_exp.serving it only defines the class.
if __name__ != "insect_exp.serving":
    set_model(ImageClassifier())
