"""A trained model as the files a run logs: the SavedModel the logged model serves, its class names,
and for devices a TensorFlow Lite model with labels.txt (`export.tflite=true`)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from insect_exp.config import ExportConfig, Quantize
from insect_exp.models.layers import ServingModule

# The logged model's artifact keys and input column, as serving.py (which MLflow loads on its own,
# without this package) names them; tests/test_export.py checks that both agree. Not imported from
# there: serving.py imports MLflow, which the training process leaves to its logging process.
IMAGE_COLUMN = "image"
SAVED_MODEL = "saved_model"
CLASS_NAMES = "class_names"

log = logging.getLogger(__name__)

LABELS = "labels"  # labels.txt: one class name a line, in class-id order (the TFLite convention)
# model.tflite: float32 images (N, H, W, 3) in 0..255 -> probabilities (calibrated, if the run was)
TFLITE = "tflite"


def write_model(
    module: ServingModule,
    class_names: list[str],
    directory: str | Path,
    export: ExportConfig | None = None,
) -> dict[str, Path]:
    """Write the model's files into `directory`; return them by artifact key.

    The SavedModel is saved without the TF1 saver ops (TF2 loading restores variables itself;
    building them took a third of a hub model's save time).
    """
    directory = Path(directory)
    files = {
        SAVED_MODEL: directory / "saved_model",
        CLASS_NAMES: directory / "class_names.json",
        LABELS: directory / "labels.txt",
    }
    options = tf.saved_model.SaveOptions(experimental_skip_saver=True)
    tf.saved_model.save(module, str(files[SAVED_MODEL]), module.signatures(), options)
    files[CLASS_NAMES].write_text(json.dumps(list(class_names)))
    files[LABELS].write_text("".join(f"{name}\n" for name in class_names))
    if export is not None and export.wanted:
        started = time.perf_counter()
        files[TFLITE] = directory / "model.tflite"
        files[TFLITE].write_bytes(tflite_model(module, export.quantize))
        log.info(
            "TFLite model (%s): %.1f MB in %.1f s",
            export.quantize.value,
            files[TFLITE].stat().st_size / 1e6,
            time.perf_counter() - started,
        )
    return files


def tflite_model(module: ServingModule, quantize: Quantize = Quantize.none) -> bytes:
    """The model as a TFLite flatbuffer: float32 images (N, H, W, 3) in 0..255 -> probabilities,
    the SavedModel's `probabilities` (softmax(logits / T)), its temperature frozen in.

    `Quantize.dynamic` stores the weights as int8 (dynamic-range quantization: about 4x smaller;
    activations stay float).
    """
    height, width = module.image_size
    spec = tf.TensorSpec([None, height, width, 3], tf.float32, name="images")

    @tf.function(input_signature=[spec])
    def probabilities(images: tf.Tensor) -> tf.Tensor:
        return module.probabilities(images)

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [probabilities.get_concrete_function()], module
    )
    if quantize is Quantize.dynamic:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def input_example(image: np.ndarray) -> dict[str, list[bytes]]:
    """What a client sends: one image (uint8 H x W x 3) as a JPEG file, in the `image` column.

    As the columns of a DataFrame: run.Run.log_tf_model makes it one (pandas stays out of the
    training process).
    """
    jpeg = tf.io.encode_jpeg(tf.constant(image, tf.uint8), quality=90).numpy()
    return {IMAGE_COLUMN: [jpeg]}


def metadata(
    class_names: list[str], image_size: list[int] | tuple[int, int], max_image_pixels: int
) -> dict[str, object]:
    """What the logged model's MLmodel file records about it: read without loading TensorFlow."""
    return {
        "class_names": list(class_names),
        "image_size": [int(v) for v in image_size],
        # Encoded files of more pixels are refused (HTTP 400), never decoded.
        "max_image_pixels": int(max_image_pixels),
        "inputs": "DataFrame column 'image' of encoded files, or float32 images (N, H, W, 3)",
    }
