"""Encoded image file -> the model's input: the one decode-and-resize that training and the logged
model share. The logged model carries it in its SavedModel graph, and predict and evaluate use
that copy, so a model keeps the decoding it was trained with.

`decode_image(tf.io.read_file(path), size)` is exactly what a training image goes through
(tests/test_serving.py checks it bit for bit on every format).

A JPEG at least twice the target size on both sides is decoded at 1/2, 1/4 or 1/8 of its size
(libjpeg's DCT scaling: the largest reduction that leaves both sides at least the target's), then
resized like any image. That is less work than decoding every pixel only to skip most of them:
photo-size JPEGs (500x375) to 180x180 decoded 16% faster on 2 cores. The image is also better
for it: the reduction averages each block, where a bilinear resize from the full size (not
antialiased, as tf.image.resize and Keras's loaders do) samples a few pixels and aliases.
Smaller JPEGs, and every other format, decode at full size.

A file whose header gives more pixels than `max_pixels` is refused before any pixel is allocated:
an InvalidArgumentError that `refusal` reads as `too many pixels (<width>x<height>)`. The width
and height come from the header: libjpeg's for JPEG, and the fixed fields of the PNG IHDR chunk,
the GIF screen descriptor, the BMP info header and the WebP VP8/VP8L/VP8X chunk, read as the
decoders read them. The check costs every image a few dozen small ops: negligible beside a
photo's decoding, noticeable only for tiny images.

Whatever changes the pixels this gives changes what the disk cache holds: bump FORMAT_VERSION in
data/cache.py with it, so that entries decoded the old way are not reused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from insect_exp.config import MAX_IMAGE_PIXELS

_JPEG_SCALES = (1, 2, 4, 8)  # the reductions libjpeg's DCT scaling offers for these
_HEAD = 32  # the first bytes of a file: every header field read below lies within them
# How a refusal reads in TensorFlow's error: the Assert op's data, its text, then the width and
# height (`[too many pixels] [20000 20000]` in a graph, `'too many pixels'\n20000, 20000` eagerly).
_REFUSAL = re.compile(r"too many pixels\W{1,6}(\d+)\W{1,3}(\d+)")


# Its branches are tf.cond and tf.switch_case already: AutoGraph converting it (as tf.data does to
# the functions it maps) would only make it slower to trace.
@tf.autograph.experimental.do_not_convert
def decode_image(
    contents: tf.Tensor, image_size: Sequence[int], max_pixels: int = MAX_IMAGE_PIXELS
) -> tf.Tensor:
    """JPEG/PNG/GIF/BMP/WebP bytes (a scalar string) -> uint8 RGB of `image_size` (H, W, 3).

    Decoded by content (a PNG named .jpg is fine); grayscale, RGBA and palette images become RGB,
    a GIF gives its first frame; bilinear resize, rounded to uint8 as the training images are kept.
    A file of more than `max_pixels` pixels is refused unread (module docstring).
    """
    return decode_image_and_size(contents, image_size, max_pixels)[0]


@tf.autograph.experimental.do_not_convert
def decode_image_and_size(
    contents: tf.Tensor, image_size: Sequence[int], max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[tf.Tensor, tf.Tensor]:
    """`decode_image`'s image, and the file's (width, height) from its header (int32): the size
    the decoding reads anyway to refuse a file too large, so it costs nothing more."""
    height, width = (int(v) for v in image_size)
    image, size = tf.cond(
        tf.io.is_jpeg(contents),
        lambda: _decode_jpeg(contents, height, width, max_pixels),
        lambda: _decode_other(contents, max_pixels),
    )
    # Already the target size: a bilinear resize to the same size gives back the same pixels (every
    # sample lands on a pixel centre), so it is skipped: 3% of decoding small PNGs.
    same_size = tf.reduce_all(tf.shape(image)[:2] == (height, width))
    image = tf.cond(same_size, lambda: image, lambda: _resized(image, height, width))
    return image, size


def _resized(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    image = tf.image.resize(image, (height, width))
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def refusal(err: Exception) -> str | None:
    """`too many pixels (<width>x<height>)` if ERR is decode_image refusing a file, else None."""
    found = _REFUSAL.search(getattr(err, "message", None) or str(err))
    return f"too many pixels ({found.group(1)}x{found.group(2)})" if found else None


def _within(size: tf.Tensor, max_pixels: int) -> tf.Operation:
    """An op that fails, naming SIZE, where SIZE (width, height) has more than max_pixels."""
    pixels = tf.reduce_prod(tf.cast(size, tf.float64))
    # int32 and text: data Assert takes as they are, without a cond around it (faster).
    return tf.debugging.Assert(pixels <= max_pixels, ["too many pixels", tf.cast(size, tf.int32)])


def _decode_other(contents: tf.Tensor, max_pixels: int) -> tuple[tf.Tensor, tf.Tensor]:
    size = _header_size(contents)
    # The decoder runs only once the header's size has passed.
    with tf.control_dependencies([_within(size, max_pixels)]):
        image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    return image, tf.cast(size, tf.int32)


def _header_table() -> dict[str, np.ndarray]:
    """The constants `_header_size` reads a header with: one matrix product gives every
    signature and every (width, height) field at once; per-format rules finish the fields."""
    be, le = True, False
    signatures = [  # (offset, size, big-endian, expected bytes)
        (0, 4, be, b"\x89PNG"), (4, 4, be, b"\r\n\x1a\n"), (0, 4, be, b"GIF8"), (0, 2, be, b"BM"),
        (0, 4, be, b"RIFF"), (8, 4, be, b"WEBP"), (12, 4, be, b"VP8 "), (12, 4, be, b"VP8L"),
        (12, 4, be, b"VP8X"),
    ]  # fmt: skip
    # format: (signatures required, width and height as (offset, size, big-endian, divisor,
    # modulus, plus)); BMP's fields are signed, its height negative for top-down rows.
    formats = [
        ((0, 1), (16, 4, be, 1, 2**40, 0), (20, 4, be, 1, 2**40, 0)),  # PNG: IHDR
        ((2,), (6, 2, le, 1, 2**40, 0), (8, 2, le, 1, 2**40, 0)),  # GIF: the logical screen
        ((3,), (18, 4, le, 1, 2**40, 0), (22, 4, le, 1, 2**40, 0)),  # BMP: info header
        ((4, 5, 6), (26, 2, le, 1, 2**14, 0), (28, 2, le, 1, 2**14, 0)),  # WebP lossy
        ((4, 5, 7), (21, 4, le, 1, 2**14, 1), (21, 4, le, 2**14, 2**14, 1)),  # lossless
        ((4, 5, 8), (24, 3, le, 1, 2**40, 1), (27, 3, le, 1, 2**40, 1)),  # extended: canvas
    ]
    fields = [(at, size, big) for at, size, big, _ in signatures]
    fields += [field[:3] for _, *sides in formats for field in sides]
    weights = np.zeros((len(fields), _HEAD))
    for row, (at, size, big) in enumerate(fields):
        for i in range(size):
            weights[row, at + i] = 256 ** (size - 1 - i if big else i)
    rules = np.array([field[3:] for _, *sides in formats for field in sides], np.float64)
    return {
        "weights": weights,
        "expected": np.array([int.from_bytes(e, "big") for *_, e in signatures], np.float64),
        "unneeded": np.array(
            [[i not in need for i in range(len(signatures))] for need, *_ in formats]
        ),
        # A 32-bit field's wrap-around: BMP's are signed, the others never wrap.
        "wrap": np.array([[2.0**32 if fmt == 2 else 2.0**60] * 2 for fmt in range(len(formats))]),
        "divisor": rules[:, 0].reshape(-1, 2),
        "modulus": rules[:, 1].reshape(-1, 2),
        "plus": rules[:, 2].reshape(-1, 2),
    }


_TABLE = _header_table()


def _header_size(contents: tf.Tensor) -> tf.Tensor:
    """(width, height) from a PNG, GIF, BMP or WebP header, as their decoders read it; (0, 0) for
    any other content (which tf.io.decode_image refuses by itself)."""
    # Each op here costs every image a few microseconds: they are as few as they can be.
    t = _TABLE
    # The first bytes, zeros past a short file's end: every field can be read, and no signature
    # matches.
    head = tf.cast(tf.io.decode_raw(contents, tf.uint8, fixed_length=_HEAD), tf.float64)
    found, sides = tf.split(tf.linalg.matvec(t["weights"], head), [len(t["expected"]), -1])
    is_format = tf.reduce_all(tf.equal(found, t["expected"]) | t["unneeded"], axis=1)
    sides = tf.reshape(sides, [-1, 2])
    sides = tf.minimum(sides, t["wrap"] - sides)  # a signed field (BMP's) by its magnitude
    sides = tf.math.floormod(tf.math.floordiv(sides, t["divisor"]), t["modulus"]) + t["plus"]
    return tf.linalg.matvec(sides, tf.cast(is_format, tf.float64), transpose_a=True)


def _decode_jpeg(
    contents: tf.Tensor, height: int, width: int, max_pixels: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """A JPEG decoded at the smallest of 1, 1/2, 1/4, 1/8 of its size that still covers HxW,
    and its size (width, height)."""
    shape = tf.image.extract_jpeg_shape(contents)  # reads the header only
    size = tf.reverse(shape[:2], [0])
    with tf.control_dependencies([_within(size, max_pixels)]):  # no decoding before it passes
        return _decode_jpeg_at(contents, shape, height, width), size


def _decode_jpeg_at(contents: tf.Tensor, shape: tf.Tensor, height: int, width: int) -> tf.Tensor:
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
