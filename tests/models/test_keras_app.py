"""model=keras_app: any tf_keras.applications backbone by name, its weights, training, the run.

Backbones are built with random weights (no network here) at 32x32. MobileNetV3Small is the
config's small default; VGG16 stands in where the features must carry signal (randomly initialised
MobileNets and EfficientNets output features of about 1e-11, which would make comparisons of
trained heads trivially true) and where the application's preprocess_input must matter (VGG16's
flips RGB to BGR and subtracts the ImageNet mean).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from mlflow.tracking import MlflowClient

from insect_exp import UserError, train
from insect_exp.config import AdamConfig, FeatureCache, FineTuneConfig, KerasAppConfig
from insect_exp.data.pipeline import Data, load
from insect_exp.data.scan import scan
from insect_exp.fit import FitSettings, History
from insect_exp.models import layers, recipe_for
from insect_exp.models.backbone import backbone_of, feature_extractor
from insect_exp.models.keras_app import KerasAppError, KerasAppRecipe
from tests.conftest import make_image_folder

SIZE = (32, 32)  # the smallest input the MobileNets take
BATCH = 4
LEARNING_RATE = 0.01
SMALL = "MobileNetV3Small"  # 576 features
SMALL_FEATURES = 576
SIGNAL = "VGG16"  # fast to build at 32x32, 512 features that vary from image to image
SIGNAL_FEATURES = 512


def _app(backbone: str = SMALL, **options) -> KerasAppConfig:
    """model=keras_app's config with random weights, at the tests' tiny image size."""
    options.setdefault("weights", None)
    return KerasAppConfig(backbone=backbone, image_size=list(SIZE), **options)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, *SIZE, 3)).astype("float32")


def _data(root: Path) -> Data:
    """Decode the folder at root, writing a 3-class one (5 train + 2 test a class) if missing."""
    if not root.exists():
        make_image_folder(root, train_per_class=5, test_per_class=2)
    return load(scan(root), SIZE)


def _settings(epochs: int = 2, seed: int = 0) -> FitSettings:
    return FitSettings(
        epochs=epochs,
        batch_size=BATCH,
        seed=seed,
        optimizer=AdamConfig(learning_rate=LEARNING_RATE),
    )


def _params(weights: list[tf.Variable]) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


def _predict(model: keras.Model, images: np.ndarray) -> np.ndarray:
    return model.predict(images.astype("float32"), verbose=0)


class _Sink:
    """Collects what training sends to MLflow: {metric: [(step, value)]}."""

    def __init__(self) -> None:
        self.metrics: dict[str, list[tuple[int, float]]] = {}

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, value))

    def values(self, key: str) -> list[float]:
        return [value for _, value in self.metrics[key]]

    def steps(self, key: str) -> list[int]:
        return [step for step, _ in self.metrics[key]]


class Trained(NamedTuple):
    recipe: KerasAppRecipe
    model: keras.Model
    sink: _Sink
    history: History


def _train(data: Data, backbone: str = SIGNAL, seed: int = 0, epochs: int = 2, **options):
    """Build and fit a keras_app classifier as train.run would (seeded, batches of 4, Adam)."""
    keras.utils.set_random_seed(seed)
    recipe = recipe_for(_app(backbone, **options))
    recipe.prepare()
    model = recipe.build(len(data.class_names))
    sink = _Sink()
    history = recipe.fit(model, data, _settings(epochs, seed), sink)
    return Trained(recipe, model, sink, history)


# The model


def test_backbone_by_name_is_frozen_under_a_trainable_logits_head():
    # Given model=keras_app with MobileNetV3Small and random weights
    # When its recipe builds a 4-class classifier
    recipe = recipe_for(_app(SMALL))
    model = recipe.build(4)

    # Then raw 0..255 images go in and one logit per class comes out
    assert isinstance(recipe, KerasAppRecipe)
    images = _images(5)
    assert model(images).shape == (5, 4)
    assert model.input_shape == (None, *SIZE, 3)
    # And the backbone is the named, frozen application without its top, average-pooled
    backbone = backbone_of(model)
    assert backbone.name == "backbone"
    assert not backbone.trainable and backbone.trainable_weights == []
    assert backbone.output_shape == (None, SMALL_FEATURES)
    reference = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(*SIZE, 3), pooling="avg"
    )
    assert backbone.count_params() == reference.count_params()
    # And only the Dense head trains: features x classes weights + biases
    assert _params(model.trainable_weights) == (SMALL_FEATURES + 1) * 4
    assert model.count_params() - backbone.count_params() == (SMALL_FEATURES + 1) * 4


def test_the_applications_own_preprocessing_runs_inside_the_model():
    # Given a backbone whose preprocess_input is far from the identity (VGG16: RGB -> BGR minus
    # the ImageNet mean)
    model = recipe_for(_app(SIGNAL)).build(3)
    backbone = backbone_of(model)
    images = _images(4)
    preprocess = importlib.import_module(keras.applications.VGG16.__module__).preprocess_input

    # When raw 0..255 images go through the model up to the backbone's features
    features = feature_extractor(model)(images).numpy()

    # Then they are the application's features of preprocess_input(images), not of raw pixels
    expected = backbone(preprocess(images.copy()), training=False).numpy()
    unprocessed = backbone(images, training=False).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(features, unprocessed, rtol=1e-2, atol=1e-4)
    assert features.std(axis=0).mean() > 1e-4  # the features do differ from image to image


# Errors a user can fix


@pytest.mark.parametrize("name", ["ResNet9000", "mobilenet_v2", "resnet50v2"])
def test_unknown_backbone_is_a_one_line_user_error_listing_valid_names(compose_cfg, name):
    # Given model.backbone naming no tf_keras.applications model (nor a module of one)
    cfg = compose_cfg("model=keras_app", f"model.backbone={name}", "model.weights=null")
    recipe = recipe_for(cfg.model)

    # When the recipe prepares (or builds) the model, then one line names the key and the choices
    for step in (recipe.prepare, lambda: recipe.build(3)):
        with pytest.raises(UserError) as err:
            step()
        message = str(err.value)
        assert "\n" not in message
        assert f"model.backbone={name!r}" in message, message
        for valid in ("EfficientNetB0", "MobileNetV3Small", "ResNet50V2", "VGG16"):
            assert valid in message, message


def test_weights_path_that_does_not_exist_is_a_user_error_naming_model_weights(
    compose_cfg, tmp_path
):
    missing = tmp_path / "nowhere" / "notop.weights.h5"
    cfg = compose_cfg("model=keras_app", f"model.backbone={SMALL}", f"model.weights={missing}")

    with pytest.raises(UserError) as err:
        recipe_for(cfg.model).prepare()

    message = str(err.value)
    assert "\n" not in message
    assert f"model.weights={str(missing)!r}" in message, message
    assert "null" in message


def test_image_size_the_backbone_cannot_take_is_a_user_error():
    # MobileNetV3Small takes 32x32 images at least
    config = KerasAppConfig(backbone=SMALL, weights=None, image_size=[16, 16])
    with pytest.raises(KerasAppError, match=r"MobileNetV3Small at 16x16.*at least 32x32"):
        recipe_for(config).prepare()


# Weights


def test_imagenet_weights_offline_fail_fast_in_prepare_with_the_fix(tmp_path, monkeypatch):
    # Given no network and an empty Keras cache (tf_keras caches in ~/.keras, whatever
    # KERAS_HOME says)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home" / ".keras"))
    recipe = recipe_for(_app(SMALL, weights="imagenet", load_timeout_s=5.0))

    # When the recipe prepares, before any image is decoded
    start = time.perf_counter()
    with pytest.raises(KerasAppError) as err:
        recipe.prepare()

    # Then it fails at once with one line saying the three ways out
    assert time.perf_counter() - start < 60
    assert isinstance(err.value, UserError)
    message = str(err.value)
    assert "\n" not in message
    assert "ImageNet weights of MobileNetV3Small" in message, message
    for fix in ("~/.keras/models", "model.weights=/path/to/", "model.weights=null"):
        assert fix in message, message


def test_offline_cli_with_imagenet_weights_exits_within_a_minute_with_the_fix(
    image_folder, tmp_path
):
    # Given a machine without network and an empty Keras cache
    env = {**os.environ, "HOME": str(tmp_path / "home"), "KERAS_HOME": str(tmp_path / "keras")}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [
        sys.executable, "-m", "insect_exp", "model=keras_app", f"model.backbone={SMALL}",
        "model.image_size=[32,32]", "model.load_timeout_s=5", "epochs=1", "dataset=insects",
        f"dataset.root={image_folder}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"hydra.run.dir={tmp_path / 'outputs'}",
    ]  # fmt: skip

    # When the user runs model=keras_app with its default imagenet weights
    start = time.perf_counter()
    out = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180
    )
    elapsed = time.perf_counter() - start

    # Then it exits non-zero well within a minute, saying how to fix it, before decoding images
    output = out.stdout + out.stderr
    assert out.returncode != 0
    assert elapsed < 60
    assert "Traceback" not in output, output[-3000:]
    assert "~/.keras/models" in output and "model.weights=null" in output, output[-3000:]
    assert "decoded" not in output


@pytest.mark.parametrize("suffix", [".h5", ".weights.h5"])
def test_local_weights_file_is_loaded_into_the_backbone(tmp_path, monkeypatch, suffix):
    # Given the weights of a MobileNetV3Small without its top, saved to a file under ~
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    keras.utils.set_random_seed(1)
    saved = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(*SIZE, 3), pooling="avg"
    )
    saved.save_weights(str(home / f"notop{suffix}"))
    expected = saved.get_weights()

    # When a recipe names that file (with ~) and builds under another seed
    keras.utils.set_random_seed(2)
    recipe = recipe_for(_app(SMALL, weights=f"~/notop{suffix}"))
    recipe.prepare()
    model = recipe.build(3)

    # Then the backbone holds the saved weights, not a fresh random initialisation
    loaded = backbone_of(model).get_weights()
    assert len(loaded) == len(expected)
    for a, b in zip(loaded, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    # And it is still frozen under a trainable head
    assert _params(model.trainable_weights) == (SMALL_FEATURES + 1) * 3


def test_weights_file_of_another_backbone_is_a_user_error_naming_both(tmp_path):
    # Given the weights of a MobileNetV3Small, given to VGG16
    small = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(*SIZE, 3), pooling="avg"
    )
    path = tmp_path / "mobilenet_v3_small_notop.weights.h5"
    small.save_weights(str(path))

    with pytest.raises(UserError) as err:
        recipe_for(_app(SIGNAL, weights=str(path))).prepare()

    message = str(err.value)
    assert "\n" not in message
    assert SIGNAL in message and str(path) in message, message


# Training: cached features, disk cache, fine-tuning


def test_cached_features_train_the_same_head_as_images(tmp_path):
    # Given the same seed, data and batch order
    data = _data(tmp_path / "insects")

    # When the head is trained on cached features and, separately, end to end on images
    cached = _train(data, feature_cache=FeatureCache.memory)
    direct = _train(data, feature_cache=FeatureCache.off)

    # Then each train and validation image went through the backbone once
    total = len(data.train) + len(data.val)
    assert total == 21
    assert cached.sink.metrics["backbone_images_computed"] == [(0, total)]
    assert cached.sink.metrics["backbone_images_reused"] == [(0, 0)]
    assert "backbone_images_computed" not in direct.sink.metrics
    # And both heads end with the same weights, metrics and predictions
    for a, b in zip(
        cached.model.get_layer("head").weights,
        direct.model.get_layer("head").weights,
        strict=True,
    ):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    for key in ("loss", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(cached.sink.values(key), direct.sink.values(key), atol=1e-4)
    np.testing.assert_allclose(
        cached.history.epochs["loss"], direct.history.epochs["loss"], atol=1e-4
    )
    expected = _predict(cached.model, data.test.images)
    np.testing.assert_allclose(expected, _predict(direct.model, data.test.images), atol=1e-4)
    # the predictions are not one constant row (which any features would give)
    assert np.ptp(expected, axis=0).max() > 1e-3
    # And the backbone stayed as it was built
    assert cached.recipe.can_cache_features(cached.model)
    assert _params(cached.model.trainable_weights) == (SIGNAL_FEATURES + 1) * 3


def test_disk_cache_reuses_features_until_the_backbone_weights_change(tmp_path):
    # Given a disk cache and a folder of 15 train + 6 test images
    data = _data(tmp_path / "insects")
    cache = tmp_path / "cache"
    options = {"feature_cache": FeatureCache.disk, "feature_cache_dir": str(cache)}
    total = len(data.train) + len(data.val)

    # When the same run is made twice, then the second one computes no feature
    first = _train(data, **options)
    assert first.sink.metrics["backbone_images_computed"] == [(0, total)]
    assert list(cache.rglob("*.features.npy"))
    second = _train(data, **options)
    assert second.sink.metrics["backbone_images_computed"] == [(0, 0)]
    assert second.sink.metrics["backbone_images_reused"] == [(0, total)]
    # and trains the same head
    for a, b in zip(first.model.weights, second.model.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)

    # When the backbone has other weights (another seed's random initialisation), then nothing
    # is reused
    other = _train(data, seed=1, **options)
    assert other.sink.metrics["backbone_images_computed"] == [(0, total)]


def test_fine_tune_changes_only_the_top_layers_and_continues_the_epochs(tmp_path):
    # Given a frozen-head stage of 2 epochs, then 1 epoch fine-tuning the top 2 weighted layers
    data = _data(tmp_path / "insects")
    fine_tune = FineTuneConfig(enabled=True, epochs=1, learning_rate=1e-3, top_layers=2)
    keras.utils.set_random_seed(0)
    recipe = recipe_for(_app(SIGNAL, fine_tune=fine_tune))
    model = recipe.build(3)
    backbone = backbone_of(model)
    before = {layer.name: [w.numpy() for w in layer.weights] for layer in backbone.layers}
    sink = _Sink()

    # When it trains
    history = recipe.fit(model, data, _settings(epochs=2), sink)

    # Then the head trained on cached features first, and the epochs number on through the
    # fine-tune stage, at its own learning rate
    assert sink.metrics["backbone_images_computed"] == [(0, len(data.train) + len(data.val))]
    assert history.num_epochs == 3
    assert len(history.epochs["val_loss"]) == 3
    assert sink.steps("val_loss") == [0, 1, 2]
    np.testing.assert_allclose(sink.values("lr"), [LEARNING_RATE] * 2 + [1e-3], rtol=1e-6)
    # And only the top 2 weighted layers of the backbone moved, each of their weights
    moved = {
        layer.name
        for layer in backbone.layers
        if any(
            not np.array_equal(w.numpy(), old)
            for w, old in zip(layer.weights, before[layer.name], strict=True)
        )
    }
    assert moved == {"block5_conv2", "block5_conv3"}
    for name in moved:
        layer = backbone.get_layer(name)
        for w, old in zip(layer.weights, before[name], strict=True):
            assert not np.array_equal(w.numpy(), old), w.name
    assert _params(backbone.trainable_weights) == 2 * (3 * 3 * 512 * 512 + 512)


# The run


def test_keras_app_run_finishes_naming_the_backbone_and_caching_features(
    compose_cfg, tracking_uri, image_folder
):
    # Given the real config with model=keras_app, MobileNetV3Small, random weights
    cfg = compose_cfg(
        "model=keras_app", f"model.backbone={SMALL}", "model.weights=null", "dataset=insects",
        f"dataset.root={image_folder}", "epochs=2", "mlflow.log_model=false",
    )  # fmt: skip

    # When the train job runs
    train.run(cfg)

    # Then MLflow holds a FINISHED run that names the backbone, whose head trained on features
    # computed once per image
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("insect_exp").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "keras_app"
    assert run.data.params["model.backbone"] == SMALL
    assert run.data.metrics["backbone_images_computed"] == 27  # 18 train + 9 test, once each
    assert run.data.metrics["backbone_images_reused"] == 0
    for key in ("loss", "val_accuracy"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1]
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_keras_app_run_logs_a_model_that_reloads_in_a_fresh_process(
    compose_cfg, tracking_uri, image_folder, tmp_path, monkeypatch
):
    # Given the real config with model=keras_app, MobileNetV3Small, random weights, model logging
    cfg = compose_cfg(
        "model=keras_app", f"model.backbone={SMALL}", "model.weights=null", "dataset=insects",
        f"dataset.root={image_folder}", "mlflow.log_model=true",
    )  # fmt: skip
    logged = []

    class RecordingModule(layers.ServingModule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            logged.append(self)

    monkeypatch.setattr(layers, "ServingModule", RecordingModule)

    # When the train job runs
    train.run(cfg)

    # Then MLflow holds a FINISHED run that names the backbone
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("insect_exp")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.backbone"] == SMALL

    # And the logged model (preprocessing, backbone and head) reloads in a fresh process, without
    # the Keras flag, and predicts what the trained model predicted
    (model,) = client.search_logged_models([experiment.experiment_id])
    images = np.random.default_rng(0).uniform(0, 255, (2, *SIZE, 3)).astype("float32")
    expected = logged[0].__call__(images).numpy()
    np.save(tmp_path / "x.npy", images)
    code = (
        "import numpy as np, mlflow\n"
        f"mlflow.set_tracking_uri({tracking_uri!r})\n"
        f"m = mlflow.pyfunc.load_model('models:/{model.model_id}')\n"
        f"y = np.asarray(m.predict(np.load({str(tmp_path / 'x.npy')!r})))\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, y)\n"
        "print('SHAPE', tuple(y.shape))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert "SHAPE (2, 3)" in out.stdout, out.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-5)
