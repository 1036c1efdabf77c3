"""The hub classifier: handles, offline failures, the post's architecture, training recipe."""

from __future__ import annotations

import hashlib
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub
import tf_keras as keras

from insect_exp import UserError
from insect_exp.data.pipeline import Data, load
from insect_exp.data.scan import scan
from insect_exp.fit import History
from insect_exp.models.common import build_optimizer
from insect_exp.models.hub import (
    HubHandleError,
    build_hub_classifier,
    can_cache_features,
    fit_hub,
    imagenet_preview,
    resolve_handle,
)
from tests.conftest import make_image_folder
from tests.models.conftest import TINY_FEATURES, TINY_IMAGENET_LABELS

OFFLINE_URL = "https://tfhub.invalid/google/tf2-preview/mobilenet_v2/feature_vector/4"
SIZE = (16, 16)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, *SIZE, 3)).astype("float32")


def _data(root: Path) -> Data:
    """Decode the folder at root, writing a 3-class one (5 train + 2 test a class) if missing."""
    if not root.exists():
        make_image_folder(root, train_per_class=5, test_per_class=2)
    return load(scan(root), SIZE)


def _adam(learning_rate: float | None) -> keras.optimizers.Optimizer:
    return build_optimizer("adam", learning_rate or 0.01)


class _Sink:
    """Collects what fit_hub sends to MLflow: {metric: [(step, value)]}."""

    def __init__(self) -> None:
        self.metrics: dict[str, list[tuple[int, float]]] = {}

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, value))


def _train(
    backbone: Path, data: Data, seed: int = 0, **options
) -> tuple[keras.Model, _Sink, History]:
    """Build and fit_hub a classifier as train.run would (seeded, batches of 4, 2 epochs)."""
    keras.utils.set_random_seed(seed)
    model = build_hub_classifier(str(backbone), SIZE, 3, augment=options.pop("augment", None))
    sink = _Sink()
    options = {"epochs": 2, "batch_size": 4, "seed": seed, **options}
    history = fit_hub(model, data, _adam, sink=sink, **options)
    return model, sink, history


# Handles


def test_local_savedmodel_loads_through_keras_layer_and_scales_raw_pixels(tiny_backbone):
    # Given a local SavedModel exported with the hub interface
    # When the classifier is built on it
    model = build_hub_classifier(str(tiny_backbone), SIZE, 3)

    # Then the backbone is a real, frozen hub.KerasLayer fed with pixels scaled to [0, 1]
    backbone = model.get_layer("backbone")
    assert isinstance(backbone, hub.KerasLayer)
    assert not backbone.trainable and backbone.trainable_weights == []
    images = _images(3)
    extractor = keras.Model(model.input, backbone.output)
    direct = tf.saved_model.load(str(tiny_backbone))(images / 255.0, training=False)
    np.testing.assert_allclose(extractor(images), direct, rtol=1e-5, atol=1e-6)
    # And only the Dense head trains: features x classes weights + biases
    assert model.count_params() - backbone.count_params() == (TINY_FEATURES + 1) * 3
    assert sum(np.prod(w.shape) for w in model.trainable_weights) == (TINY_FEATURES + 1) * 3
    assert model(images).shape == (3, 3)


def test_dropout_sits_in_the_head_before_the_logits(tiny_backbone):
    model = build_hub_classifier(str(tiny_backbone), SIZE, 3, dropout=0.3)
    head = model.get_layer("head")
    assert [type(layer).__name__ for layer in head.layers] == ["Dropout", "Dense"]
    assert head.layers[0].rate == pytest.approx(0.3)


def test_module_in_tfhub_cache_dir_is_used_without_network(tiny_backbone, tmp_path, monkeypatch):
    # Given a URL handle whose module is already in TFHUB_CACHE_DIR, on a machine with no network
    cache = tmp_path / "tfhub_modules"
    shutil.copytree(tiny_backbone, cache / hashlib.sha1(OFFLINE_URL.encode()).hexdigest())
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))

    # When the handle is resolved, then the cached copy is used
    assert resolve_handle(OFFLINE_URL, 5.0).samefile(
        cache / hashlib.sha1(OFFLINE_URL.encode()).hexdigest()
    )


def test_directory_that_is_not_a_savedmodel_points_at_the_one_inside(tiny_backbone, tmp_path):
    parent = tmp_path / "export"
    shutil.copytree(tiny_backbone, parent / "feature_vector")
    with pytest.raises(HubHandleError, match=r"not a SavedModel.*did you mean .*feature_vector"):
        resolve_handle(str(parent), 5.0)


def test_missing_local_path_says_how_to_export_an_untrained_model(tmp_path):
    with pytest.raises(HubHandleError, match="export_untrained") as err:
        resolve_handle(str(tmp_path / "nowhere"), 5.0)
    assert "model.handle" in str(err.value)


# Offline


def test_unreachable_handle_fails_fast_with_a_one_line_fix(tmp_path, monkeypatch):
    # Given a URL handle that cannot be resolved (offline) and nothing in the hub cache
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "empty_cache"))

    # When the classifier is built
    start = time.perf_counter()
    with pytest.raises(HubHandleError) as err:
        build_hub_classifier(OFFLINE_URL, SIZE, 3, load_timeout_s=10)

    # Then it fails at once with one line naming both settings and the untrained export
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "\n" not in message
    assert isinstance(err.value, UserError)
    for needle in ("model.handle=", "INSECT_EXP_HUB_HANDLE", "export_untrained", "UNTRAINED"):
        assert needle in message, message


def test_server_that_never_answers_fails_within_the_load_timeout(tmp_path, monkeypatch):
    # Given a server that accepts connections but never answers (a stalled network)
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "empty_cache"))
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/mobilenet_v2/feature_vector/4"

    # When a handle on it is resolved with a 1 s timeout, then it gives up in about that time
    start = time.perf_counter()
    try:
        with pytest.raises(HubHandleError, match="model.handle"):
            resolve_handle(url, 1.0)
    finally:
        server.close()
    assert time.perf_counter() - start < 5


# Training recipe


def test_cached_features_train_the_same_head_as_images(tiny_backbone, tmp_path):
    # Given the same seed, data and batch order
    data = _data(tmp_path / "insects")

    # When the head is trained on cached features and, separately, end to end on images
    cached, cached_sink, cached_history = _train(tiny_backbone, data, feature_cache="memory")
    direct, direct_sink, direct_history = _train(tiny_backbone, data, feature_cache="off")

    # Then each image went through the backbone once, and both heads end with the same weights
    assert cached_sink.metrics["backbone_images_computed"] == [(0, len(data.train) + len(data.val))]
    assert "backbone_images_computed" not in direct_sink.metrics
    for a, b in zip(
        cached.get_layer("head").weights, direct.get_layer("head").weights, strict=True
    ):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    for key in ("loss", "val_accuracy"):
        np.testing.assert_allclose(
            [v for _, v in cached_sink.metrics[key]],
            [v for _, v in direct_sink.metrics[key]],
            atol=1e-4,
        )
    # And the full image model carries the trained head, and the last validation's logits on
    # the test split (validation here) are the final model's: no second pass needed for the report
    assert data.val_is_test
    test_images = data.test.images.astype("float32")
    expected = cached.predict(test_images, verbose=0)
    np.testing.assert_allclose(expected, direct.predict(test_images, verbose=0), atol=1e-4)
    np.testing.assert_allclose(cached_history.val_logits, expected, atol=1e-5)
    np.testing.assert_allclose(direct_history.val_logits, expected, atol=1e-4)


def test_disk_cache_reuses_features_until_a_file_or_the_backbone_changes(
    tiny_backbone, other_backbone, tmp_path
):
    # Given a disk cache and a folder of 15 train + 6 test images
    root = tmp_path / "insects"
    cache = tmp_path / "cache"
    options = {"feature_cache": "disk", "feature_cache_dir": str(cache)}
    data = _data(root)
    total = len(data.train) + len(data.val)

    # When the same run is made twice, then the second one computes no feature
    first, sink, _ = _train(tiny_backbone, data, **options)
    assert sink.metrics["backbone_images_computed"] == [(0, total)]
    second, sink, _ = _train(tiny_backbone, data, **options)
    assert sink.metrics["backbone_images_computed"] == [(0, 0)]
    assert sink.metrics["backbone_images_reused"] == [(0, total)]
    for a, b in zip(first.weights, second.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)

    # When one image file changes, then only that image is recomputed
    changed = Path(data.train.paths[0])
    pixels = np.random.default_rng(9).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    keras.utils.save_img(changed, pixels)
    _, sink, _ = _train(tiny_backbone, _data(root), **options)
    assert sink.metrics["backbone_images_computed"] == [(0, 1)]

    # When the backbone or the image size changes, then nothing is reused
    _, sink, _ = _train(other_backbone, _data(root), **options)
    assert sink.metrics["backbone_images_computed"] == [(0, total)]
    resized = load(scan(root), (12, 12))
    keras.utils.set_random_seed(0)
    model = build_hub_classifier(str(tiny_backbone), (12, 12), 3)
    sink = _Sink()
    fit_hub(model, resized, _adam, epochs=1, batch_size=4, seed=0, sink=sink, **options)
    assert sink.metrics["backbone_images_computed"] == [(0, total)]


def test_auto_cache_goes_to_disk_above_the_memory_limit(tiny_backbone, tmp_path):
    data = _data(tmp_path / "insects")
    cache = tmp_path / "cache"
    _train(tiny_backbone, data, feature_cache_dir=str(cache), feature_cache_max_memory_mb=0)
    assert list(cache.rglob("*.features.npy"))
    _train(tiny_backbone, data, feature_cache_dir=str(tmp_path / "unused"))
    assert not (tmp_path / "unused").exists()


def test_augmentation_before_the_backbone_trains_on_images(tiny_backbone, tmp_path):
    # Given random flips in front of the backbone, features change every epoch
    data = _data(tmp_path / "insects")
    model, sink, _ = _train(tiny_backbone, data, augment={"flip": True})

    # Then nothing is cached, and training still reports every epoch
    assert not can_cache_features(model)
    assert "backbone_images_computed" not in sink.metrics
    assert [step for step, _ in sink.metrics["val_accuracy"]] == [0, 1]


def test_unknown_cache_mode_is_a_user_error(tiny_backbone, tmp_path):
    with pytest.raises(UserError, match="feature_cache='ram'"):
        _train(tiny_backbone, _data(tmp_path / "insects"), feature_cache="ram")


@pytest.mark.parametrize("top_layers", [None, 1])
def test_fine_tune_stage_unfreezes_the_backbone_and_continues_the_steps(
    tiny_backbone, tmp_path, top_layers
):
    # Given a frozen-head stage of 2 epochs followed by a fine-tune stage of 2 epochs
    data = _data(tmp_path / "insects")
    before = {w.name: w.numpy() for w in tf.saved_model.load(str(tiny_backbone)).variables}

    # When it trains
    model, sink, _ = _train(
        tiny_backbone,
        data,
        fine_tune_epochs=2,
        fine_tune_learning_rate=0.05,
        fine_tune_top_layers=top_layers,
    )

    # Then epoch metrics run on from step 2, and the backbone weights moved (only the top layer's
    # when asked), while BatchNorm's moving statistics stayed put (inference mode)
    assert [step for step, _ in sink.metrics["val_loss"]] == [0, 1, 2, 3]
    after = {w.name: w.numpy() for w in model.get_layer("backbone").weights}
    moved = {name for name, value in after.items() if not np.allclose(value, before[name])}
    expected = {"top/kernel:0", "top/bias:0"}
    if top_layers is None:
        expected |= {"conv/kernel:0", "conv/bias:0", "bn/gamma:0", "bn/beta:0"}
    assert moved == expected


def test_imagenet_preview_names_images_with_the_labels_file(tiny_classifier):
    handle, labels = tiny_classifier
    names = imagenet_preview(str(handle), str(labels), _images(7))
    assert len(names) == 7
    assert set(names) <= set(TINY_IMAGENET_LABELS)


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


@pytest.mark.slow
def test_untrained_mobilenet_has_the_posts_parameter_counts(untrained_mobilenet):
    # Given the documented export of an untrained MobileNetV2 feature vector
    # When the post's model is built on it for 3 classes at 224x224
    model = build_hub_classifier(str(untrained_mobilenet["feature_vector"]), (224, 224), 3)

    # Then it has the post's 2,261,827 parameters, of which 3,843 trainable
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert (model.count_params(), trainable) == (2_261_827, 3_843)
    assert model.get_layer("backbone").count_params() == 2_257_984
    # And the classifier export speaks the hub classification/4 interface: 1001 logits + labels
    images = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype("float32")
    names = imagenet_preview(
        str(untrained_mobilenet["classifier"]), str(untrained_mobilenet["labels"]), images
    )
    assert len(names) == 2 and all(n.startswith(("untrained_class_", "background")) for n in names)
    assert "UNTRAINED" in (untrained_mobilenet["feature_vector"].parent / "README.txt").read_text()
