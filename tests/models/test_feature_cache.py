"""Frozen-backbone features computed by `cached_features` (models/feature_cache.py), several
batches at once on the CPU."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from insect_exp.data.pipeline import ImageSplit, make_dataset
from insect_exp.models.feature_cache import cached_features, disk_store

BATCH = 4


def _extractor(features: int = 5) -> keras.Model:
    keras.utils.set_random_seed(0)
    images = keras.Input(shape=(12, 12, 3))
    x = keras.layers.Rescaling(1.0 / 255)(images)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(images, keras.layers.Dense(features)(x))


def _split(count: int) -> ImageSplit:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 250, (count, 12, 12, 3), dtype=np.uint8)
    return ImageSplit(images, np.zeros(count, np.int32), [f"{i}.png" for i in range(count)])


def _streams() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "insect_exp-features"]


def _features(model: keras.Model, split: ImageSplit, batch_size: int) -> np.ndarray:
    features, computed = cached_features(model, split, batch_size)
    assert computed == len(split)
    return features.images


@pytest.mark.parametrize(("count", "batch_size"), [(16 * BATCH + 3, BATCH), (50, 32)])
def test_features_are_keras_predicts_in_order_and_no_stream_is_left(count, batch_size):
    # Given more batches than streams and a partial last batch, or batches split across streams
    model = _extractor()
    split = _split(count)
    expected = model.predict(make_dataset(split, batch_size), verbose=0)

    # Then the features are Keras's, row for row
    np.testing.assert_allclose(_features(model, split, batch_size), expected, rtol=1e-5)
    assert _streams() == []


def test_an_empty_split_has_no_feature_rows():
    got = _features(_extractor(features=7), _split(0), BATCH)
    assert got.shape == (0, 7) and got.dtype == np.float32


class _NoWhiteImage(keras.layers.Layer):
    def call(self, images: tf.Tensor) -> tf.Tensor:
        with tf.control_dependencies([tf.debugging.assert_less(images, 255.0, "a white image")]):
            return tf.identity(images)


def test_an_error_in_any_batch_is_raised_and_every_stream_stops():
    images = keras.Input(shape=(12, 12, 3))
    checked = _NoWhiteImage()(images)
    model = keras.Model(images, keras.layers.GlobalAveragePooling2D()(checked))
    split = _split(10 * BATCH)
    split.images[5 * BATCH + 1] = 255  # in the sixth batch, whichever stream takes it
    with pytest.raises(tf.errors.InvalidArgumentError, match="a white image"):
        cached_features(model, split, BATCH)
    assert _streams() == []


class _CtrlCAt(keras.layers.Layer):
    """Counts the batches it sees; at the `at`-th, this process gets SIGINT (as from Ctrl-C)."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at
        self.seen = 0

    def _count(self, images: tf.Tensor) -> tf.Tensor:
        self.seen += 1
        if self.seen == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return images

    def call(self, images: tf.Tensor) -> tf.Tensor:
        counted = tf.py_function(self._count, [images], tf.float32)
        return tf.ensure_shape(counted, images.shape)


def _interrupted_at_the_third_batch() -> tuple[bool, int, int]:
    """In a fresh process: an extractor that gets SIGINT at its third batch of forty. Whether
    KeyboardInterrupt reached the caller, the streams left, the batches run."""
    # No collector passes: Python drops a KeyboardInterrupt raised inside a finalizer.
    gc.disable()
    # Ctrl-C raises KeyboardInterrupt, as in a Python started from a terminal (one started by a
    # shell's background job, `cmd &`, inherits SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    images = keras.Input(shape=(12, 12, 3))
    counter = _CtrlCAt(at=3)
    pooled = keras.layers.GlobalAveragePooling2D()(counter(images))
    model = keras.Model(images, pooled)
    try:
        cached_features(model, _split(40 * BATCH), BATCH)
    except KeyboardInterrupt:
        return True, len(_streams()), counter.seen
    return False, len(_streams()), counter.seen


def test_an_interrupt_stops_every_stream_before_the_split_is_done():
    # Given an extractor that is interrupted at its third batch of forty, in a process of its own
    # (what earlier tests leave in this one, TensorFlow's threads and MLflow's objects, decides
    # where the signal lands: not what is under test)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        raised, streams, seen = pool.submit(_interrupted_at_the_third_batch).result(timeout=600)

    # Then the interrupt reaches the caller, with no stream left and most batches never run
    assert raised
    assert streams == 0
    assert seen < 20


def test_a_model_built_under_a_distribution_strategy_gets_keras_predicts_features():
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        model = _extractor()
    split = _split(3 * BATCH + 1)
    expected = model.predict(make_dataset(split, BATCH), verbose=0)
    np.testing.assert_allclose(_features(model, split, BATCH), expected, rtol=1e-5)


def test_features_of_a_former_format_are_deleted_when_the_disk_store_opens(tmp_path, monkeypatch):
    # Given a cache root holding features of the former format, features-v1
    monkeypatch.setenv("INSECT_EXP_CACHE_DIR", str(tmp_path))
    former = tmp_path / "features-v1" / "backbone"
    former.mkdir(parents=True)
    (former / "shard.npy").write_bytes(b"0" * 1000)

    # When a disk store opens in the cache root
    store = disk_store(None, "backbone", max_gb=1.0)

    # Then the former features are gone, and the store is in features-v2
    assert not (tmp_path / "features-v1").exists()
    assert store.dir == tmp_path / "features-v2" / "backbone"

    # And a store in a folder of its own leaves the cache root alone
    former.mkdir(parents=True)
    disk_store(str(tmp_path / "mine"), "backbone", max_gb=1.0)
    assert former.is_dir()
