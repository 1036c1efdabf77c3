"""The dtype policy a run trains in. `precision=auto` picks mixed_bfloat16 where the device
computes bf16 natively (a CPU with AVX512-BF16 or AMX, NVIDIA GPUs of compute capability 8.0 and
up) and a few training steps of the real model in both precisions agree; float32 elsewhere.

What the device offers is read by `device_features` alone, from /proc/cpuinfo and TensorFlow's
GPU details, or from $INSECT_EXP_DEVICE_FEATURES (JSON: `{"cpu_flags": ["amx_bf16"],
"gpu_compute_capabilities": ["8.0"]}`), which stands in for the machine in tests and lets a user
override a wrong detection.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from insect_exp.errors import first_line

if TYPE_CHECKING:
    import numpy as np
    import tf_keras as keras

log = logging.getLogger(__name__)

ENV = "INSECT_EXP_DEVICE_FEATURES"
BF16 = "mixed_bfloat16"
FLOAT32 = "float32"
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MIN_GPU_CAPABILITY = (8, 0)  # Ampere: the first NVIDIA GPUs with bf16 tensor cores
CHECK_STEPS = 3
# TFLite's kernels compute in float32 (or quantized ints), not in a training policy's bf16/float16.
TFLITE_NEEDS_FLOAT32 = "export.tflite wants a float32 model"


@dataclass(frozen=True)
class DeviceFeatures:
    """What decides bf16 support: the CPU's flags and each visible GPU's compute capability."""

    cpu_flags: frozenset[str]
    gpu_capabilities: tuple[tuple[int, int], ...] = ()


def native_bf16(features: DeviceFeatures) -> tuple[bool, str]:
    """Whether the device that trains (the GPUs if any, else the CPU) computes bf16 natively,
    and why, in words."""
    gpus = features.gpu_capabilities
    if gpus:
        named = ", ".join(f"{major}.{minor}" for major, minor in gpus)
        least = "{}.{}".format(*MIN_GPU_CAPABILITY)
        if all(c >= MIN_GPU_CAPABILITY for c in gpus):
            return True, f"GPU compute capability {named} (bf16 from {least})"
        return False, f"GPU compute capability {named} is below {least}"
    found = [flag for flag in CPU_BF16_FLAGS if flag in features.cpu_flags]
    if found:
        return True, f"CPU flags {', '.join(found)}"
    return False, f"no GPU and the CPU lacks {' and '.join(CPU_BF16_FLAGS)}"


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of /proc/cpuinfo's text (x86's `flags`, ARM's `Features`)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def device_features() -> DeviceFeatures:
    """This machine's features, or those $INSECT_EXP_DEVICE_FEATURES gives. Imports TensorFlow
    unless the variable is set.

    Raises:
        UserError: the variable is not the JSON object described in the module docstring.
    """
    given = os.environ.get(ENV)
    if given:
        return _parse(given)
    import tensorflow as tf

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so float32
        text = ""
    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capabilities.append(tuple(details.get("compute_capability") or (0, 0)))
    return DeviceFeatures(cpu_flags(text), tuple(capabilities))


def _parse(given: str) -> DeviceFeatures:
    from insect_exp import UserError

    try:
        value = json.loads(given)
        flags = frozenset(str(f) for f in value.get("cpu_flags", []))
        gpus = tuple(
            (int(major), int(minor))
            for major, minor in (
                str(c).split(".") for c in value.get("gpu_compute_capabilities", [])
            )
        )
    except (ValueError, AttributeError, TypeError) as err:
        raise UserError(
            f"${ENV}: {err}; expected JSON such as "
            '{"cpu_flags": ["amx_bf16"], "gpu_compute_capabilities": ["8.0"]}'
        ) from None
    return DeviceFeatures(flags, gpus)


def losses_agree(
    bf16: Sequence[float], float32: Sequence[float], tolerance: float
) -> tuple[bool, str]:
    """Whether every step's bf16 loss differs from float32's by less than `tolerance` times it,
    and, where not, the first step that does not, in words."""
    for step, (low, full) in enumerate(zip(bf16, float32, strict=True)):
        gap = abs(low - full)
        if not (math.isfinite(low) and gap < tolerance * abs(full)):
            return False, (
                f"step {step + 1}'s loss is {low:.6g} in bf16 against {full:.6g} in float32 "
                f"(tolerance {tolerance:g} of it)"
            )
    return True, f"{len(bf16)} training steps agree with float32 within {tolerance:g}"


@dataclass(frozen=True)
class Check:
    """The model and optimizer a check trains, and the images it trains them on."""

    build: Callable[[], keras.Model]
    optimizer: Callable[[], keras.optimizers.Optimizer]
    images: np.ndarray
    labels: np.ndarray
    tolerance: float


@dataclass(frozen=True)
class Choice:
    """The Keras policy precision=auto trains in, the line saying why, and whether bf16 was
    native but its check failed (a warning, not the usual float32 of a device without bf16)."""

    policy: str
    line: str
    fell_back: bool = False


def choose(features: DeviceFeatures, check: Check, tflite: bool = False) -> Choice:
    """precision=auto's choice: bf16 where it is native and the check's losses agree, unless the
    run exports a TFLite model (`tflite`), which needs float32."""
    native, why = native_bf16(features)
    if not native:
        return Choice(FLOAT32, f"precision=auto: float32 ({why})")
    if tflite:
        return Choice(
            FLOAT32,
            f"precision=auto: float32, although bf16 is native ({why}): {TFLITE_NEEDS_FLOAT32}",
        )
    try:
        agree, how = losses_agree(*train_in_both(check), check.tolerance)
    except Bf16StepsFailed as err:
        agree, how = False, str(err)
    if not agree:
        return Choice(
            FLOAT32, f"precision=auto: float32, although bf16 is native ({why}): {how}", True
        )
    return Choice(BF16, f"precision=auto: {BF16} ({why}; {how})")


class Bf16StepsFailed(Exception):
    """The check's bf16 steps raised (a layer without a bf16 kernel on this device)."""


def train_in_both(check: Check) -> tuple[list[float], list[float]]:
    """The losses of CHECK_STEPS training steps from the same weights, in bf16 and in float32.

    Inference mode (training=False) in the steps: augmentation and dropout would draw differently
    in the two models. Leaves the global policy at float32.

    Raises:
        Bf16StepsFailed: TensorFlow could not run the bf16 steps (e.g. oneDNN refusing a bf16
            convolution); the float32 steps' errors are raised as they are.
    """
    import tensorflow as tf
    import tf_keras as keras

    keras.mixed_precision.set_global_policy(FLOAT32)
    reference = check.build()
    keras.mixed_precision.set_global_policy(BF16)
    try:
        candidate = check.build()
    finally:
        keras.mixed_precision.set_global_policy(FLOAT32)
    candidate.set_weights(reference.get_weights())
    try:
        low = _steps(candidate, check)
    except tf.errors.OpError as err:
        raise Bf16StepsFailed(
            f"its bf16 steps failed ({type(err).__name__}: {first_line(err)})"
        ) from None
    return low, _steps(reference, check)


def _steps(model: keras.Model, check: Check) -> list[float]:
    import numpy as np
    import tensorflow as tf
    import tf_keras as keras

    optimizer = check.optimizer()
    batches = np.array_split(np.arange(len(check.labels)), CHECK_STEPS)
    losses = []
    for index in (b for b in batches if len(b)):
        images = tf.constant(check.images[index], tf.float32)
        with tf.GradientTape() as tape:
            logits = tf.cast(model(images, training=False), tf.float32)
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(
                    check.labels[index], logits, from_logits=True
                )
            )
        variables = model.trainable_variables
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(
            (g, v) for g, v in zip(grads, variables, strict=True) if g is not None
        )
        losses.append(float(loss))
    return losses
