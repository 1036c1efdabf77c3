"""The exported model of a multi-label run: sigmoid probabilities and per-class thresholds."""

from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tf_keras as keras

from insect_exp.config import MAX_IMAGE_PIXELS
from insect_exp.models.layers import ServingModule


class MultiLabelServingModule(ServingModule):
    """ServingModule (its logits, decoders and Grad-CAM) with one sigmoid per class:

    - `probabilities` (the `probabilities` signature, and TFLite's output): sigmoid(logits);
    - `thresholds`: a variable, each class's threshold tuned on the validation split;
    - `predict_labels` (the `labels` signature): float32 images -> `probabilities` and `predicted`
      (bool, probability >= the class's threshold), for TF Serving and other non-MLflow clients.
    """

    def __init__(
        self,
        model: keras.Model,
        image_size: Sequence[int],
        thresholds: np.ndarray,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ):
        super().__init__(model, image_size, max_pixels)
        self.thresholds = tf.Variable(
            np.asarray(thresholds, np.float32), dtype=tf.float32, trainable=False
        )
        height, width = self.image_size
        spec = tf.TensorSpec([None, height, width, 3], tf.float32, name="images")

        def probabilities(images: tf.Tensor) -> tf.Tensor:
            return tf.sigmoid(tf.cast(model(images, training=False), tf.float32))

        def predict_labels(images: tf.Tensor) -> dict[str, tf.Tensor]:
            probs = probabilities(images)
            return {"probabilities": probs, "predicted": probs >= self.thresholds}

        self.probabilities = tf.function(probabilities, input_signature=[spec])
        self.predict_labels = tf.function(predict_labels, input_signature=[spec])

    def signatures(self) -> dict[str, tf.types.experimental.PolymorphicFunction]:
        return {**super().signatures(), "labels": self.predict_labels}
