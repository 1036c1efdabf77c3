"""Frozen-backbone features, several batches at once on the CPU (models/feature_cache.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from insect_exp.data.pipeline import ImageSplit, make_dataset
from insect_exp.models import feature_cache
from insect_exp.progress import Progress

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


def test_streamed_features_are_keras_predicts_in_order_with_every_image_counted():
    model = _extractor()
    split = _split(4 * BATCH * feature_cache._STREAMS + 3)  # a partial last batch
    expected = model.predict(make_dataset(split, BATCH), verbose=0)
    with Progress(len(split), "features") as progress:
        got = feature_cache._predict_in_streams(model, make_dataset(split, BATCH), progress)
    np.testing.assert_array_equal(got, expected)
    assert progress.done == len(split)
    assert _streams() == []


def test_a_batch_is_split_across_the_streams_and_gives_keras_predicts_features():
    model = _extractor()
    split = _split(50)
    expected = model.predict(make_dataset(split, 32), verbose=0)
    np.testing.assert_allclose(feature_cache._predict(model, split, 32), expected, rtol=1e-5)


def test_an_empty_split_has_no_feature_rows():
    model = _extractor(features=7)
    got = feature_cache._predict(model, _split(0), BATCH)
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
        feature_cache._predict(model, split, BATCH)
    assert _streams() == []


class _InterruptAt(Progress):
    """A progress bar whose update raises KeyboardInterrupt (as Ctrl-C would) at `done`."""

    def __init__(self, total: int, at: int):
        super().__init__(total, "features")
        self.at = at

    def update(self, count: int) -> None:
        super().update(count)
        if self.done >= self.at:
            raise KeyboardInterrupt


def test_an_interrupt_stops_every_stream_before_the_split_is_done():
    model = _extractor()
    split = _split(40 * BATCH)
    progress = _InterruptAt(len(split), at=2 * BATCH)
    with pytest.raises(KeyboardInterrupt):
        feature_cache._predict_in_streams(model, make_dataset(split, BATCH), progress)
    assert _streams() == []
    # Streams finish the batch they hold, and take no new one.
    assert progress.done <= (2 + feature_cache._STREAMS) * BATCH


def test_a_model_built_under_a_distribution_strategy_goes_through_keras_predict(monkeypatch):
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        model = _extractor()
    assert not feature_cache._on_the_cpu_alone(model)
    assert feature_cache._on_the_cpu_alone(_extractor())

    def no_streams(*args, **kwargs):
        raise AssertionError("streamed a distributed model")

    monkeypatch.setattr(feature_cache, "_predict_in_streams", no_streams)
    split = _split(3 * BATCH + 1)
    got = feature_cache._predict(model, split, BATCH)
    np.testing.assert_allclose(got, model.predict(make_dataset(split, BATCH), verbose=0))
