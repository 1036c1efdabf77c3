"""precision=auto: bf16 only where the CPU or GPU computes it natively and a short check agrees."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from insect_exp import UserError, precision, train
from insect_exp.config import Precision
from insect_exp.precision import DeviceFeatures, cpu_flags, losses_agree, native_bf16
from tests.conftest import make_image_folder, run_cli

SAPPHIRE_RAPIDS = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
EPYC_ZEN2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n"


@pytest.mark.parametrize(
    ("cpuinfo", "gpus", "native"),
    [
        (EPYC_ZEN2, (), False),
        (SAPPHIRE_RAPIDS, (), True),
        ("flags\t: avx512f avx512_bf16\n", (), True),
        (EPYC_ZEN2, ((8, 0),), True),  # A100
        (EPYC_ZEN2, ((9, 0), (8, 6)), True),
        (SAPPHIRE_RAPIDS, ((7, 0),), False),  # V100 trains, not the CPU
        (EPYC_ZEN2, ((8, 0), (7, 5)), False),  # a mirrored run is as fast as its slowest GPU
    ],
)
def test_bf16_is_native_only_where_the_cpu_flags_or_the_gpus_say_so(cpuinfo, gpus, native):
    # Given a machine's /proc/cpuinfo and its GPUs' compute capabilities
    features = DeviceFeatures(cpu_flags(cpuinfo), gpus)

    # When asked whether it computes bf16 natively
    found, why = native_bf16(features)

    # Then only AVX512-BF16/AMX (without a GPU) or GPUs of 8.0 and up say yes, with the reason
    assert found is native
    assert why


def test_losses_agree_within_the_tolerance_and_never_at_zero():
    float32 = [1.10, 1.05, 0.98]
    assert losses_agree([1.101, 1.049, 0.981], float32, 0.01)[0]
    agree, why = losses_agree([1.101, 1.2, 0.981], float32, 0.01)
    assert not agree and why.startswith("step 2's loss is 1.2 in bf16 against 1.05 in float32")
    assert not losses_agree([1.101, 1.049, 0.981], float32, 0.0)[0]
    assert not losses_agree([float("nan")] * 3, float32, 0.5)[0]


def test_bf16_steps_that_tensorflow_cannot_run_fall_back_to_float32_saying_why():
    # Given a device that says it computes bf16 natively, and a model with a layer that has no
    # bf16 kernel there (as oneDNN refuses a bf16 convolution: an OpError)
    import numpy as np
    import tensorflow as tf
    import tf_keras as keras

    class NoBf16Kernel(keras.layers.Layer):
        def call(self, inputs):
            if inputs.dtype == tf.bfloat16 and tf.executing_eagerly():  # run, not built
                raise tf.errors.AbortedError(None, None, "could not create a primitive descriptor")
            return inputs

    def build():
        return keras.Sequential(
            [keras.Input((4, 4, 3)), NoBf16Kernel(), keras.layers.Flatten(), keras.layers.Dense(2)]
        )

    check = precision.Check(
        build=build,
        optimizer=lambda: keras.optimizers.SGD(0.01),
        images=np.random.default_rng(0).random((6, 4, 4, 3), dtype=np.float32),
        labels=np.array([0, 1] * 3),
        tolerance=0.05,
    )

    # When precision=auto chooses
    choice = precision.choose(DeviceFeatures(frozenset({"amx_bf16"}), ()), check)

    # Then it trains in float32 and says that bf16 was native but its steps failed, and where
    assert choice.policy == "float32" and choice.fell_back
    assert "although bf16 is native (CPU flags amx_bf16)" in choice.line
    assert "its bf16 steps failed (AbortedError: " in choice.line
    assert "no_bf16_kernel" in choice.line
    assert keras.mixed_precision.global_policy().name == "float32"


def test_the_device_features_variable_stands_in_for_the_machine(monkeypatch):
    given = {"cpu_flags": ["amx_bf16"], "gpu_compute_capabilities": ["8.6"]}
    monkeypatch.setenv(precision.ENV, json.dumps(given))
    assert precision.device_features() == DeviceFeatures(frozenset({"amx_bf16"}), ((8, 6),))
    monkeypatch.setenv(precision.ENV, "amx_bf16")
    with pytest.raises(UserError, match=r"INSECT_EXP_DEVICE_FEATURES: .* expected JSON"):
        precision.device_features()


@pytest.mark.parametrize(
    ("features", "tflite", "used"),
    [
        ({"gpu_compute_capabilities": ["8.0"]}, "false", "mixed_bfloat16"),
        ({"cpu_flags": ["avx2"]}, "false", "float32"),
        ({"gpu_compute_capabilities": ["8.0"]}, "true", "float32"),  # TFLite needs float32
    ],
)
def test_an_auto_run_trains_in_bf16_where_native(compose_cfg, monkeypatch, features, tflite, used):
    # Given a device that computes bf16 natively (an A100, faked) or does not (AVX2 only), and a
    # run that exports a TFLite model or not
    monkeypatch.setenv(precision.ENV, json.dumps(features))
    cfg = compose_cfg("model.image_size=[16,16]", f"export.tflite={tflite}")
    assert cfg.precision is Precision.auto

    # When a run trains with the default precision
    train.run(cfg)

    # Then it trained in the precision the device affords, the check agreeing on the real
    # model, and logs it beside the configured one
    run = _only_run(cfg.mlflow.tracking_uri)
    assert run.data.params["precision"] == "auto"
    assert run.data.params["precision_used"] == used
    assert run.info.status == "FINISHED"


def test_a_failed_check_falls_back_to_float32_saying_why_in_one_line(tmp_path):
    # Given a GPU that computes bf16 natively (faked), and a check that no bf16 loss can pass
    folder = make_image_folder(tmp_path / "insects")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {precision.ENV: json.dumps({"gpu_compute_capabilities": ["9.0"]})}

    # When a run trains with precision=auto
    done = run_cli(
        "dataset=insects", f"dataset.root={folder}", "epochs=1", "batch_size=4",
        "model.image_size=[16,16]", f"mlflow.tracking_uri={uri}", "precision_tolerance=0",
        cwd=tmp_path, env=env,
    )  # fmt: skip

    # Then it trains in float32, and one line says why
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr  # Hydra's log goes to the console's stdout
    lines = [line for line in output.splitlines() if "precision=auto" in line]
    assert len(lines) == 1, output[-3000:]
    assert "float32, although bf16 is native (GPU compute capability 9.0" in lines[0]
    assert "step 1's loss is" in lines[0] and "(tolerance 0 of it)" in lines[0]
    assert _only_run(uri).data.params["precision_used"] == "float32"


def _only_run(uri: str):
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "insect_exp"]
    (run,) = client.search_runs([experiment.experiment_id])
    return run
