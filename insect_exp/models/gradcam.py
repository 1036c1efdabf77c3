"""Grad-CAM (Selvaraju et al.): where in an image a classifier found its predicted class.

The gradients of the predicted class's logit with respect to the model's last spatial feature map
give one weight per channel (their spatial mean); the map is the ReLU of the channels' weighted
sum, scaled to [0, 1] and resized to the image. The feature map is found in the model's layers
(nested models included, such as a Keras application's backbone): the last layer with a 4-D
output that is not a pooling layer. A layer that turns a spatial map into a vector without
showing its insides (a TF Hub KerasLayer) has no map to explain: `NoFeatureMap` says so.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf
import tf_keras as keras

from insect_exp import UserError

# Pooling only subsamples the map before it: the map before it is the finer one.
_POOLING = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)

FeaturesAndLogits = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


class NoFeatureMap(UserError):
    """The model exposes no spatial feature map to explain."""


def _rank(tensor: object) -> int | None:
    shape = getattr(tensor, "shape", None)
    return None if shape is None or shape.rank is None else int(shape.rank)


def feature_path(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers that lead to the last spatial feature map: [nested model, ...] + [its layer].

    Raises:
        NoFeatureMap: no layer of the model outputs one, or a layer that hides its insides turns
            the images into a vector (a TF Hub layer: pooled features only).
    """
    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            try:
                return [layer, *feature_path(layer)]
            except NoFeatureMap:
                if _rank(layer.input) == 4:
                    raise
                continue
        if _rank(layer.output) == 4 and not isinstance(layer, _POOLING):
            return [layer]
        if _rank(layer.input) == 4 and layer.weights:
            raise NoFeatureMap(
                f"layer {layer.name!r} ({type(layer).__name__}) exposes only pooled features, "
                "no spatial feature map"
            )
    raise NoFeatureMap(f"model {model.name!r} has no layer with a spatial feature map")


def features_and_logits(model: keras.Model) -> FeaturesAndLogits:
    """images -> (the last spatial feature map, logits), in one forward pass of `model`'s layers.

    Raises:
        NoFeatureMap: as feature_path.
    """
    return _split(model, feature_path(model))


def _split(model: keras.Model, path: list[keras.layers.Layer]) -> FeaturesAndLogits:
    layer = path[0]
    if len(path) == 1:
        both = keras.Model(model.inputs, [layer.output, model.output])
        return lambda images: tuple(both(images, training=False))
    inner = _split(layer, path[1:])
    # A nested model's inner tensors are not connected to the outer input: run the outer layers
    # before it, the nested model (to its map and its output), then the outer layers after it.
    before = keras.Model(model.inputs, layer.get_input_at(-1))
    after = keras.Model(layer.get_output_at(-1), model.output)

    def run(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        features, output = inner(before(images, training=False))
        return features, after(output, training=False)

    return run


def gradcam(split: FeaturesAndLogits, images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Grad-CAM maps (N, H, W) in [0, 1] at the images' size, for each image's predicted class;
    and the logits (N, classes).

    Args:
        split: features_and_logits of the model.
        images: float32 (N, H, W, 3), as the model takes them.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    with tf.GradientTape() as tape:
        # Watching the input records every op after it, frozen layers included, so the gradient
        # reaches the feature map whichever variables train.
        tape.watch(images)
        features, logits = split(images)
        predicted = tf.argmax(logits, axis=1)
        # Each image's logit depends on its own features only: one gradient serves the batch.
        chosen = tf.gather(logits, predicted, batch_dims=1)
    grads = tf.cast(tape.gradient(chosen, features), tf.float32)
    features = tf.cast(features, tf.float32)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
    maps = tf.image.resize(cam[..., None], tf.shape(images)[1:3], method="bilinear")[..., 0]
    maps = tf.math.divide_no_nan(maps, tf.reduce_max(maps, axis=(1, 2), keepdims=True))
    return tf.clip_by_value(maps, 0.0, 1.0), tf.cast(logits, tf.float32)


def serving_function(
    model: keras.Model, spec: tf.TensorSpec
) -> tf.types.experimental.GenericFunction | None:
    """`gradcam(images) -> maps` as a tf.function to save with the model; None where the model
    has no feature map (NoFeatureMap)."""
    try:
        split = features_and_logits(model)
    except NoFeatureMap:
        return None

    def maps(images: tf.Tensor) -> tf.Tensor:
        return gradcam(split, images)[0]

    return tf.function(maps, input_signature=[spec])
