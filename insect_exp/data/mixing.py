"""Mixup and cutmix of training batches, with soft targets (as timm's Mixup in its batch mode).

A mixed batch is each image blended with (mixup) or pasted a box of (cutmix) the image at the
mirrored place in the batch, one Beta(alpha, alpha) draw for the whole batch; its targets are the
two labels' one-hot vectors weighted by the share of each (cutmix: by the pasted area). Every draw
is a pure function of (seed, epoch, batch index), so a resumed run mixes as an uninterrupted one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import tensorflow as tf

from insect_exp.config import TrainConfig
from insect_exp.data import batch_keys


@dataclass(frozen=True)
class Mixing:
    """The train.mix* settings: alphas of Beta draws (0: off) and when batches are mixed."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5  # with both on: the share of mixed batches that are cut-mixed
    prob: float = 1.0  # the share of batches mixed at all
    stop_epoch: int | None = None  # 0-based; batches of this epoch and later are not mixed

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Mixing:
        return cls(
            cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_switch_prob, cfg.mix_prob, cfg.mix_stop_epoch
        )

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


# The key of a batch's draws (seed, epoch, batch index): mixing's own stream.
batch_key = functools.partial(batch_keys.batch_key, stream=0x6D6978)


def beta(alpha: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
    """One Beta(alpha, alpha) draw as a ratio of two Gamma(alpha) draws (float32)."""
    draws = tf.random.stateless_gamma([2], key, alpha=tf.cast(alpha, tf.float64), dtype=tf.float64)
    total = tf.reduce_sum(draws)
    # A very small alpha can make both draws underflow to 0: the share is then all one image's.
    share = tf.where(total > 0, draws[0] / tf.maximum(total, 1e-300), 1.0)
    return tf.cast(share, tf.float32)


def mix_batch(
    images: tf.Tensor,
    labels: tf.Tensor,
    num_classes: int,
    mixing: Mixing,
    key: tf.Tensor,
    active: tf.Tensor | bool = True,
) -> tuple[tf.Tensor, tf.Tensor]:
    """(images, soft targets) of a batch of float32 images and integer labels.

    Unmixed (mixing off, not `active`, or not drawn by `mix_prob`), the images come back unchanged
    and the targets are one-hot.

    Args:
        key: the batch's stateless seed (`batch_key`).
        active: false past the stop epoch.
    """
    targets = tf.one_hot(tf.reshape(labels, [-1]), num_classes, dtype=tf.float32)
    if not mixing.enabled:
        return images, targets
    decide = tf.random.stateless_uniform([2], tf.random.experimental.stateless_fold_in(key, 0))
    mixed = tf.logical_and(active, decide[0] < mixing.prob)
    if mixing.mixup_alpha > 0 and mixing.cutmix_alpha > 0:
        cut = decide[1] < mixing.switch_prob
    else:
        cut = tf.constant(mixing.cutmix_alpha > 0)
    alpha = tf.where(cut, mixing.cutmix_alpha, mixing.mixup_alpha)
    share = beta(alpha, tf.random.experimental.stateless_fold_in(key, 1))
    share = tf.where(mixed, share, 1.0)  # a share of 1 leaves images and targets as they are
    partners = tf.reverse(images, [0])
    images, share = tf.cond(
        cut,
        lambda: cutmix(images, partners, share, tf.random.experimental.stateless_fold_in(key, 2)),
        lambda: (share * images + (1 - share) * partners, share),
    )
    return images, share * targets + (1 - share) * tf.reverse(targets, [0])


def cutmix(
    images: tf.Tensor, partners: tf.Tensor, share: tf.Tensor, key: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """The images with a box of their partners pasted in, and the share of the image left.

    The box has sides sqrt(1 - share) of the image's, centred anywhere and clipped at the edges;
    the share is then the area outside it (timm's rand_bbox with its corrected lambda).
    """
    size = tf.shape(images)[1:3]
    ratio = tf.sqrt(1.0 - share)
    half = tf.cast(tf.cast(size, tf.float32) * ratio, tf.int32) // 2
    centre = tf.cast(tf.random.stateless_uniform([2], key) * tf.cast(size, tf.float32), tf.int32)
    low = tf.clip_by_value(centre - half, 0, size)
    high = tf.clip_by_value(centre + half, 0, size)
    rows = tf.range(size[0])
    cols = tf.range(size[1])
    inside_rows = (rows >= low[0]) & (rows < high[0])
    inside_cols = (cols >= low[1]) & (cols < high[1])
    box = inside_rows[:, None] & inside_cols[None, :]
    pasted = tf.where(box[None, :, :, None], partners, images)
    area = tf.cast(tf.reduce_prod(high - low), tf.float32)
    return pasted, 1.0 - area / tf.cast(tf.reduce_prod(size), tf.float32)
