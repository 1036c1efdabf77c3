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

A file whose header gives more pixels than `max_pixels` is refused before any pixel is allocated:
an InvalidArgumentError whose message holds `too many pixels (<width>x<height>)` (`refusal` finds
it). Its width and height come from the header: libjpeg's for JPEG, and the fixed fields of the
PNG IHDR chunk, the GIF screen descriptor, the BMP info header and the WebP VP8/VP8L/VP8X chunk,
read as the decoders read them.

Whatever changes the pixels this gives changes what the disk cache holds: bump FORMAT_VERSION in
data/cache.py with it, so that entries decoded the old way are not reused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import tensorflow as tf

from insect_exp.config import MAX_IMAGE_PIXELS

_JPEG_SCALES = (1, 2, 4, 8)  # the reductions libjpeg's DCT scaling offers for these
_HEAD = 32  # the first bytes of a file: every header field read below lies within them
_REFUSAL = re.compile(r"too many pixels \(\d+x\d+\)")


# Its branches are tf.cond and tf.switch_case already: AutoGraph converting it (as tf.data does to
# the functions it maps) took 0.35 s more to trace.
@tf.autograph.experimental.do_not_convert
def decode_image(
    contents: tf.Tensor, image_size: Sequence[int], max_pixels: int = MAX_IMAGE_PIXELS
) -> tf.Tensor:
    """JPEG/PNG/GIF/BMP/WebP bytes (a scalar string) -> uint8 RGB of `image_size` (H, W, 3).

    Decoded by content (a PNG named .jpg is fine); grayscale, RGBA and palette images become RGB,
    a GIF gives its first frame; bilinear resize, rounded to uint8 as the training images are kept.
    A file of more than `max_pixels` pixels is refused unread (module docstring).
    """
    height, width = (int(v) for v in image_size)
    jpeg = tf.io.is_jpeg(contents)
    shape = tf.cond(
        jpeg,
        lambda: tf.cast(tf.image.extract_jpeg_shape(contents)[:2], tf.int64),
        lambda: _header_shape(contents),
    )
    image = tf.case(
        [
            (shape[0] * shape[1] > max_pixels, lambda: _refused(shape)),
            (jpeg, lambda: _decode_jpeg(contents, shape, height, width)),
        ],
        default=lambda: tf.io.decode_image(contents, channels=3, expand_animations=False),
        exclusive=False,
    )
    # Already the target size: a bilinear resize to the same size gives back the same pixels (every
    # sample lands on a pixel centre), so it is skipped: 3% of decoding small PNGs.
    same_size = tf.reduce_all(tf.shape(image)[:2] == (height, width))
    return tf.cond(same_size, lambda: image, lambda: _resized(image, height, width))


def _resized(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    image = tf.image.resize(image, (height, width))
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def refusal(err: Exception) -> str | None:
    """`too many pixels (<width>x<height>)` if ERR is decode_image refusing a file, else None."""
    found = _REFUSAL.search(getattr(err, "message", None) or str(err))
    return found.group(0) if found else None


def _refused(shape: tf.Tensor) -> tf.Tensor:
    """Fail with the refusal's message, allocating nothing (an empty image, never returned)."""
    message = tf.strings.format("too many pixels ({}x{})", (shape[1], shape[0]))
    with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
        return tf.zeros([0, 0, 3], tf.uint8)


def _header_shape(contents: tf.Tensor) -> tf.Tensor:
    """(height, width) int64 from a PNG, GIF, BMP or WebP header; (0, 0) for any other content
    (which tf.io.decode_image refuses by itself)."""
    # Zeros past a short file's end: every field below can be read, and no format matches.
    padded = tf.strings.join([tf.strings.substr(contents, 0, _HEAD), tf.constant(b"\0" * _HEAD)])
    head = tf.strings.substr(padded, 0, _HEAD)
    start = tf.strings.substr(head, 0, 4)
    b = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)

    def le(at: int, size: int) -> tf.Tensor:
        return sum(b[at + i] * 256**i for i in range(size))

    def be(at: int, size: int) -> tf.Tensor:
        return sum(b[at + i] * 256 ** (size - 1 - i) for i in range(size))

    def signed(value: tf.Tensor) -> tf.Tensor:  # a 32-bit two's complement field's magnitude
        return tf.abs(tf.where(value >= 2**31, value - 2**32, value))

    webp = tf.logical_and(
        tf.equal(start, b"RIFF"), tf.equal(tf.strings.substr(head, 8, 4), b"WEBP")
    )
    chunk = tf.strings.substr(head, 12, 4)
    bits = le(21, 4)  # VP8L: 14 bits of width - 1, then 14 of height - 1
    shapes = [  # (is this format, (height, width))
        (tf.equal(tf.strings.substr(head, 0, 8), b"\x89PNG\r\n\x1a\n"), (be(20, 4), be(16, 4))),
        (tf.equal(start, b"GIF8"), (le(8, 2), le(6, 2))),  # the logical screen, as TF allocates
        (tf.equal(tf.strings.substr(head, 0, 2), b"BM"), (signed(le(22, 4)), signed(le(18, 4)))),
        (webp & tf.equal(chunk, b"VP8 "), (le(28, 2) % 2**14, le(26, 2) % 2**14)),
        (webp & tf.equal(chunk, b"VP8L"), (bits // 2**14 % 2**14 + 1, bits % 2**14 + 1)),
        (webp & tf.equal(chunk, b"VP8X"), (le(27, 3) + 1, le(24, 3) + 1)),
    ]
    shape = tf.zeros([2], tf.int64)
    for is_format, (h, w) in shapes:
        shape = tf.where(is_format, tf.stack([h, w]), shape)
    return shape


def _decode_jpeg(contents: tf.Tensor, shape: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """A JPEG of SHAPE (its header's) decoded at the smallest of 1, 1/2, 1/4, 1/8 of its size
    that still covers HxW."""
    shape = tf.cast(shape, tf.int32)
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
