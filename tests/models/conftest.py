"""Tiny SavedModels with the TF Hub interface, exported once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

import insect_exp  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

TINY_FEATURES = 8
TINY_IMAGENET_LABELS = ("background", "ant", "bee", "moth", "wasp")


def export_tiny(out_dir: Path, outputs: int, seed: int = 0) -> Path:
    """Conv + BatchNorm + pooling + Dense: a hub-style model for any image size in [0, 1]."""
    import tf_keras as keras

    from insect_exp.models.export_untrained import save_hub_module

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input(shape=(None, None, 3)),
            keras.layers.Conv2D(6, 3, strides=2, activation="relu", name="conv"),
            # Moving statistics that must stay put: the backbone always runs in inference mode.
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(outputs, name="top"),
        ]
    )
    return save_hub_module(model, out_dir)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A feature-vector SavedModel: images -> 8 features."""
    return export_tiny(tmp_path_factory.mktemp("hub") / "feature_vector", TINY_FEATURES)


@pytest.fixture(scope="session")
def other_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture with other random weights."""
    return export_tiny(tmp_path_factory.mktemp("hub") / "other", TINY_FEATURES, seed=1)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 5-class "ImageNet" classifier SavedModel and its labels file."""
    root = tmp_path_factory.mktemp("hub")
    labels = root / "labels.txt"
    labels.write_text("\n".join(TINY_IMAGENET_LABELS) + "\n")
    return export_tiny(root / "classifier", len(TINY_IMAGENET_LABELS)), labels


@pytest.fixture(scope="session")
def untrained_mobilenet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The documented export command's output (MobileNetV2, random weights): slow tests only."""
    from insect_exp.models.export_untrained import main

    out = tmp_path_factory.mktemp("untrained")
    main([str(out)])
    return {
        "feature_vector": out / "feature_vector",
        "classifier": out / "classifier",
        "labels": out / "labels.txt",
    }
