"""The stateless keys of the random draws made on training batches (augmentation, mixing)."""

from __future__ import annotations

import tensorflow as tf


def batch_key(seed: int, epoch: tf.Tensor | int, batch: tf.Tensor | int, stream: int) -> tf.Tensor:
    """The key of one batch's draws in `stream`: a pure function of (seed, epoch, batch index).

    The stream is folded into the shuffle's (seed, epoch) key, so that each kind of draw is its
    own stream, apart from the shuffle's and from the others'.
    """
    epoch_key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    key = tf.random.experimental.stateless_fold_in(epoch_key, stream)
    return tf.random.experimental.stateless_fold_in(key, tf.cast(batch, tf.int64))
