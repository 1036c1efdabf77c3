"""Encoded image file -> the model's input: the one decode-and-resize that training, prediction and
the logged model share (the logged model carries it in its SavedModel graph).

`decode_image(tf.io.read_file(path), size)` is exactly what `pipeline._decode_fn(size)(path)` does
to a training image (tests/test_serve.py checks it bit for bit on every format).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf


def decode_image(contents: tf.Tensor, image_size: Sequence[int]) -> tf.Tensor:
    """JPEG/PNG/GIF/BMP/WebP bytes (a scalar string) -> uint8 RGB of `image_size` (H, W, 3).

    Decoded by content (a PNG named .jpg is fine); grayscale, RGBA and palette images become RGB,
    a GIF gives its first frame; bilinear resize, rounded to uint8 as the training images are kept.
    """
    height, width = (int(v) for v in image_size)
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image = tf.image.resize(image, (height, width))
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
