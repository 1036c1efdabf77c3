"""Augmentation policies of the training batches: RandAugment, TrivialAugment, random erasing.

- RandAugment (Cubuk, Zoph, Shlens and Le, "RandAugment: Practical automated data augmentation
  with a reduced search space", CVPR Workshops 2020, arXiv:1909.13719): each image goes through
  `num_ops` ops drawn uniformly (with replacement) from the list below, all at one magnitude M on
  the paper's 0..10 scale; with `magnitude_std` each op draws its magnitude from N(M, std) clipped
  to 0..10, as timm's `mstd` does.
- TrivialAugment (Muller and Hutter, "TrivialAugment: Tuning-free Yet State-of-the-Art Data
  Augmentation", ICCV 2021, arXiv:2103.10158): one op an image, drawn uniformly, at a magnitude
  drawn uniformly from its whole range, over the paper's wider ranges ("TA (Wide)").
- Random erasing (Zhong, Zheng, Kang, Li and Yang, "Random Erasing Data Augmentation", AAAI 2020,
  arXiv:1708.04896): with probability p, one rectangle of 2%..1/3 of the image, of aspect ratio
  0.3..3.3, filled with random pixels.

The ops are the papers' fourteen, with PIL's meaning (as torchvision and timm implement them):
identity, auto_contrast, equalize, rotate, solarize, color, posterize, contrast, brightness,
sharpness, shear_x, shear_y, translate_x, translate_y. Each one runs on a whole float32 batch
(0..255, NHWC) with a magnitude per image, and each image keeps the result of the op it drew:
the geometric ops are one projective transform per image (tf.raw_ops.ImageProjectiveTransformV3),
the colour ops blends with a degenerate image as PIL's ImageEnhance does. Results are rounded to
whole pixel levels as PIL's 8-bit images are, so at magnitude 0 every op but auto_contrast and
equalize (which have no magnitude) is the identity.

Every draw is stateless, from a key that is a pure function of (seed, epoch, batch index): a run
resumed at epoch e sees the augmented batches an uninterrupted run would have.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import tensorflow as tf

from insect_exp.config import AugmentConfig, AugmentPolicy
from insect_exp.data import batch_keys

# The op list, in a fixed order (an image's op is an index into it).
OPS = (
    "identity", "auto_contrast", "equalize", "rotate", "solarize", "color", "posterize",
    "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
)  # fmt: skip
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
ENHANCE = ("color", "contrast", "brightness", "sharpness")  # blends with a degenerate image
# Each op's largest magnitude: RandAugment's at M=10 (torchvision's and timm's ranges) and
# TrivialAugment's wide ones. Rotation in degrees, shear as a slope, translation as a fraction of
# the image side (TrivialAugment's 32 pixels taken on a 224-pixel image), enhance factors as
# 1 +- the value, posterize as bits removed, solarize as the fraction of levels inverted.
RANDAUGMENT_MAX = {
    "rotate": 30.0, "shear_x": 0.3, "shear_y": 0.3, "translate_x": 0.45, "translate_y": 0.45,
    "color": 0.9, "contrast": 0.9, "brightness": 0.9, "sharpness": 0.9,
    "posterize": 4.0, "solarize": 1.0,
}  # fmt: skip
TRIVIALAUGMENT_MAX = {
    "rotate": 135.0, "shear_x": 0.99, "shear_y": 0.99, "translate_x": 32 / 224,
    "translate_y": 32 / 224, "color": 0.99, "contrast": 0.99, "brightness": 0.99,
    "sharpness": 0.99, "posterize": 6.0, "solarize": 1.0,
}  # fmt: skip
FILL = 128.0  # what geometric ops move into the image: mid grey
ERASE_AREA = (0.02, 1 / 3)  # of the image (Zhong et al.'s s_l, s_h)
ERASE_RATIO = (0.3, 1 / 0.3)  # height / width (r_1, 1 / r_1)
# The key of a batch's draws (seed, epoch, batch index): the policy's and erasing's own stream.
batch_key = functools.partial(batch_keys.batch_key, stream=0x61756720)


def augment_images(images: tf.Tensor, key: tf.Tensor, augment: AugmentConfig) -> tf.Tensor:
    """A batch (float32 0..255, NHWC) after the policy and random erasing, drawn from `key`."""
    keys = iter(tf.unstack(tf.random.experimental.stateless_split(key, augment.num_ops + 1)))
    images = tf.convert_to_tensor(images, tf.float32)
    if augment.policy is AugmentPolicy.randaugment:
        for _ in range(augment.num_ops):
            images = _random_op(images, next(keys), RANDAUGMENT_MAX, _randaugment_level(augment))
    elif augment.policy is AugmentPolicy.trivialaugment:
        images = _random_op(images, next(keys), TRIVIALAUGMENT_MAX, _uniform_level)
    if augment.erasing > 0:
        images = erase(images, next(keys), augment.erasing)
    return images


Level = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (key, batch size) -> levels in [0, 1]


def _group(name: str) -> str:
    return "geometric" if name in GEOMETRIC else name


_GROUPS = tuple(dict.fromkeys(_group(name) for name in OPS))


def _randaugment_level(augment: AugmentConfig) -> Level:
    def level(key: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
        m = tf.fill([n], augment.magnitude / 10)
        if augment.magnitude_std > 0:
            m += augment.magnitude_std / 10 * tf.random.stateless_normal([n], key)
        return tf.clip_by_value(m, 0.0, 1.0)

    return level


def _uniform_level(key: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
    return tf.random.stateless_uniform([n], key)


def _random_op(
    images: tf.Tensor, key: tf.Tensor, maxima: dict[str, float], level: Level
) -> tf.Tensor:
    """Each image through one op drawn uniformly, at its level times the op's largest magnitude,
    with a random sign where the op has one (geometric and enhance ops)."""
    n = tf.shape(images)[0]
    op_key, level_key, sign_key = tf.unstack(tf.random.experimental.stateless_split(key, 3))
    choice = tf.random.stateless_uniform([n], op_key, 0, len(OPS), dtype=tf.int32)
    largest = tf.gather([maxima.get(name, 0.0) for name in OPS], choice)
    signed = tf.gather([name in GEOMETRIC + ENHANCE for name in OPS], choice)
    flip = signed & (tf.random.stateless_uniform([n], sign_key) < 0.5)
    magnitude = tf.where(flip, -1.0, 1.0) * largest * level(level_key, n)
    # Each op runs on the images that drew it: one group per pixel op, one for every geometric
    # op (a single transform), so the batch costs about one op an image.
    group = tf.gather([_GROUPS.index(_group(name)) for name in OPS], choice)
    geometric = tf.gather([GEOMETRIC.index(op) if op in GEOMETRIC else -1 for op in OPS], choice)
    count = len(_GROUPS)
    parts = zip(
        _GROUPS,
        tf.dynamic_partition(images, group, count),
        tf.dynamic_partition(magnitude, group, count),
        tf.dynamic_partition(geometric, group, count),
        strict=True,
    )
    done = [
        _transform(part, op, value) if name == "geometric" else apply_op(name, part, value)
        for name, part, value, op in parts
    ]
    out = tf.dynamic_stitch(tf.dynamic_partition(tf.range(n), group, count), done)
    out.set_shape(images.shape)
    return tf.clip_by_value(tf.round(out), 0.0, 255.0)


def apply_op(name: str, images: tf.Tensor, magnitude: tf.Tensor | float) -> tf.Tensor:
    """One op on every image of a batch (float32 0..255, NHWC), each at its own magnitude.

    The magnitude is in the op's own unit (RANDAUGMENT_MAX's), one value an image.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    magnitude = tf.broadcast_to(tf.cast(magnitude, tf.float32), tf.shape(images)[:1])
    if name in GEOMETRIC:
        return _transform(images, tf.fill(tf.shape(magnitude), GEOMETRIC.index(name)), magnitude)
    per_image = tf.reshape(magnitude, [-1, 1, 1, 1])
    if name in ENHANCE:
        degenerate = _DEGENERATE[name](images)
        return tf.clip_by_value(degenerate + (1.0 + per_image) * (images - degenerate), 0, 255)
    pixel_ops = {
        "identity": lambda: images,
        "auto_contrast": lambda: _auto_contrast(images),
        "equalize": lambda: _equalize(images),
        # Levels at or above the threshold are inverted: 256 at magnitude 0 (none), 0 at 1 (all).
        "solarize": lambda: tf.where(images >= 256 * (1 - per_image), 255 - images, images),
        "posterize": lambda: _posterize(images, tf.round(per_image)),
    }
    return pixel_ops[name]()


def _grey(images: tf.Tensor) -> tf.Tensor:
    return tf.round(tf.image.rgb_to_grayscale(images))


def _sharpness_degenerate(images: tf.Tensor) -> tf.Tensor:
    """PIL's SMOOTH filter (centre 5, neighbours 1, over 13) inside the image, its border kept."""
    # The 3x3 sum as two 3-tap sums (rows, then columns): cheaper than a convolution on a CPU.
    rows = images[:, :-2] + images[:, 1:-1] + images[:, 2:]
    box = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]
    smooth = tf.round((box + 4 * images[:, 1:-1, 1:-1]) / 13)
    smooth = tf.pad(smooth, [[0, 0], [1, 1], [1, 1], [0, 0]])
    shape = tf.shape(images)
    inner = tf.pad(tf.ones([shape[1] - 2, shape[2] - 2]), [[1, 1], [1, 1]])
    return tf.where(inner[None, :, :, None] > 0, smooth, images)


_DEGENERATE: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    # What each enhance op blends with: factor 0 gives it, 1 the image, 2 twice as far from it.
    "brightness": tf.zeros_like,
    "color": _grey,
    "contrast": lambda x: tf.round(tf.reduce_mean(_grey(x), axis=[1, 2, 3], keepdims=True)),
    "sharpness": _sharpness_degenerate,
}


def _posterize(images: tf.Tensor, bits_removed: tf.Tensor) -> tf.Tensor:
    step = tf.pow(2.0, bits_removed)
    return tf.floor(images / step) * step


def _auto_contrast(images: tf.Tensor) -> tf.Tensor:
    """Each channel of each image stretched to 0..255 (unchanged where it is flat)."""
    low = tf.reduce_min(images, axis=[1, 2], keepdims=True)
    high = tf.reduce_max(images, axis=[1, 2], keepdims=True)
    span = high - low
    stretched = (images - low) * 255 / tf.where(span > 0, span, 1.0)
    return tf.where(span > 0, stretched, images)


def _equalize(images: tf.Tensor) -> tf.Tensor:
    """Each channel of each image histogram-equalized with PIL's lookup table."""
    shape = tf.shape(images)
    # One row of pixel levels per (image, channel).
    channels_first = tf.transpose(tf.cast(images, tf.int32), [0, 3, 1, 2])
    levels = tf.reshape(channels_first, [-1, shape[1] * shape[2]])
    hist = tf.math.bincount(levels, minlength=256, maxlength=256, axis=-1)
    last = tf.reduce_max(tf.where(hist > 0, tf.range(256), -1), axis=1)
    step = (tf.reduce_sum(hist, axis=1) - tf.gather(hist, last, batch_dims=1)) // 255
    below = tf.cumsum(hist, axis=1, exclusive=True)
    safe = tf.maximum(step, 1)[:, None]
    lut = tf.minimum((below + safe // 2) // safe, 255)
    mapped = tf.where(step[:, None] > 0, tf.gather(lut, levels, batch_dims=1), levels)
    mapped = tf.reshape(tf.cast(mapped, tf.float32), [shape[0], shape[3], shape[1], shape[2]])
    return tf.transpose(mapped, [0, 2, 3, 1])


def _transform(images: tf.Tensor, op: tf.Tensor, magnitude: tf.Tensor) -> tf.Tensor:
    """Image i moved about its centre by geometric op GEOMETRIC[op[i]] of magnitude[i] (in the op's
    unit); op -1 leaves it in place."""
    shape = tf.shape(images)
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    v = magnitude
    one, zero = tf.ones_like(v), tf.zeros_like(v)
    cos, sin = tf.cos(v * math.pi / 180), tf.sin(v * math.pi / 180)
    # Output pixel (x, y) samples the input at (a0 x + a1 y + a2, b0 x + b1 y + b2): one row of
    # (a0, a1, a2, b0, b1, b2) per op, in GEOMETRIC's order, then the identity.
    params = tf.stack(
        [
            [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy],
            [one, v, -v * cy, zero, one, zero],  # shear_x
            [one, zero, zero, v, one, -v * cx],  # shear_y
            [one, zero, v * width, zero, one, zero],  # translate_x
            [one, zero, zero, zero, one, v * height],  # translate_y
            [one, zero, zero, zero, one, zero],
        ]
    )  # [op, param, image]
    row = tf.where(op >= 0, op, len(GEOMETRIC))
    chosen = tf.gather(tf.transpose(params, [2, 0, 1]), row, batch_dims=1)  # [image, param]
    transforms = tf.concat([chosen, tf.zeros_like(chosen[:, :2])], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=shape[1:3],
        fill_value=FILL,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )


def erase(images: tf.Tensor, key: tf.Tensor, probability: float) -> tf.Tensor:
    """Random erasing: each image, with `probability`, gets one rectangle of random pixels of
    ERASE_AREA of its area and an aspect ratio in ERASE_RATIO (clipped to the image)."""
    shape = tf.shape(images)
    n, height, width = shape[0], shape[1], shape[2]
    keys = tf.unstack(tf.random.experimental.stateless_split(key, 6))
    h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    area = tf.random.stateless_uniform([n], keys[0], *ERASE_AREA) * h_f * w_f
    log_ratio = tf.random.stateless_uniform([n], keys[1], *(math.log(r) for r in ERASE_RATIO))
    ratio = tf.exp(log_ratio)
    h = tf.clip_by_value(tf.round(tf.sqrt(area * ratio)), 1.0, h_f)
    w = tf.clip_by_value(tf.round(tf.sqrt(area / ratio)), 1.0, w_f)
    top = tf.floor(tf.random.stateless_uniform([n], keys[2]) * (h_f - h + 1))
    left = tf.floor(tf.random.stateless_uniform([n], keys[3]) * (w_f - w + 1))
    rows = tf.cast(tf.range(height), tf.float32)[None, :]
    cols = tf.cast(tf.range(width), tf.float32)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
    erased = tf.random.stateless_uniform([n], keys[4]) < probability
    inside = in_rows[:, :, None] & in_cols[:, None, :] & erased[:, None, None]
    noise = tf.floor(tf.random.stateless_uniform(shape, keys[5], 0, 256))
    return tf.where(inside[..., None], noise, images)
