"""The post's ImageNet preview: a full TF Hub classifier labels a batch of images."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_hub as hub

from insect_exp.models.handles import (
    CLASSIFIER_SETTING,
    LABELS_SETTING,
    HubHandleError,
    resolve_handle,
    resolve_preview,
)


def imagenet_preview(
    handle: str,
    labels: str | list[str],
    images: np.ndarray,
    timeout_s: float = 20.0,
    batch_size: int = 32,
) -> list[str]:
    """A full classifier's predicted class name for each raw 0..255 image.

    Args:
        labels: the class names, or where to read them (a labels file path or URL).
    """
    if isinstance(labels, str):
        source, names = resolve_preview(handle, labels, timeout_s)
    else:
        source, names = resolve_handle(handle, timeout_s, CLASSIFIER_SETTING), labels
    # A SavedModel computes in the dtypes it was saved with, whatever Keras's precision policy.
    classifier = hub.KerasLayer(str(source), dtype="float32")
    logits = np.concatenate(
        [
            classifier(tf.constant(images[i : i + batch_size], tf.float32) / 255.0).numpy()
            for i in range(0, len(images), batch_size)
        ]
    )
    if logits.shape[-1] != len(names):
        raise HubHandleError(
            f"{LABELS_SETTING.key} has {len(names)} names but the classifier at "
            f"{handle!r} outputs {logits.shape[-1]} classes"
        )
    return [names[i] for i in logits.argmax(axis=-1)]
