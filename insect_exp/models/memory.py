"""The memory a model's training at least takes, from its config alone, checked before a run opens.

Nothing is built and TensorFlow is not imported: the estimates are lower bounds, so that a run
refused here could not have fit, whatever the machine.
"""

from __future__ import annotations

from typing import NamedTuple

from insect_exp import UserError, hardware
from insect_exp.config import BackboneConfig, CNNConfig, ModelConfig

# Bytes per input pixel that a pretrained backbone's forward pass at least holds at once, per
# image: the float32 input (3 channels) and the next tensor, at least as big: the rescaling or
# preprocessing layer's output, or the backbone's stem (a stride-2 convolution of 16 channels or
# more, as in every tf_keras.applications model, holds more values than its input).
BACKBONE_BYTES_PER_PIXEL = 2 * 3 * 4


class Estimate(NamedTuple):
    params: int | None  # None where the architecture is not known from the config
    bytes: int


def training_bytes(cfg: ModelConfig, batch_size: int, num_classes: int) -> Estimate | None:
    """What training this model at least takes; None where the model gives no estimate."""
    if isinstance(cfg, CNNConfig):
        return _cnn_bytes(cfg, batch_size, num_classes)
    if isinstance(cfg, BackboneConfig):
        height, width = cfg.image_size
        return Estimate(None, batch_size * height * width * BACKBONE_BYTES_PER_PIXEL)
    return None


def _cnn_bytes(cfg: CNNConfig, batch_size: int, num_classes: int) -> Estimate:
    """float32 weights with their gradient and two optimizer slots (Adam's), and each batch's
    activations kept for the backward pass, with their gradients (models/cnn.py's layers)."""
    height, width = cfg.image_size
    params, channels = 0, 3
    activations = 2 * height * width * channels  # the input, and rescaled
    for n in cfg.filters:  # 3x3 conv (same padding) + 2x2 max pooling
        params += 9 * channels * n + n
        activations += height * width * n
        height, width, channels = height // 2, width // 2, n
        activations += height * width * n
    flat = height * width * channels
    params += flat * cfg.dense_units + cfg.dense_units
    params += cfg.dense_units * num_classes + num_classes
    activations += flat + cfg.dense_units + num_classes
    return Estimate(params, 4 * (4 * params + 2 * batch_size * activations))


def check_memory(cfg: ModelConfig, batch_size: int) -> None:
    """Refuse a model whose training cannot fit this machine's memory, before anything is built.

    The estimate is taken with the fewest classes there can be, so it is a lower bound known
    before the data is scanned.

    Raises:
        UserError: the estimate exceeds the memory (hardware.memory_bytes), in one line naming the
            size and model.image_size.
    """
    estimate = training_bytes(cfg, batch_size, num_classes=2)
    if estimate is None:
        return
    total = hardware.memory_bytes()
    if estimate.bytes > total:
        params = "" if estimate.params is None else f"{estimate.params:,} parameters, "
        raise UserError(
            f"model {cfg.name} at model.image_size={list(cfg.image_size)} needs at least "
            f"{estimate.bytes / 1e9:.1f} GB to train ({params}batches of {batch_size}), "
            f"more than this machine's {total / 1e9:.1f} GB: lower model.image_size (or batch_size)"
        )
