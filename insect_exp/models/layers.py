"""Pieces every model shares: augmentation layers, the classification head, the served module."""

from collections.abc import Sequence

import tensorflow as tf
import tf_keras as keras

from insect_exp.config import MAX_IMAGE_PIXELS, AugmentConfig


def augmentation_layers(augment: AugmentConfig) -> list[keras.layers.Layer]:
    """Random flip/rotation/zoom/translation/contrast/brightness; Keras runs them only in training.

    They sit before the model's rescaling, so they see raw 0..255 pixels.
    """
    layers: list[keras.layers.Layer] = []
    directions = (("horizontal", augment.flip), ("vertical", augment.vertical_flip))
    flips = [name for name, on in directions if on]
    if flips:
        layers.append(keras.layers.RandomFlip("_and_".join(flips)))
    if augment.rotation:
        layers.append(keras.layers.RandomRotation(augment.rotation))
    if augment.zoom:
        layers.append(keras.layers.RandomZoom(augment.zoom))
    if augment.translation:
        layers.append(keras.layers.RandomTranslation(augment.translation, augment.translation))
    if augment.contrast:
        layers.append(keras.layers.RandomContrast(augment.contrast))
    if augment.brightness:
        layers.append(keras.layers.RandomBrightness(augment.brightness, value_range=(0, 255)))
    return layers


def classification_head(num_features: int, num_classes: int, dropout: float) -> keras.Model:
    """[Dropout] + Dense logits as a nested model, trainable alone on cached features."""
    layers: list[keras.layers.Layer] = [keras.Input(shape=(num_features,))]
    if dropout > 0:
        layers.append(keras.layers.Dropout(dropout))
    # float32 logits under a mixed-precision policy too: softmax and loss stay accurate.
    layers.append(keras.layers.Dense(num_classes, name="logits", dtype="float32"))
    return keras.Sequential(layers, name="head")


class ServingModule(tf.Module):
    """Wraps a Keras model as a plain SavedModel (no Keras at load time). Its functions:

    - `__call__` (the `serving_default` signature): float32 images (N, H, W, 3) in 0..255 -> logits;
    - `classify_encoded` (the `encoded_images` signature): encoded image files (N,) -> logits,
      each decoded and resized exactly as the training images were (`data.decode.decode_image`);
    - `decode`: one encoded file -> uint8 (H, W, 3): what predict and evaluate decode files with,
      and how the pyfunc finds which file of a batch is bad;
    - `gradcam`: float32 images (N, H, W, 3) -> Grad-CAM maps (N, H, W) in [0, 1] of each image's
      predicted class (models/gradcam.py); absent where the model has no spatial feature map.
    - `probabilities` (the `probabilities` signature): float32 images -> softmax(logits / T), the
      model's calibrated probabilities. T is its variable `temperature`: 1 unless the run was
      calibrated (`calibrate=temperature`); the logits above are never divided by it.

    Both decoders refuse a file of more than `max_pixels` pixels before decoding it (the limit
    travels with the SavedModel, also as its variable `max_image_pixels`).
    """

    def __init__(
        self,
        model: keras.Model,
        image_size: Sequence[int],
        max_pixels: int = MAX_IMAGE_PIXELS,
        temperature: float = 1.0,
    ):
        from insect_exp.data.decode import decode_image
        from insect_exp.models import gradcam

        super().__init__(name="classifier")
        # Track the variables, not the Keras model: saving a tracked Keras model also traces every
        # layer's functions, which nothing loads and which tripled the save time of hub models.
        self.model_variables = list(model.variables)
        height, width = (int(v) for v in image_size)
        self.image_size = (height, width)
        self.max_image_pixels = tf.Variable(max_pixels, dtype=tf.int64, trainable=False)
        self.temperature = tf.Variable(temperature, dtype=tf.float32, trainable=False)
        spec = tf.TensorSpec([None, height, width, 3], tf.float32, name="images")
        image_spec = tf.TensorSpec([height, width, 3], tf.uint8)

        def logits(images: tf.Tensor) -> tf.Tensor:
            return model(images, training=False)

        def probabilities(images: tf.Tensor) -> tf.Tensor:
            return tf.nn.softmax(model(images, training=False) / self.temperature)

        def decode(contents: tf.Tensor) -> tf.Tensor:
            return decode_image(contents, (height, width), max_pixels)

        def classify_encoded(encoded: tf.Tensor) -> tf.Tensor:
            images = tf.map_fn(decode, encoded, fn_output_signature=image_spec)
            return model(tf.cast(images, tf.float32), training=False)

        self.__call__ = tf.function(logits, input_signature=[spec])
        self.probabilities = tf.function(probabilities, input_signature=[spec])
        self.decode = tf.function(decode, input_signature=[tf.TensorSpec([], tf.string)])
        self.classify_encoded = tf.function(
            classify_encoded, input_signature=[tf.TensorSpec([None], tf.string, name="encoded")]
        )
        cam = gradcam.serving_function(model, spec)
        if cam is not None:  # a model without a spatial feature map (a TF Hub backbone) has none
            self.gradcam = cam

    def signatures(self) -> dict[str, tf.types.experimental.PolymorphicFunction]:
        """The SavedModel's signatures, for TF Serving and other non-MLflow consumers."""
        return {
            "serving_default": self.__call__,
            "encoded_images": self.classify_encoded,
            "probabilities": self.probabilities,
        }
