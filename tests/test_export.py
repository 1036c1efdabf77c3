"""export.tflite=true: model.tflite and labels.txt beside the SavedModel, checked in TFLite's
interpreter against the SavedModel on real images."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.lifecycle import Trained, train_run


def _model_files(trained: Trained, tmp: Path) -> Path:
    """The logged model's artifacts/ folder (the SavedModel, class names, labels, TFLite)."""
    import mlflow

    mlflow.set_tracking_uri(trained.tracking_uri)  # models:/ resolve in the registry's store
    local = mlflow.artifacts.download_artifacts(f"models:/{trained.model_id}", dst_path=str(tmp))
    return Path(local) / "artifacts"


def _images(folder: Path, image_size: tuple[int, int]) -> np.ndarray:
    """Every image under `folder`, decoded and resized as training does (float32 0..255)."""
    from insect_exp.data.pipeline import decode_files
    from insect_exp.data.scan import FileList

    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    split, failed = decode_files(FileList(paths, [0] * len(paths)), image_size)
    assert not failed
    return split.images.astype(np.float32)


def _tflite_probabilities(path: Path, images: np.ndarray) -> np.ndarray:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # TensorFlow's own, deprecated in favour of LiteRT
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = Interpreter(model_path=str(path))
    (given,), (taken,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(given["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(given["index"], images)
    interpreter.invoke()
    return interpreter.get_tensor(taken["index"])


def _savedmodel_probabilities(files: Path, images: np.ndarray) -> np.ndarray:
    from insect_exp.serving import ImageClassifier, softmax

    classifier = ImageClassifier()
    classifier.load(files / "saved_model", files / "class_names.json")
    return softmax(classifier.logits(images))


def _check_parity(trained: Trained, tmp: Path, size: tuple[int, int], atol: float) -> Path:
    files = _model_files(trained, tmp)
    assert (files / "labels.txt").read_text().splitlines() == trained.class_names
    images = _images(trained.folder, size)
    expected = _savedmodel_probabilities(files, images)
    found = _tflite_probabilities(files / "model.tflite", images)
    assert found.shape == expected.shape == (len(images), len(trained.class_names))
    same = (found.argmax(axis=1) == expected.argmax(axis=1)).mean()
    assert same >= 0.99, same
    np.testing.assert_allclose(found, expected, atol=atol)
    return files / "model.tflite"


def test_cnn_float_and_dynamic_range_tflite_match_the_savedmodel(tmp_path):
    # Given the reference CNN trained with export.tflite=true, and once more quantized
    plain = train_run(tmp_path / "float", "export.tflite=true", test_per_class=40)
    quantized = train_run(tmp_path / "dynamic", "export.quantize=dynamic", test_per_class=40)

    # When each .tflite runs in TFLite's interpreter on the 138 images, beside the SavedModel
    # Then the top-1 labels agree on at least 99% of them; float probabilities within 1e-3
    float_file = _check_parity(plain, tmp_path / "m1", (32, 32), atol=1e-3)
    dynamic_file = _check_parity(quantized, tmp_path / "m2", (32, 32), atol=0.05)
    # int8 weights: the CNN's dense layer dominates, so about 4x smaller
    assert dynamic_file.stat().st_size < float_file.stat().st_size / 3


def test_hub_model_tflite_matches_the_savedmodel(tmp_path):
    # Given a hub-style backbone (a tiny SavedModel) trained with export.tflite=true
    from tests.models.conftest import export_tiny

    handle = export_tiny(tmp_path / "hub" / "feature_vector", 8)
    trained = train_run(
        tmp_path / "run", "model=hub_mobilenet", f"model.handle={handle}", "export.tflite=true",
        test_per_class=30,
    )  # fmt: skip

    # Then its TFLite model agrees with its SavedModel
    _check_parity(trained, tmp_path / "m", (32, 32), atol=1e-3)


@pytest.mark.slow
def test_mobilenet_v2_tflite_matches_the_savedmodel(tmp_path):
    # Given the real MobileNetV2 architecture (untrained, offline) at 224x224
    from insect_exp.models.export_untrained import main

    main([str(tmp_path / "hub")])
    handle = tmp_path / "hub" / "feature_vector"
    trained = train_run(
        tmp_path / "run", "model=hub_mobilenet", f"model.handle={handle}",
        "model.image_size=[224,224]", "export.tflite=true",
    )  # fmt: skip

    # Then its 9 MB TFLite model agrees with its SavedModel
    tflite = _check_parity(trained, tmp_path / "m", (224, 224), atol=1e-3)
    assert tflite.stat().st_size > 5e6


def test_export_and_registry_keys_are_checked_at_start_up(tmp_path):
    from insect_exp.config import ConfigError, Quantize
    from tests.conftest import compose_config

    cfg = compose_config("export.quantize=dynamic", launch_dir=tmp_path)
    assert cfg.export.quantize is Quantize.dynamic and cfg.export.wanted  # dynamic implies tflite
    assert not compose_config(launch_dir=tmp_path).export.wanted
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="export.quantize=int8"):
        compose_config("export.quantize=int8", launch_dir=tmp_path)  # Hydra checks the enum
    with pytest.raises(ConfigError, match="mlflow.registered_model_name"):
        compose_config("mlflow.registered_model_name=a/b", launch_dir=tmp_path)


def test_export_names_the_models_files_and_input_column_as_the_served_model_reads_them():
    # export.py repeats serving.py's names (importing serving.py would import MLflow)
    from insect_exp import export, serving

    assert (export.IMAGE_COLUMN, export.SAVED_MODEL, export.CLASS_NAMES) == (
        serving.IMAGE_COLUMN, serving.SAVED_MODEL, serving.CLASS_NAMES,
    )  # fmt: skip
