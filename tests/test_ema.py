"""train.ema: the average is the closed-form EMA of the weights trained, swaps are exact, fit
validates, checkpoints and ends with the averages, and a resumed average goes on unchanged."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from mlflow.tracking import MlflowClient

from insect_exp import resilience
from insect_exp.callbacks import scores
from insect_exp.config import AdamConfig, EarlyStoppingConfig, EmaConfig, Monitor
from insect_exp.data.pipeline import ImageSplit
from insect_exp.ema import WeightAverage, warn_if_short
from insect_exp.fit import FitSettings, compile_classifier, fit, make_optimizer, predict_logits
from tests.conftest import run_cli

SIZE = 8


def tiny_split(count: int, seed: int) -> ImageSplit:
    """8x8 images of two classes, class 1 brighter (learnable)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count, dtype=np.int32) % 2
    images = rng.integers(0, 128, (count, SIZE, SIZE, 3), dtype=np.uint8)
    images[labels == 1] += 127
    return ImageSplit(images, labels, [f"img_{i}.png" for i in range(count)])


def tiny_model(learning_rate: float = 0.05) -> keras.Model:
    """Rescaling + Flatten + Dense, compiled with Adam; the same weights on every call."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            keras.layers.Rescaling(1.0 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    compile_classifier(model, make_optimizer(AdamConfig(learning_rate=learning_rate)))
    return model


def settings(epochs: int, decay: float = 0.6, **kwargs) -> FitSettings:
    return FitSettings(
        epochs=epochs,
        batch_size=4,
        seed=0,
        optimizer=AdamConfig(learning_rate=0.05),
        ema=EmaConfig(enabled=True, decay=decay),
        **kwargs,
    )


def train_steps(model: keras.Model, average: WeightAverage, steps: int) -> list[list[np.ndarray]]:
    """Train `steps` batches, stepping the average after each; the raw weights before and after
    every step."""
    split = tiny_split(4 * steps, seed=1)
    seen = [[w.numpy() for w in model.trainable_weights]]
    for step in range(steps):
        batch = slice(4 * step, 4 * step + 4)
        model.train_on_batch(split.images[batch], split.labels[batch])
        average.update()
        seen.append([w.numpy() for w in model.trainable_weights])
    return seen


def closed_form(raw: list[list[np.ndarray]], decay: float) -> list[np.ndarray]:
    """a_N = d^N w_0 + sum_k (1 - d) d^(N - k) w_k: the EMA of w_1..w_N started at w_0."""
    n = len(raw) - 1
    coefficients = [decay**n] + [(1 - decay) * decay ** (n - k) for k in range(1, n + 1)]
    return [
        sum(c * w[i] for c, w in zip(coefficients, raw, strict=True)) for i in range(len(raw[0]))
    ]


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9])
def test_after_n_steps_the_average_is_the_closed_form_ema_of_the_raw_weights(decay):
    # Given a model whose weights are averaged from the start
    model = tiny_model()
    average = WeightAverage(model, decay)

    # When it trains 6 batches
    raw = train_steps(model, average, steps=6)

    # Then the averages are the closed-form EMA of the weights after each step (decay 0: the
    # raw weights themselves), and differ from the raw weights otherwise
    for got, expected in zip(average.averages(), closed_form(raw, decay), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    for got, last in zip(average.averages(), raw[-1], strict=True):
        assert np.allclose(got, last, atol=1e-6) == (decay == 0.0)


def test_swapping_the_averages_in_and_out_is_exact():
    # Given a model trained a few steps with an average whose values differ from its weights
    model = tiny_model()
    average = WeightAverage(model, 0.5)
    raw = train_steps(model, average, steps=3)[-1]

    # When the averages are swapped in, twice, then out
    average.swap_in()
    average.swap_in()
    lent = [w.numpy() for w in model.trainable_weights]
    average.swap_out()

    # Then the model held exactly the averages, and holds exactly its raw weights again
    for got, expected in zip(lent, average.averages(), strict=True):
        np.testing.assert_array_equal(got, expected)
    for got, expected in zip(model.trainable_weights, raw, strict=True):
        np.testing.assert_array_equal(got.numpy(), expected)


def read(path: str, key: str) -> np.ndarray:
    """A variable of a checkpoint, by its path in the checkpoint's object graph."""
    return tf.train.load_checkpoint(path).get_tensor(f"{key}/.ATTRIBUTES/VARIABLE_VALUE")


def test_fit_validates_both_checkpoints_both_and_ends_with_the_averages(tmp_path: Path):
    # Given a model trained 2 epochs with train.ema, its checkpoints kept
    model = tiny_model()
    val = tiny_split(8, seed=2)
    fitted = fit(
        model, tiny_split(16, 1), val, settings(2, checkpoint_dir=str(tmp_path)), verbose=0
    )

    # Then each epoch logs the raw weights' validation beside the averaged model's
    epochs = fitted.history.epochs
    assert len(epochs["val_loss_raw"]) == len(epochs["val_accuracy_raw"]) == 2
    assert epochs["val_loss_raw"] != epochs["val_loss"]
    # And the model ends with the averages: the last validation's scores are its scores
    logits = predict_logits(model, val, 4)
    np.testing.assert_allclose(fitted.val_logits, logits, rtol=1e-6)
    assert scores(logits, val.labels)["loss"] == pytest.approx(epochs["val_loss"][-1], rel=1e-5)
    # And the last checkpoint holds the averages as the model, the raw weights under ema
    state = resilience.read_state(tmp_path)
    kernel = model.trainable_weights[0].numpy()
    np.testing.assert_array_equal(read(state.path, "model/layer_with_weights-0/kernel"), kernel)
    assert not np.allclose(read(state.path, "ema/raw/0"), kernel, atol=1e-4)


def test_a_resumed_average_equals_an_uninterrupted_one(tmp_path: Path):
    # Given the same training for 3 epochs whole, and for 1 epoch then resumed from its
    # checkpoint into a fresh model
    train, val = tiny_split(16, 1), tiny_split(8, seed=2)
    whole = tiny_model()
    uninterrupted = fit(whole, train, val, settings(3), verbose=0).history.epochs
    fit(tiny_model(), train, val, settings(1, checkpoint_dir=str(tmp_path)), verbose=0)
    resumed_model = tiny_model()
    state = resilience.read_state(tmp_path)
    again = settings(3, checkpoint_dir=str(tmp_path), resume_from=state)
    resumed = fit(resumed_model, train, val, again, verbose=0).history.epochs

    # Then epochs 2 and 3 score the same, raw and averaged, and both end with the same averages
    for key in ("val_loss", "val_loss_raw"):
        assert resumed[key] == pytest.approx(uninterrupted[key][1:], abs=1e-6), key
    for got, expected in zip(resumed_model.get_weights(), whole.get_weights(), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_early_stopping_restores_the_best_epochs_averaged_weights(tmp_path: Path):
    # Given train.ema with early stopping on val_loss (patience 1, restore_best), on labels the
    # training split teaches the wrong way round, so that val_loss worsens every epoch
    train, val = tiny_split(16, 1), tiny_split(8, seed=2)
    val = ImageSplit(val.images, 1 - val.labels, val.paths)
    es = EarlyStoppingConfig(enabled=True, monitor=Monitor.val_loss, patience=1)
    model = tiny_model()
    fitted = fit(model, train, val, settings(6, early_stopping=es), verbose=0)

    # Then training stopped early and the model holds the best epoch's averaged weights: the
    # ones whose validation scored the best val_loss
    history = fitted.history
    assert history.stopped_epoch is not None and history.best_epoch == 0
    loss = scores(predict_logits(model, val, 4), val.labels)["loss"]
    assert loss == pytest.approx(min(history.epochs["val_loss"]), rel=1e-5)


def test_a_cli_run_logs_raw_and_averaged_validation_and_exports_the_averages(
    tmp_path: Path, image_folder: Path, tracking_uri: str
):
    # Given a 2-epoch CNN run with train.ema (a low decay, so the averages stay apart from the
    # raw weights), its checkpoints kept
    out = run_cli(
        "dataset=insects",
        f"dataset.root={image_folder}",
        "model.image_size=[16,16]",
        "batch_size=4",
        "epochs=2",
        "train.ema.enabled=true",
        "train.ema.decay=0.5",
        "train.keep_checkpoints=true",
        f"mlflow.tracking_uri={tracking_uri}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]

    # Then every epoch logs the averaged model's validation and the raw weights' beside it
    client = MlflowClient(tracking_uri)
    (found,) = client.search_runs(["1"])
    run_id = found.info.run_id
    for key in ("val_accuracy", "val_loss", "val_accuracy_raw", "val_loss_raw"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [0, 1], key
    assert found.data.params["train.ema.decay"] == "0.5"
    # And the logged model holds the last checkpoint's averaged weights, none of its raw ones
    state = resilience.read_state(found.data.tags["checkpoint_dir"])
    checkpoint = tf.train.load_checkpoint(state.path)
    names = checkpoint.get_variable_to_shape_map()
    averaged = [checkpoint.get_tensor(n) for n in names if n.startswith("ema/averages/")]
    raw = [checkpoint.get_tensor(n) for n in names if n.startswith("ema/raw/")]
    assert len(averaged) == len(raw) > 0
    (model,) = client.search_logged_models(["1"])
    mlflow.set_tracking_uri(tracking_uri)
    files = mlflow.artifacts.download_artifacts(f"models:/{model.model_id}", dst_path=tmp_path)
    saved = tf.train.load_checkpoint(f"{files}/artifacts/saved_model/variables/variables")
    exported = [saved.get_tensor(n) for n in saved.get_variable_to_shape_map() if "/" in n]

    def exported_has(array: np.ndarray) -> bool:
        return any(e.shape == array.shape and np.array_equal(e, array) for e in exported)

    assert all(exported_has(a) for a in averaged)
    assert not any(exported_has(r) for r in raw)


def test_a_decay_too_slow_for_the_steps_trained_is_told_in_one_warning(caplog):
    # When 300 steps are averaged at decay 0.999 (the start keeps 0.999**300 = 74%), and at 0.9
    with caplog.at_level("WARNING", logger="insect_exp.ema"):
        warn_if_short(0.999, 300)
        warn_if_short(0.9, 300)

    # Then one warning says so, with a decay that would average the trained weights
    (record,) = caplog.records
    assert "74%" in record.getMessage() and "about 0.990" in record.getMessage()
