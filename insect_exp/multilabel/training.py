"""What Keras trains a multi-label classifier with: sigmoid cross-entropy and its metrics."""

from __future__ import annotations

import math

import tensorflow as tf
import tf_keras as keras


class SigmoidCrossentropy(keras.losses.Loss):
    """Binary cross-entropy of each class's logit, targets label-smoothed to (1 - s) * y + s / 2,
    checked finite (as fit.Crossentropy: a NaN stops training in the batch it appears in)."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "sigmoid_crossentropy"):
        super().__init__(name=name)
        self.label_smoothing = label_smoothing

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        loss = keras.losses.binary_crossentropy(
            tf.cast(y_true, y_pred.dtype),
            y_pred,
            from_logits=True,
            label_smoothing=self.label_smoothing,
        )
        return tf.debugging.check_numerics(loss, "non-finite loss")


def compile_multilabel(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    label_smoothing: float,
    threshold: float,
) -> None:
    """Sigmoid cross-entropy, binary accuracy at `threshold` (as `accuracy`: what early stopping,
    the batch curves and sweeps read) and the area under the precision-recall curve (`auc_pr`,
    the mean over classes)."""
    logit_threshold = math.log(threshold / (1 - threshold))  # on logits: sigmoid(z) >= t
    model.compile(
        optimizer=optimizer,
        loss=SigmoidCrossentropy(label_smoothing),
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy", threshold=logit_threshold),
            keras.metrics.AUC(curve="PR", multi_label=True, from_logits=True, name="auc_pr"),
        ],
    )
    model.distribute_reduction_method = "first"  # as fit.compile_classifier
