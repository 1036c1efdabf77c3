"""insect_exp: configuration-driven image-classification experiments.

Hydra composes the config, tf.data + Keras 2 (tf_keras) train the model, MLflow records the run.
"""

import os

# hub.KerasLayer only works inside Keras 2 models; TensorFlow reads this flag on first import,
# so it must be set before anything in the process imports TensorFlow.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ INFO lines (oneDNN, CUDA probing) drown the training log on CPU machines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# Runs here must work offline and stay reproducible; MLflow's usage telemetry would otherwise try
# the network at start and exit. Set MLFLOW_DISABLE_TELEMETRY=false to send it anyway.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__version__ = "0.1.0"


class UserError(Exception):
    """Bad input the user can fix (data folder, handle, config); the CLI prints only its message."""
