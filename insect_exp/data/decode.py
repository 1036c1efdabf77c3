"""Encoded image file -> the model's input: the one decode-and-resize that training and the logged
model share. The logged model carries it in its SavedModel graph, and predict and evaluate use
that copy, so a model keeps the decoding it was trained with.

`decode_image(tf.io.read_file(path), size)` is exactly what a training image goes through
(tests/test_serve.py checks it bit for bit on every format).

A JPEG at least twice the target size on both sides is decoded at 1/2, 1/4 or 1/8 of its size
(libjpeg's DCT scaling: the largest reduction that leaves both sides at least the target's), then
resized like any image. That is less work than decoding every pixel only to skip most of them:
photo-size JPEGs (500x375) to 180x180 decoded 16% faster on 2 cores. The image is also better
for it: the reduction averages each block, where a bilinear resize from the full size (not
antialiased, as tf.image.resize and Keras's loaders do) samples a few pixels and aliases.
Smaller JPEGs, and every other format, decode at full size.

Whatever changes the pixels this gives changes what the disk cache holds: bump FORMAT_VERSION in
data/cache.py with it, so that entries decoded the old way are not reused.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

_JPEG_SCALES = (1, 2, 4, 8)  # the reductions libjpeg's DCT scaling offers for these


# Its branches are tf.cond and tf.switch_case already: AutoGraph converting it (as tf.data does to
# the functions it maps) took 0.35 s more to trace.
@tf.autograph.experimental.do_not_convert
def decode_image(contents: tf.Tensor, image_size: Sequence[int]) -> tf.Tensor:
    """JPEG/PNG/GIF/BMP/WebP bytes (a scalar string) -> uint8 RGB of `image_size` (H, W, 3).

    Decoded by content (a PNG named .jpg is fine); grayscale, RGBA and palette images become RGB,
    a GIF gives its first frame; bilinear resize, rounded to uint8 as the training images are kept.
    """
    height, width = (int(v) for v in image_size)
    image = tf.cond(
        tf.io.is_jpeg(contents),
        lambda: _decode_jpeg(contents, height, width),
        lambda: tf.io.decode_image(contents, channels=3, expand_animations=False),
    )
    # Already the target size: a bilinear resize to the same size gives back the same pixels (every
    # sample lands on a pixel centre), so it is skipped: 3% of decoding small PNGs.
    same_size = tf.reduce_all(tf.shape(image)[:2] == (height, width))
    return tf.cond(same_size, lambda: image, lambda: _resized(image, height, width))


def _resized(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    image = tf.image.resize(image, (height, width))
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def _decode_jpeg(contents: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """A JPEG decoded at the smallest of 1, 1/2, 1/4, 1/8 of its size that still covers HxW."""
    shape = tf.image.extract_jpeg_shape(contents)  # reads the header only
    # libjpeg rounds a reduced side up; a reduction that fits implies every smaller one fits.
    fits = [
        tf.logical_and((shape[0] + r - 1) // r >= height, (shape[1] + r - 1) // r >= width)
        for r in _JPEG_SCALES[1:]
    ]
    index = tf.reduce_sum(tf.cast(tf.stack(fits), tf.int32))
    branches = [
        (lambda r=r: tf.io.decode_jpeg(contents, channels=3, ratio=r)) for r in _JPEG_SCALES
    ]
    return tf.switch_case(index, branches)
