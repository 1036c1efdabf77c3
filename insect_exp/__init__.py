"""insect_exp: configuration-driven image-classification experiments.

Hydra composes the config, tf.data + Keras 2 (tf_keras) train the model, MLflow records the run.
"""

import os

# hub.KerasLayer only works inside Keras 2 models; TensorFlow reads this flag on first import,
# so it must be set before anything in the process imports TensorFlow.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ start-up lines (CUDA probing on a machine without a GPU, oneDNN notices) drown
# the training log: TF_CPP_MIN_LOG_LEVEL defaults to 3 without an NVIDIA GPU, 1 with one, and the
# lines TensorFlow prints before it reads the variable are filtered by it
# (insect_exp/quiet_startup.py).
# Set TF_CPP_MIN_LOG_LEVEL=0 to see them all.
# Standard library only: no TensorFlow here.
from insect_exp import quiet_startup as _quiet_startup  # noqa: E402

_quiet_startup.quiet_tensorflow_startup()
# Runs here must work offline and stay reproducible; MLflow's usage telemetry would otherwise try
# the network at start and exit. Set MLFLOW_DISABLE_TELEMETRY=false to send it anyway.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__version__ = "0.1.0"


class UserError(Exception):
    """Bad input the user can fix (data folder, handle, config); the CLI prints only its message."""


# The Python API (insect_exp/api.py) loads on first use: `import insect_exp` stays light (no
# TensorFlow, MLflow or Hydra) for the command line and for notebooks alike. train, sweep, predict
# and evaluate are the job modules, callable as the API's functions (insect_exp/commands.py).
_COMMANDS = ("train", "sweep", "predict", "evaluate")
_RESULTS = ("TrainResult", "SweepResult", "EvaluateResult")
__all__ = ["UserError", "__version__", *_COMMANDS, *_RESULTS]


def __getattr__(name: str):
    """insect_exp.train, .sweep, .predict, .evaluate and their result classes (insect_exp.api)."""
    import importlib

    if name in _COMMANDS:
        return importlib.import_module(f"insect_exp.{name}")
    if name in _RESULTS:
        return getattr(importlib.import_module("insect_exp.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
