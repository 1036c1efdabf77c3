"""Pieces every model shares: augmentation, optimizers, compilation."""

from collections.abc import Sequence

import tensorflow as tf
import tf_keras as keras


def augmentation_layers(
    flip: bool = False, rotation: float = 0.0, zoom: float = 0.0
) -> list[keras.layers.Layer]:
    """Random flip/rotation/zoom layers; Keras runs them only while training."""
    layers: list[keras.layers.Layer] = []
    if flip:
        layers.append(keras.layers.RandomFlip("horizontal"))
    if rotation:
        layers.append(keras.layers.RandomRotation(rotation))
    if zoom:
        layers.append(keras.layers.RandomZoom(zoom))
    return layers


def build_optimizer(
    name: str, learning_rate: float, **options: float
) -> keras.optimizers.Optimizer:
    """A Keras optimizer by config name ("adam", "sgd", "rmsprop") with its options."""
    classes = {
        "adam": keras.optimizers.Adam,
        "sgd": keras.optimizers.SGD,
        "rmsprop": keras.optimizers.RMSprop,
    }
    if name not in classes:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(classes)}")
    return classes[name](learning_rate=learning_rate, **options)


def compile_classifier(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
    """Cross-entropy on logits, accuracy: the reference's training objective."""
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


class ServingModule(tf.Module):
    """Wraps a Keras model as a plain SavedModel: raw float32 images in, logits out."""

    def __init__(self, model: keras.Model, image_size: Sequence[int]):
        super().__init__(name="classifier")
        # Track the variables, not the Keras model: saving a tracked Keras model also traces every
        # layer's functions, which nothing loads and which tripled the save time of hub models.
        self.model_variables = list(model.variables)
        height, width = (int(v) for v in image_size)
        spec = tf.TensorSpec([None, height, width, 3], tf.float32, name="images")

        def logits(images: tf.Tensor) -> tf.Tensor:
            return model(images, training=False)

        self.__call__ = tf.function(logits, input_signature=[spec])
