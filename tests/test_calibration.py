"""Calibration: ECE, Brier score and NLL against direct computations; a fitted temperature that
lowers an overconfident model's ECE; a run with calibrate=temperature that logs both and whose
logged model (pyfunc, SavedModel, TFLite, predict, evaluate) gives the calibrated probabilities."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from insect_exp import calibration
from tests.conftest import make_image_folder, run_cli


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _fixed_logits(n: int = 300, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose top probabilities spread over most of the 15 bins, right most of the time."""
    rng = np.random.default_rng(7)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(0, 1.5, (n, classes))
    logits[np.arange(n), labels] += rng.uniform(0, 2.5, n)
    return logits, labels


def _overconfident(n: int, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits right 70% of the time, each with a top probability of 0.99."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    wrong = rng.random(n) >= 0.7
    predicted = np.where(wrong, (labels + rng.integers(1, classes, n)) % classes, labels)
    logits = np.zeros((n, classes))
    # softmax puts 0.99 on the top class when its logit is log(0.99 (classes - 1) / 0.01).
    logits[np.arange(n), predicted] = np.log(0.99 * (classes - 1) / 0.01)
    return logits, labels


def test_ece_and_brier_equal_a_direct_computation():
    # Given fixed logits and labels
    logits, labels = _fixed_logits()

    # When the calibration scores are computed
    found = calibration.scores(logits, labels)

    # Then they are what the definitions give, computed plainly here
    probs = _softmax(logits)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    ece = 0.0
    for b in range(15):
        inside = (confidence > b / 15) & (confidence <= (b + 1) / 15)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    brier = np.mean(np.sum((probs - np.eye(4)[labels]) ** 2, axis=1))
    assert len(np.unique(np.ceil(confidence * 15))) >= 8  # many bins take part
    assert found["ece"] == pytest.approx(ece, abs=1e-12)
    assert found["brier"] == pytest.approx(brier, abs=1e-12)
    # And a known answer: ten images at 0.9, seven right, are 0.2 overconfident
    assert calibration.expected_calibration_error(
        np.full(10, 0.9), np.arange(10) < 7
    ) == pytest.approx(0.2)


def test_nll_is_the_mean_negative_log_softmax_and_temperature_divides_the_logits():
    logits, labels = _fixed_logits()

    found = calibration.scores(logits, labels)
    at_two = calibration.scores(logits, labels, temperature=2.0)

    nll = -np.mean(np.log(_softmax(logits)[np.arange(len(labels)), labels]))
    assert found["nll"] == pytest.approx(nll, abs=1e-12)
    assert at_two == pytest.approx(calibration.scores(logits / 2.0, labels), abs=1e-12)


def test_a_fitted_temperature_lowers_an_overconfident_models_ece():
    # Given an overconfident model's validation and test logits (0.99 confident, 70% right)
    val_logits, val_labels = _overconfident(2000, seed=0)
    test_logits, test_labels = _overconfident(2000, seed=1)

    # When a temperature is fitted on the validation logits
    temperature = calibration.fit_temperature(val_logits, val_labels)

    # Then it softens them, and the test ECE falls from about 0.29 to near 0; accuracy stays
    before = calibration.scores(test_logits, test_labels)["ece"]
    after = calibration.scores(test_logits, test_labels, temperature)["ece"]
    assert temperature > 1.5
    assert before == pytest.approx(0.29, abs=0.03)
    assert after < 0.05
    softened = calibration.log_probabilities(test_logits, temperature)
    assert (softened.argmax(axis=1) == test_logits.argmax(axis=1)).all()


def test_a_temperature_stays_in_its_bounds_when_every_image_is_right():
    logits = np.array([[10.0, 0.0], [0.0, 10.0]] * 20)
    labels = np.array([0, 1] * 20)

    temperature = calibration.fit_temperature(logits, labels)

    # sharpening lowers the NLL towards 0 without end: the bound stops it
    assert calibration.LOWEST_TEMPERATURE <= temperature < 1


# -- a calibrated run, end to end --------------------------------------------------------------


def _logged_model_files(uri: str, model_id: str, dest: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(uri)
    return Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(dest)))


def _tflite_probabilities(path: Path, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=str(path))
    (given,), (taken,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(given["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(given["index"], images)
    interpreter.invoke()
    return interpreter.get_tensor(taken["index"])


def _saved_model(model_dir: Path, images: np.ndarray) -> tuple[float, np.ndarray]:
    """The SavedModel's temperature variable, and its `probabilities` signature's output."""
    import tensorflow as tf

    module = tf.saved_model.load(str(model_dir / "artifacts" / "saved_model"))
    (probs,) = module.signatures["probabilities"](images=tf.constant(images)).values()
    return float(module.temperature.numpy()), probs.numpy()


def _served(model_dir: Path, files: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pyfunc's probabilities for the files (as a client sends them), and its raw logits and
    its SavedModel's own decoded images (float32) of the same files."""
    import mlflow
    import pandas as pd
    import tensorflow as tf

    pyfunc = mlflow.pyfunc.load_model(str(model_dir))
    encoded = [path.read_bytes() for path in files]
    table = pyfunc.predict(pd.DataFrame({"image": encoded}))
    classifier = pyfunc.unwrap_python_model()
    probs = np.array(
        [[row[name] for name in classifier.class_names] for row in table.probabilities]
    )
    images = np.stack([classifier.decode(tf.constant(b)).numpy() for b in encoded]).astype("f4")
    return probs, np.asarray(pyfunc.predict(images)), images


def test_a_calibrated_run_logs_its_temperature_and_every_output_is_calibrated(tmp_path):
    # Given a run trained with calibrate=temperature, validation held out of train
    from mlflow.tracking import MlflowClient

    import insect_exp

    folder = make_image_folder(tmp_path / "insects", train_per_class=10, test_per_class=4)
    (tmp_path / "mlruns").mkdir()
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    done = run_cli(
        "dataset=insects", f"dataset.root={folder}", "dataset.val_split=0.3", "epochs=2",
        "calibrate=temperature", "export.tflite=true", "batch_size=4", "model.image_size=[16,16]",
        f"mlflow.tracking_uri={uri}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    # Then the run logs the temperature, calibration before and after, and the reliability plot
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("insect_exp").experiment_id])
    metrics = run.data.metrics
    for key in ("val_ece", "test_ece", "test_brier", "test_nll"):
        assert 0 <= metrics[key] < 2 and 0 <= metrics[f"{key}_uncalibrated"] < 2, key
    assert metrics["val_nll"] <= metrics["val_nll_uncalibrated"] + 1e-9  # what T minimises
    temperature = metrics["temperature"]
    assert abs(np.log(temperature)) > 0.05, temperature  # far enough from 1 to tell apart
    assert "reliability.png" in {
        a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "plots")
    }

    # And the logged model's probabilities, by every way out of it, are softmax(logits / T)
    (model,) = client.search_logged_models([run.info.experiment_id])
    model_dir = _logged_model_files(uri, model.model_id, tmp_path / "model")
    files = sorted((folder / "test").rglob("*.jpg"))[:5]
    served, logits, images = _served(model_dir, files)
    expected = _softmax(logits / temperature)
    np.testing.assert_allclose(served, expected, atol=1e-6)
    assert not np.allclose(served, _softmax(logits), atol=1e-3)  # not the raw softmax
    stored, signature = _saved_model(model_dir, images)
    assert stored == pytest.approx(temperature, rel=1e-6)
    np.testing.assert_allclose(signature, expected, atol=1e-5)
    tflite = _tflite_probabilities(model_dir / "artifacts" / "model.tflite", images)
    np.testing.assert_allclose(tflite, expected, atol=1e-5)
    predicted = insect_exp.predict(f"models:/{model.model_id}", files, top_k=1, tracking_uri=uri)
    np.testing.assert_allclose(predicted["probability"], expected.max(axis=1), atol=1e-5)

    # And evaluating the model on the same test folder reports the run's calibrated scores
    evaluated = insect_exp.evaluate(f"models:/{model.model_id}", folder, mlflow__tracking_uri=uri)
    for key in ("test_ece", "test_brier", "test_nll", "test_ece_uncalibrated"):
        assert evaluated.metrics[key] == pytest.approx(metrics[key], abs=1e-4), key
