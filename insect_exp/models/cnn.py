"""The reference CNN, trained from scratch."""

from collections.abc import Sequence

import tf_keras as keras

from insect_exp.config import AugmentConfig, CNNConfig
from insect_exp.models import Recipe
from insect_exp.models.layers import augmentation_layers


def build_cnn(
    image_size: Sequence[int],
    num_classes: int,
    filters: Sequence[int] = (16, 32, 64),
    dense_units: int = 128,
    dropout: float = 0.0,
    augment: AugmentConfig | None = None,
) -> keras.Model:
    """Rescale 1/255, Conv(3x3, same, relu)+MaxPool per filter count, Dense, Dense logits.

    The model takes raw RGB pixels in 0..255, so the saved model needs no preprocessing.
    """
    height, width = (int(v) for v in image_size)
    layers: list[keras.layers.Layer] = [keras.Input(shape=(height, width, 3), name="images")]
    layers += augmentation_layers(augment or AugmentConfig())
    layers.append(keras.layers.Rescaling(1.0 / 255))
    for n in filters:
        layers.append(keras.layers.Conv2D(n, 3, padding="same", activation="relu"))
        layers.append(keras.layers.MaxPooling2D())
    layers.append(keras.layers.Flatten())
    layers.append(keras.layers.Dense(dense_units, activation="relu"))
    if dropout > 0:
        layers.append(keras.layers.Dropout(dropout))
    # float32 logits under a mixed-precision policy too: softmax and loss stay accurate.
    layers.append(keras.layers.Dense(num_classes, name="logits", dtype="float32"))
    return keras.Sequential(layers, name="cnn")


class CNNRecipe(Recipe):
    """The reference CNN, trained end to end on images."""

    cfg: CNNConfig

    def build(self, num_classes: int) -> keras.Model:
        c = self.cfg
        return build_cnn(c.image_size, num_classes, c.filters, c.dense_units, c.dropout, c.augment)
