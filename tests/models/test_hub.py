"""The hub recipe: handles, offline failures, the post's architecture, training, the preview."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub
import tf_keras as keras
from hydra.errors import ConfigCompositionException
from matplotlib.figure import Figure

from insect_exp import UserError, fit
from insect_exp.config import (
    AdamConfig,
    AugmentConfig,
    AugmentPolicy,
    FeatureCache,
    FineTuneConfig,
    HubModelConfig,
    PreviewConfig,
)
from insect_exp.data.mixing import Mixing
from insect_exp.data.pipeline import Data, load
from insect_exp.data.scan import scan
from insect_exp.fit import FitSettings, History
from insect_exp.models import recipe_for
from insect_exp.models.export_untrained import save_hub_module
from insect_exp.models.handles import HubHandleError, resolve_handle
from insect_exp.models.hub import HubRecipe
from insect_exp.models.preview import imagenet_preview
from tests.conftest import make_image_folder
from tests.models.conftest import TINY_FEATURES, TINY_IMAGENET_LABELS

OFFLINE_URL = "https://tfhub.invalid/google/tf2-preview/mobilenet_v2/feature_vector/4"
OFFLINE_CLASSIFIER_URL = "https://tfhub.invalid/google/tf2-preview/mobilenet_v2/classification/4"
SIZE = (16, 16)
BATCH = 4
LEARNING_RATE = 0.01


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, *SIZE, 3)).astype("float32")


def _data(root: Path, val_split: float = 0.0) -> Data:
    """Decode the folder at root, writing a 3-class one (5 train + 2 test a class) if missing."""
    if not root.exists():
        make_image_folder(root, train_per_class=5, test_per_class=2)
    return load(scan(root), SIZE, val_split)


def _hub(handle: str | Path, image_size: tuple[int, int] = SIZE, **options) -> HubModelConfig:
    """model=hub_mobilenet's config on a local handle, at the tests' tiny image size."""
    return HubModelConfig(handle=str(handle), image_size=list(image_size), **options)


def _settings(epochs: int = 2, seed: int = 0) -> FitSettings:
    return FitSettings(
        epochs=epochs,
        batch_size=BATCH,
        seed=seed,
        optimizer=AdamConfig(learning_rate=LEARNING_RATE),
    )


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
    recipe: HubRecipe
    model: keras.Model
    sink: _Sink
    history: History


def _train(backbone: Path, data: Data, seed: int = 0, epochs: int = 2, **options) -> Trained:
    """Build and fit a hub classifier as train.run would (seeded, batches of 4, Adam at 0.01)."""
    keras.utils.set_random_seed(seed)
    recipe = recipe_for(_hub(backbone, image_size=options.pop("image_size", SIZE), **options))
    model = recipe.build(len(data.class_names))
    sink = _Sink()
    settings = replace(_settings(epochs, seed), augment=recipe.cfg.augment)
    history = recipe.fit(model, data, settings, sink)
    return Trained(recipe, model, sink, history)


def _predict(model: keras.Model, images: np.ndarray) -> np.ndarray:
    return model.predict(images.astype("float32"), verbose=0)


def _trainable_params(weights: list[tf.Variable]) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


# Handles and the post's architecture


def test_local_savedmodel_loads_through_keras_layer_and_scales_raw_pixels(tiny_backbone):
    # Given a local SavedModel exported with the hub interface
    # When model=hub_mobilenet's recipe builds the classifier on it
    recipe = recipe_for(_hub(tiny_backbone))
    model = recipe.build(3)

    # Then the recipe is the hub one, and the backbone is a real, frozen hub.KerasLayer fed with
    # pixels scaled to [0, 1]
    assert isinstance(recipe, HubRecipe)
    backbone = model.get_layer("backbone")
    assert isinstance(backbone, hub.KerasLayer)
    assert not backbone.trainable and backbone.trainable_weights == []
    images = _images(3)
    extractor = keras.Model(model.input, backbone.output)
    direct = tf.saved_model.load(str(tiny_backbone))(images / 255.0, training=False)
    np.testing.assert_allclose(extractor(images), direct, rtol=1e-5, atol=1e-6)
    # And only the Dense head trains: features x classes weights + biases
    assert model.count_params() - backbone.count_params() == (TINY_FEATURES + 1) * 3
    assert _trainable_params(model.trainable_weights) == (TINY_FEATURES + 1) * 3
    assert model(images).shape == (3, 3)


def test_dropout_sits_in_the_head_before_the_logits(tiny_backbone):
    model = recipe_for(_hub(tiny_backbone, dropout=0.3)).build(3)
    head = model.get_layer("head")
    assert [type(layer).__name__ for layer in head.layers] == ["Dropout", "Dense"]
    assert head.layers[0].rate == pytest.approx(0.3)


def test_module_in_tfhub_cache_dir_is_used_without_network(tiny_backbone, tmp_path, monkeypatch):
    # Given a URL handle whose module is already in TFHUB_CACHE_DIR, on a machine with no network
    cache = tmp_path / "tfhub_modules"
    cached = cache / hashlib.sha1(OFFLINE_URL.encode()).hexdigest()
    shutil.copytree(tiny_backbone, cached)
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))

    # When the handle is resolved, then the cached copy is used
    assert resolve_handle(OFFLINE_URL, 5.0).samefile(cached)
    # And the recipe prepares and builds on it offline
    recipe = HubRecipe(_hub(OFFLINE_URL, load_timeout_s=5.0))
    recipe.prepare()
    assert recipe.build(3).get_layer("backbone").count_params() > 0


def test_directory_that_is_not_a_savedmodel_points_at_the_one_inside(tiny_backbone, tmp_path):
    parent = tmp_path / "export"
    shutil.copytree(tiny_backbone, parent / "feature_vector")
    with pytest.raises(HubHandleError, match=r"not a SavedModel.*did you mean .*feature_vector"):
        resolve_handle(str(parent), 5.0)


def test_missing_local_path_says_how_to_export_an_untrained_model(tmp_path):
    with pytest.raises(HubHandleError, match="export_untrained") as err:
        resolve_handle(str(tmp_path / "nowhere"), 5.0)
    assert "model.handle" in str(err.value)


def test_savedmodel_for_another_image_size_is_a_user_error_naming_the_setting(tmp_path):
    # Given a SavedModel that only takes 24x24 images
    keras.utils.set_random_seed(0)
    fixed = keras.Sequential(
        [
            keras.Input(shape=(24, 24, 3)),
            keras.layers.Flatten(),
            keras.layers.Dense(TINY_FEATURES),
        ]
    )
    handle = save_hub_module(fixed, tmp_path / "fixed_24", image_size=(24, 24))

    # When the classifier is built for 16x16 images, then the error names the handle and the key
    with pytest.raises(UserError, match=r"16x16 RGB images.*model\.image_size") as err:
        HubRecipe(_hub(handle)).build(3)
    assert str(handle) in str(err.value)


def test_savedmodel_that_is_not_a_feature_vector_is_a_user_error(tmp_path):
    # Given a SavedModel that outputs feature maps (rank 4), not a feature vector
    keras.utils.set_random_seed(0)
    maps = keras.Sequential([keras.Input(shape=(None, None, 3)), keras.layers.Conv2D(4, 3)])
    handle = save_hub_module(maps, tmp_path / "feature_maps")

    # When the classifier is built on it, then the error says what is wrong with which handle
    with pytest.raises(UserError, match="not a feature vector") as err:
        HubRecipe(_hub(handle)).build(3)
    assert str(handle) in str(err.value)


# Offline


@pytest.mark.parametrize(
    "step",
    [
        pytest.param(lambda recipe: recipe.prepare(), id="prepare"),
        pytest.param(lambda recipe: recipe.build(3), id="build"),
    ],
)
def test_unreachable_handle_fails_fast_with_a_one_line_fix(tmp_path, monkeypatch, step):
    # Given a URL handle that cannot be resolved (offline) and nothing in the hub cache
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "empty_cache"))
    recipe = HubRecipe(_hub(OFFLINE_URL, load_timeout_s=10.0))

    # When the recipe prepares (or builds) the model
    start = time.perf_counter()
    with pytest.raises(HubHandleError) as err:
        step(recipe)

    # Then it fails (here at once: the name does not resolve) with one line naming both settings
    # and the untrained export; the bound is only for a hang, three times the 10 s timeout
    assert time.perf_counter() - start < 30
    message = str(err.value)
    assert "\n" not in message
    assert isinstance(err.value, UserError)
    for needle in ("model.handle=", "INSECT_EXP_HUB_HANDLE", "export_untrained", "UNTRAINED"):
        assert needle in message, message


def test_prepare_checks_the_preview_classifier_handle_too(tiny_backbone, tmp_path, monkeypatch):
    # Given a reachable backbone but an unreachable preview classifier, nothing in the hub cache
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "empty_cache"))
    preview = PreviewConfig(enabled=True, handle=OFFLINE_CLASSIFIER_URL)
    recipe = HubRecipe(_hub(tiny_backbone, preview=preview, load_timeout_s=10.0))

    # When the recipe prepares, then it fails naming the preview's settings, not the backbone's
    with pytest.raises(HubHandleError) as err:
        recipe.prepare()
    message = str(err.value)
    assert "model.preview.handle=" in message and "INSECT_EXP_HUB_CLASSIFIER_HANDLE" in message
    assert "model.handle=" not in message


def test_prepare_checks_the_preview_labels_before_any_image_is_decoded(
    tiny_classifier, tiny_backbone
):
    # Given a reachable preview classifier but a labels URL that cannot be fetched (offline)
    classifier, _ = tiny_classifier
    preview = PreviewConfig(
        enabled=True, handle=str(classifier), labels="https://labels.invalid/ImageNetLabels.txt"
    )
    recipe = HubRecipe(_hub(tiny_backbone, preview=preview, load_timeout_s=5.0))

    # When the recipe prepares (train.run calls it before decoding), then it names the labels key
    with pytest.raises(HubHandleError, match="model.preview.labels="):
        recipe.prepare()


def test_prepare_names_the_preview_classifier_and_labels_settings_in_one_message(
    tiny_backbone, tmp_path, monkeypatch
):
    # Given a reachable backbone, but neither the preview's classifier nor its labels (offline)
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "empty_cache"))
    preview = PreviewConfig(
        enabled=True,
        handle=OFFLINE_CLASSIFIER_URL,
        labels="https://labels.invalid/ImageNetLabels.txt",
    )
    recipe = HubRecipe(_hub(tiny_backbone, preview=preview, load_timeout_s=5.0))

    # When the recipe prepares
    with pytest.raises(HubHandleError) as err:
        recipe.prepare()

    # Then one line names both settings, so that one fix makes the preview work
    message = str(err.value)
    assert "\n" not in message
    for needle in (
        "model.preview.handle=", "INSECT_EXP_HUB_CLASSIFIER_HANDLE",
        "model.preview.labels=", "INSECT_EXP_IMAGENET_LABELS",
    ):  # fmt: skip
        assert needle in message, message


def test_server_that_never_answers_fails_within_the_load_timeout(tmp_path, monkeypatch):
    # Given a server that accepts connections but never answers (a stalled network)
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "empty_cache"))
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/mobilenet_v2/feature_vector/4"

    # When a recipe on it prepares with a 1 s timeout, then it gives up in about that time
    start = time.perf_counter()
    try:
        with pytest.raises(HubHandleError, match="model.handle"):
            HubRecipe(_hub(url, load_timeout_s=1.0)).prepare()
    finally:
        server.close()
    assert time.perf_counter() - start < 15  # a hang bound: the timeout is 1 s


# Training recipe


def test_cached_features_train_the_same_head_as_images(tiny_backbone, tmp_path, monkeypatch):
    # Given the same seed, data and batch order
    data = _data(tmp_path / "insects")

    # When the head is trained on cached features and, separately, end to end on images
    cached = _train(tiny_backbone, data, feature_cache=FeatureCache.memory)
    direct = _train(tiny_backbone, data, feature_cache=FeatureCache.off)

    # Then each image went through the backbone once, and both heads end with the same weights
    total = len(data.train) + len(data.val)
    assert cached.sink.metrics["backbone_images_computed"] == [(0, total)]
    assert "backbone_images_computed" not in direct.sink.metrics
    for a, b in zip(
        cached.model.get_layer("head").weights,
        direct.model.get_layer("head").weights,
        strict=True,
    ):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    for key in ("loss", "val_accuracy"):
        np.testing.assert_allclose(cached.sink.values(key), direct.sink.values(key), atol=1e-4)
    np.testing.assert_allclose(
        cached.history.epochs["loss"], direct.history.epochs["loss"], atol=1e-4
    )
    # And the full image model carries the trained head
    assert data.val_is_test
    expected = _predict(cached.model, data.test.images)
    np.testing.assert_allclose(expected, _predict(direct.model, data.test.images), atol=1e-4)

    # And the report's logits on the test split (validation here) are the last validation's,
    # the final model's: no second pass over the test images
    def second_pass(*args, **kwargs):
        raise AssertionError("predicted the test split again")

    monkeypatch.setattr(fit, "predict_logits", second_pass)
    cached_logits = cached.recipe.predict(cached.model, data.test, BATCH)
    direct_logits = direct.recipe.predict(direct.model, data.test, BATCH)
    np.testing.assert_allclose(cached_logits, expected, atol=1e-5)
    np.testing.assert_allclose(direct_logits, expected, atol=1e-4)


@pytest.mark.parametrize("fine_tune", [False, True], ids=["head", "fine_tuned"])
def test_a_test_split_apart_from_validation_gets_the_final_models_logits(
    tiny_backbone, tmp_path, fine_tune
):
    # Given validation held out of train, and a test split beside it
    data = _data(tmp_path / "insects", val_split=0.4)
    assert not data.val_is_test

    # When the head trains on cached features (and then, maybe, the backbone is fine-tuned)
    options = {"fine_tune": FineTuneConfig(enabled=True, epochs=1, learning_rate=0.05)}
    trained = _train(
        tiny_backbone, data, feature_cache=FeatureCache.memory, **(options if fine_tune else {})
    )

    # Then the recipe's logits on the test and validation splits are the final full model's
    model, recipe = trained.model, trained.recipe
    for split in (data.test, data.val):
        np.testing.assert_allclose(
            recipe.predict(model, split, BATCH), _predict(model, split.images), atol=1e-5
        )


def test_disk_cache_reuses_features_until_a_file_or_the_backbone_changes(
    tiny_backbone, other_backbone, tmp_path
):
    # Given a disk cache and a folder of 15 train + 6 test images
    root = tmp_path / "insects"
    cache = tmp_path / "cache"
    options = {"feature_cache": FeatureCache.disk, "feature_cache_dir": str(cache)}
    data = _data(root)
    total = len(data.train) + len(data.val)

    # When the same run is made twice, then the second one computes no feature
    first = _train(tiny_backbone, data, **options)
    assert first.sink.metrics["backbone_images_computed"] == [(0, total)]
    second = _train(tiny_backbone, data, **options)
    assert second.sink.metrics["backbone_images_computed"] == [(0, 0)]
    assert second.sink.metrics["backbone_images_reused"] == [(0, total)]
    for a, b in zip(first.model.weights, second.model.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)

    # When the same SavedModel is copied elsewhere, then its features are still reused
    copy = shutil.copytree(tiny_backbone, tmp_path / "copied" / "feature_vector")
    assert _train(copy, data, **options).sink.metrics["backbone_images_computed"] == [(0, 0)]

    # When one image file changes, then only that image is recomputed
    changed = Path(data.train.paths[0])
    pixels = np.random.default_rng(9).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    keras.utils.save_img(changed, pixels)
    edited = _train(tiny_backbone, _data(root), **options)
    assert edited.sink.metrics["backbone_images_computed"] == [(0, 1)]

    # When the backbone or the image size changes, then nothing is reused
    other = _train(other_backbone, _data(root), **options)
    assert other.sink.metrics["backbone_images_computed"] == [(0, total)]
    resized = load(scan(root), (12, 12))
    small = _train(tiny_backbone, resized, epochs=1, image_size=(12, 12), **options)
    assert small.sink.metrics["backbone_images_computed"] == [(0, total)]


def test_auto_cache_goes_to_disk_above_the_memory_limit(tiny_backbone, tmp_path):
    data = _data(tmp_path / "insects")
    cache = tmp_path / "cache"
    _train(tiny_backbone, data, feature_cache_dir=str(cache), feature_cache_max_memory_mb=0)
    assert list(cache.rglob("*.features.npy"))
    _train(tiny_backbone, data, feature_cache_dir=str(tmp_path / "unused"))
    assert not (tmp_path / "unused").exists()


@pytest.mark.parametrize(
    "augment",
    [
        AugmentConfig(flip=True),
        AugmentConfig(policy=AugmentPolicy.randaugment),
        AugmentConfig(erasing=0.5),
    ],
    ids=["flip", "randaugment", "erasing"],
)
def test_augmentation_before_the_backbone_trains_on_images(tiny_backbone, tmp_path, augment):
    # Given random flips in front of the backbone, or a policy on the training batches, features
    # change every epoch
    data = _data(tmp_path / "insects")
    trained = _train(tiny_backbone, data, augment=augment)

    # Then nothing is cached, and training still reports every epoch
    assert not trained.recipe.can_cache_features(trained.model)
    assert "backbone_images_computed" not in trained.sink.metrics
    assert trained.sink.steps("val_accuracy") == [0, 1]


def test_unknown_cache_mode_is_rejected_when_the_config_is_composed(compose_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("model=hub_mobilenet", "model.feature_cache=ram")
    cause = str(err.value.__cause__)
    assert "Invalid value 'ram', expected one of [auto, memory, disk, off]" in cause
    assert "model.feature_cache" in cause


@pytest.mark.parametrize(
    ("top_layers", "params"),
    [
        # conv 3*3*3*6 + 6, BatchNorm gamma and beta 2*6 (its moving statistics never train),
        # top 6*8 + 8
        (None, 168 + 12 + 56),
        (1, 56),
        (2, 12 + 56),
    ],
)
def test_unfreeze_makes_the_whole_backbone_or_its_top_layers_trainable(
    tiny_backbone, top_layers, params
):
    recipe = HubRecipe(_hub(tiny_backbone))
    model = recipe.build(3)
    assert recipe.can_cache_features(model)

    assert recipe.unfreeze(model, top_layers) == params

    backbone = model.get_layer("backbone")
    assert _trainable_params(backbone.trainable_weights) == params
    assert backbone.count_params() == 168 + 2 * 12 + 56
    assert _trainable_params(model.trainable_weights) == params + (TINY_FEATURES + 1) * 3
    assert not recipe.can_cache_features(model)


@pytest.mark.parametrize("top_layers", [None, 1])
def test_fine_tune_stage_unfreezes_the_backbone_and_continues_the_steps(
    tiny_backbone, tmp_path, top_layers
):
    # Given a frozen-head stage of 2 epochs followed by a fine-tune stage of 2 epochs
    data = _data(tmp_path / "insects")
    before = {w.name: w.numpy() for w in tf.saved_model.load(str(tiny_backbone)).variables}
    fine_tune = FineTuneConfig(enabled=True, epochs=2, learning_rate=0.05, top_layers=top_layers)

    # When it trains
    trained = _train(tiny_backbone, data, fine_tune=fine_tune)

    # Then epoch metrics run on from step 2, at the fine-tune stage's own learning rate
    assert trained.sink.steps("val_loss") == [0, 1, 2, 3]
    assert trained.history.num_epochs == 4
    np.testing.assert_allclose(trained.sink.values("lr"), [LEARNING_RATE] * 2 + [0.05] * 2)
    # And the backbone weights moved (only the top layer's when asked), while BatchNorm's moving
    # statistics stayed put (inference mode)
    after = {w.name: w.numpy() for w in trained.model.get_layer("backbone").weights}
    moved = {name for name, value in after.items() if not np.allclose(value, before[name])}
    expected = {"top/kernel:0", "top/bias:0"}
    if top_layers is None:
        expected |= {"conv/kernel:0", "conv/bias:0", "bn/gamma:0", "bn/beta:0"}
    assert moved == expected


# ImageNet preview


def test_imagenet_preview_names_images_with_the_labels_file(tiny_classifier):
    handle, labels = tiny_classifier
    names = imagenet_preview(str(handle), str(labels), _images(7))
    assert len(names) == 7
    assert set(names) <= set(TINY_IMAGENET_LABELS)


def test_imagenet_preview_labels_alike_under_a_bf16_run(tiny_classifier):
    # Given a run that trains in bf16 (precision=auto on a device with native bf16)
    handle, labels = tiny_classifier
    images = _images(7)
    in_float32 = imagenet_preview(str(handle), str(labels), images)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        # When the preview labels the images (its SavedModel takes float32 only)
        in_bf16 = imagenet_preview(str(handle), str(labels), images)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # Then it labels them as in float32, not failing on a bf16 input
    assert in_bf16 == in_float32


def test_imagenet_preview_rejects_labels_that_do_not_fit_the_classifier(tiny_classifier, tmp_path):
    handle, _ = tiny_classifier
    short = tmp_path / "labels.txt"
    short.write_text("a\nb\n")
    with pytest.raises(HubHandleError, match="2 names but the classifier .* outputs 5 classes"):
        imagenet_preview(str(handle), str(short), _images(2))


def test_imagenet_labels_offline_name_the_setting_to_change(tiny_classifier):
    handle, _ = tiny_classifier
    with pytest.raises(HubHandleError, match="model.preview.labels=.*INSECT_EXP_IMAGENET_LABELS"):
        imagenet_preview(str(handle), "https://labels.invalid/ImageNetLabels.txt", _images(1), 5.0)


def test_recipe_artifacts_are_the_preview_grid_and_table_when_enabled(
    tiny_backbone, tiny_classifier, tmp_path
):
    # Given a folder of 15 train images and the preview of 7 of them
    handle, labels = tiny_classifier
    data = _data(tmp_path / "insects")
    preview = PreviewConfig(enabled=True, handle=str(handle), labels=str(labels), num_images=7)

    # When the recipe makes its artifacts
    artifacts = HubRecipe(_hub(tiny_backbone, preview=preview)).artifacts(data, seed=0)

    # Then they are the "ImageNet predictions" grid and a table of 7 distinct train images
    assert set(artifacts) == {"plots/imagenet_predictions.png", "imagenet_predictions.tsv"}
    assert isinstance(artifacts["plots/imagenet_predictions.png"], Figure)
    header, rows = artifacts["imagenet_predictions.tsv"]
    assert list(header) == ["path", "imagenet_label"]
    assert len(rows) == 7 and len({path for path, _ in rows}) == 7
    assert {path for path, _ in rows} <= set(data.train.paths)
    assert {name for _, name in rows} <= set(TINY_IMAGENET_LABELS)
    # And without the preview there are none
    assert HubRecipe(_hub(tiny_backbone)).artifacts(data, seed=0) == {}


@pytest.mark.slow
def test_untrained_mobilenet_has_the_posts_parameter_counts(untrained_mobilenet):
    # Given the documented export of an untrained MobileNetV2 feature vector
    # When the post's model is built on it for 3 classes at 224x224
    recipe = recipe_for(_hub(untrained_mobilenet["feature_vector"], image_size=(224, 224)))
    model = recipe.build(3)

    # Then it has the post's 2,261,827 parameters, of which 3,843 trainable
    trainable = _trainable_params(model.trainable_weights)
    assert (model.count_params(), trainable) == (2_261_827, 3_843)
    assert model.get_layer("backbone").count_params() == 2_257_984
    # And the classifier export speaks the hub classification/4 interface: 1001 logits + labels
    images = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype("float32")
    names = imagenet_preview(
        str(untrained_mobilenet["classifier"]), str(untrained_mobilenet["labels"]), images
    )
    assert len(names) == 2 and all(n.startswith(("untrained_class_", "background")) for n in names)
    assert "UNTRAINED" in (untrained_mobilenet["feature_vector"].parent / "README.txt").read_text()


def test_mixing_trains_the_head_on_mixed_images_not_on_cached_features(tiny_backbone, tmp_path):
    # Given a frozen backbone and mixup (a mix of two images' features is not the mix's features)
    data = _data(tmp_path / "insects")
    recipe = recipe_for(_hub(tiny_backbone, image_size=SIZE))
    model = recipe.build(len(data.class_names))
    sink = _Sink()
    settings = dataclasses.replace(_settings(), mixing=Mixing(mixup_alpha=0.4))

    # When the recipe trains
    history = recipe.fit(model, data, settings, sink)

    # Then no feature was cached, and both epochs ran with finite losses
    assert "backbone_images_computed" not in sink.metrics
    assert sink.steps("val_accuracy") == [0, 1]
    assert np.isfinite(history.epochs["loss"]).all()
