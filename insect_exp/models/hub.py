"""TF Hub transfer learning: the post's frozen-backbone classifier and its training recipe.

Handles resolve to a local SavedModel (a path, a module already in TFHUB_CACHE_DIR, or a download
that fails fast offline); a frozen backbone's features are computed once per image and the head
trains on them; an optional second stage fine-tunes the backbone; the ImageNet preview labels
images with a full classifier.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_hub as hub
import tf_keras as keras

from insect_exp import UserError
from insect_exp.callbacks import MetricSink
from insect_exp.data.pipeline import Data, make_dataset
from insect_exp.fit import History, fit_images, predict_logits, train
from insect_exp.models.common import augmentation_layers, compile_classifier
from insect_exp.models.feature_cache import FeatureStore, cached_features, default_cache_dir

log = logging.getLogger(__name__)

EXPORT_COMMAND = "python -m insect_exp.models.export_untrained DIR"
CACHE_MODES = ("auto", "memory", "disk", "off")


class HubHandleError(UserError):
    """A TF Hub handle or labels file cannot be loaded (offline, missing, not a SavedModel)."""


class Setting(NamedTuple):
    """Where the user sets a handle, for error messages: config key, env var, export subdir."""

    key: str
    env: str
    export_path: str


FEATURES_SETTING = Setting("model.handle", "INSECT_EXP_HUB_HANDLE", "DIR/feature_vector")
CLASSIFIER_SETTING = Setting(
    "model.preview.handle", "INSECT_EXP_HUB_CLASSIFIER_HANDLE", "DIR/classifier"
)
LABELS_SETTING = Setting("model.preview.labels", "INSECT_EXP_IMAGENET_LABELS", "DIR/labels.txt")


def _is_remote(handle: str) -> bool:
    return handle.startswith(("http://", "https://", "gs://"))


def _offline_error(what: str, source: str, reason: str, setting: Setting) -> HubHandleError:
    return HubHandleError(
        f"cannot download {what} {source!r} ({reason}). Without network, set "
        f"{setting.key}=/local/path (or export {setting.env}=/local/path); for a smoke run, "
        f"export an UNTRAINED (random-weight) MobileNetV2 with `{EXPORT_COMMAND}` and set "
        f"{setting.key}={setting.export_path}"
    )


def _probe(url: str, timeout_s: float) -> str | None:
    """None if `url` answers an HTTP HEAD within timeout_s, else why not (never blocks longer)."""
    outcome: list[str | None] = []

    def run() -> None:
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout_s):
                outcome.append(None)
        except urllib.error.HTTPError as err:
            # The server answered: the network is up. A missing handle is the resolver's to report.
            outcome.append(f"HTTP {err.code}" if err.code in (404, 410) else None)
        except Exception as err:  # any other failure means unreachable: report why
            reason = getattr(err, "reason", err)
            outcome.append(f"{type(reason).__name__}: {reason}".strip(": "))

    # urlopen's timeout does not cover DNS lookups, which can stall for minutes: wait in a daemon
    # thread and give up on it rather than hang the run.
    thread = threading.Thread(target=run, daemon=True, name="hub-probe")
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s"


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # tensorflow_hub's urlopen has no timeout; a stalled download would otherwise hang forever.
    # The default is process-wide, but only for the download: clients that set their own timeouts
    # (MLflow's REST calls do) are unaffected.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def hub_cache_dir() -> Path:
    """Where tensorflow_hub keeps downloaded modules: $TFHUB_CACHE_DIR, else its temp default."""
    return Path(os.environ.get("TFHUB_CACHE_DIR") or Path(tempfile.gettempdir()) / "tfhub_modules")


def _is_saved_model(path: Path) -> bool:
    return (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()


def resolve_handle(handle: str, timeout_s: float, setting: Setting = FEATURES_SETTING) -> Path:
    """The local SavedModel directory behind `handle`: a path, a TFHUB_CACHE_DIR module, a download.

    Offline, a download fails within about timeout_s instead of hanging.

    Raises:
        HubHandleError: with a one-line message saying which setting to change and how.
    """
    if not _is_remote(handle):
        path = Path(handle.removeprefix("file://")).expanduser()
        if _is_saved_model(path):
            return path.resolve()
        if path.is_dir():
            inner = sorted(p.name for p in path.iterdir() if _is_saved_model(p))
            # An export_untrained output dir holds several models: suggest the one this key wants.
            wanted = Path(setting.export_path).name
            guess = wanted if wanted in inner else (inner or [None])[0]
            hint = f"; did you mean {path / guess}?" if guess else ""
            raise HubHandleError(f"{setting.key}={handle!r} is not a SavedModel directory{hint}")
        raise HubHandleError(
            f"{setting.key}={handle!r} is neither a URL nor an existing SavedModel directory "
            f"(export an UNTRAINED one for offline runs with `{EXPORT_COMMAND}`)"
        )
    # tensorflow_hub caches downloads under sha1(handle); use one without touching the network.
    cached = hub_cache_dir() / hashlib.sha1(handle.encode("utf8")).hexdigest()
    if _is_saved_model(cached):
        return cached
    probe_url = "https://storage.googleapis.com/" if handle.startswith("gs://") else handle
    reason = _probe(probe_url, timeout_s)
    if reason is not None:
        raise _offline_error("TF Hub model", handle, reason, setting)
    try:
        with _socket_timeout(timeout_s):
            return Path(hub.resolve(handle))
    except (OSError, ValueError, tf.errors.OpError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _offline_error("TF Hub model", handle, first_line, setting) from err


class HubBackbone(hub.KerasLayer):
    """hub.KerasLayer that remembers its SavedModel directory and can unfreeze only its top part."""

    def __init__(self, source_dir: Path, trainable: bool = False, **kwargs):
        super().__init__(str(source_dir), trainable=trainable, **kwargs)
        self.source_dir = Path(source_dir)
        # None: every variable trains when the layer is trainable; N: only the top N layers' ones.
        self.top_layers: int | None = None

    def _top(self, weights: list[tf.Variable]) -> list[tf.Variable]:
        # SavedModels name variables "<layer path>/<variable>:0" in build order; the last N
        # distinct layer paths are the top N layers.
        layers = list(dict.fromkeys(w.name.rpartition("/")[0] for w in weights))
        keep = set(layers[-self.top_layers :]) if self.top_layers else set()
        return [w for w in weights if w.name.rpartition("/")[0] in keep]

    @property
    def trainable_weights(self) -> list[tf.Variable]:
        weights = super().trainable_weights
        return weights if self.top_layers is None else self._top(weights)

    @property
    def non_trainable_weights(self) -> list[tf.Variable]:
        if not self.trainable or self.top_layers is None:
            return super().non_trainable_weights
        top = {id(w) for w in self.trainable_weights}
        frozen = [w for w in super().trainable_weights if id(w) not in top]
        return frozen + super().non_trainable_weights


def build_hub_classifier(
    handle: str,
    image_size: Sequence[int],
    num_classes: int,
    *,
    dropout: float = 0.0,
    trainable: bool = False,
    augment: dict | None = None,
    load_timeout_s: float = 20.0,
) -> keras.Model:
    """Raw 0..255 images -> [augmentation] -> Rescaling(1/255) -> hub backbone -> head logits.

    The head is a nested model ("head": [Dropout], Dense logits) so that it can be trained alone
    on cached backbone features and still be the head of the full model.
    """
    # A SavedModel computes in the dtypes it was saved with, whatever Keras's precision policy.
    backbone = HubBackbone(
        resolve_handle(handle, load_timeout_s), trainable, name="backbone", dtype="float32"
    )
    height, width = (int(v) for v in image_size)
    images = keras.Input(shape=(height, width, 3), name="images")
    x = images
    for layer in augmentation_layers(**(augment or {})):
        x = layer(x)
    x = keras.layers.Rescaling(1.0 / 255, name="rescaling")(x)
    try:
        # training=False keeps BatchNorm on its moving statistics even while fine-tuning (the
        # Keras transfer-learning advice), which also makes frozen features a pure function.
        features = backbone(x, training=False)
    except (ValueError, TypeError) as err:
        raise HubHandleError(
            f"the SavedModel at {str(backbone.source_dir)!r} does not take {height}x{width} RGB "
            f"images (set model.image_size to its input size): {str(err).splitlines()[0]}"
        ) from err
    if features.shape.rank != 2:
        raise HubHandleError(
            f"the SavedModel at {str(backbone.source_dir)!r} outputs shape {features.shape}, not "
            "a feature vector [batch, features]; use a feature_vector handle"
        )
    head_layers: list[keras.layers.Layer] = [keras.Input(shape=(features.shape[-1],))]
    if dropout > 0:
        head_layers.append(keras.layers.Dropout(dropout))
    head_layers.append(keras.layers.Dense(num_classes, name="logits", dtype="float32"))
    head = keras.Sequential(head_layers, name="head")
    return keras.Model(images, head(features), name="hub_classifier")


def backbone_of(model: keras.Model) -> HubBackbone:
    return model.get_layer("backbone")


def feature_extractor(model: keras.Model) -> keras.Model:
    """The part of a hub classifier that maps raw images to backbone features."""
    return keras.Model(model.input, backbone_of(model).output, name="feature_extractor")


def can_cache_features(model: keras.Model) -> bool:
    """True when training cannot change the features: frozen backbone, no random layer before it."""
    before = model.layers[: model.layers.index(backbone_of(model))]
    fixed = (keras.layers.InputLayer, keras.layers.Rescaling)
    return all(isinstance(layer, fixed) for layer in before) and not backbone_of(model).trainable


def unfreeze(model: keras.Model, top_layers: int | None = None) -> int:
    """Make the backbone trainable, all of it or its top N layers; return its trainable params."""
    backbone = backbone_of(model)
    backbone.trainable = True
    backbone.top_layers = top_layers
    return int(sum(np.prod(w.shape) for w in backbone.trainable_weights))


def _choose_cache(mode: str, num_images: int, feature_dim: int, max_memory_mb: int) -> str:
    if mode not in CACHE_MODES:
        raise UserError(f"model.feature_cache={mode!r}; choose one of {', '.join(CACHE_MODES)}")
    if mode != "auto":
        return mode
    megabytes = num_images * feature_dim * 4 / 2**20
    return "memory" if megabytes <= max_memory_mb else "disk"


def fit_hub(
    model: keras.Model,
    data: Data,
    make_optimizer: Callable[[float | None], keras.optimizers.Optimizer],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    shuffle_buffer: int | None = None,
    feature_cache: str = "auto",
    feature_cache_dir: str | None = None,
    feature_cache_max_memory_mb: int = 2048,
    fine_tune_epochs: int = 0,
    fine_tune_learning_rate: float = 1e-5,
    fine_tune_top_layers: int | None = None,
    sink: MetricSink | None = None,
) -> History:
    """Train the head (on cached backbone features when possible), then optionally fine-tune.

    Cached features go through the same shuffle (seed, buffer) and batches as images would, so
    the head sees the same batches in the same order and ends with the same weights.

    Args:
        make_optimizer: a fresh optimizer with the given learning rate (None: the configured one).
        fine_tune_epochs: epochs of the second stage with the backbone unfrozen; 0 skips it.
    """
    fit_args = {"batch_size": batch_size, "seed": seed, "shuffle_buffer": shuffle_buffer}
    dim = int(backbone_of(model).output.shape[-1])
    num_images = len(data.train) + len(data.val)
    mode = _choose_cache(feature_cache, num_images, dim, feature_cache_max_memory_mb)
    if mode != "off" and can_cache_features(model):
        store = None
        if mode == "disk":
            root = Path(feature_cache_dir or default_cache_dir()).expanduser()
            store = FeatureStore(root, backbone_of(model).source_dir)
        history = _fit_head_on_features(
            model, data, make_optimizer(None), store, epochs, sink, **fit_args
        )
    else:
        if mode != "off":
            log.info("no feature cache: the backbone trains or augmentation runs before it")
        compile_classifier(model, make_optimizer(None))
        history = fit_images(model, data.train, data.val, epochs=epochs, sink=sink, **fit_args)
    if fine_tune_epochs > 0:
        trainable = unfreeze(model, fine_tune_top_layers)
        log.info("fine-tuning %d backbone parameters for %d epochs", trainable, fine_tune_epochs)
        compile_classifier(model, make_optimizer(fine_tune_learning_rate))
        # A new seed so that the second stage does not replay the first one's batch order.
        stage_args = {**fit_args, "seed": seed + history.num_epochs}
        history.extend(
            _fit_more(model, data, fine_tune_epochs, history.num_epochs, sink, **stage_args)
        )
    return history


def _fit_head_on_features(
    model: keras.Model,
    data: Data,
    optimizer: keras.optimizers.Optimizer,
    store: FeatureStore | None,
    epochs: int,
    sink: MetricSink | None,
    **fit_args,
) -> History:
    """Compute each image's backbone features once (or reuse stored ones); train the head."""
    extractor = feature_extractor(model)
    batch_size = fit_args["batch_size"]
    train_f, train_new = cached_features(extractor, data.train, batch_size, store)
    val_f, val_new = cached_features(extractor, data.val, batch_size, store)
    computed = train_new + val_new
    reused = len(data.train) + len(data.val) - computed
    log.info("backbone features: %d computed, %d reused", computed, reused)
    if sink is not None:
        sink({"backbone_images_computed": computed, "backbone_images_reused": reused}, 0)
    head = model.get_layer("head")
    compile_classifier(head, optimizer)
    history = fit_images(head, train_f, val_f, epochs=epochs, sink=sink, **fit_args)
    # A test split apart from validation: its features through the head alone give its logits.
    if data.test is not None and not data.val_is_test:
        test_f, _ = cached_features(extractor, data.test, batch_size, store)
        history.test_logits = predict_logits(head, test_f, batch_size)
    return history


def _fit_more(
    model: keras.Model,
    data: Data,
    epochs: int,
    first_epoch: int,
    sink: MetricSink | None,
    *,
    batch_size: int,
    seed: int,
    shuffle_buffer: int | None,
) -> History:
    """Train the compiled full model on images, numbering epochs on from first_epoch."""
    return train(
        model,
        make_dataset(data.train, batch_size, True, seed, shuffle_buffer),
        data.val,
        epochs=epochs,
        num_train=len(data.train),
        batch_size=batch_size,
        sink=sink,
        first_epoch=first_epoch,
    )


def read_labels(source: str, timeout_s: float) -> list[str]:
    """Class names, one a line, from a local file or a URL (failing fast when offline)."""
    if not _is_remote(source):
        path = Path(source.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise HubHandleError(
                f"{LABELS_SETTING.key}={source!r} is not a file (a URL or a path to a labels "
                f"file, one class name a line; `{EXPORT_COMMAND}` writes placeholder ones)"
            )
        return path.read_text().splitlines()
    reason = _probe(source, timeout_s)
    if reason is None:
        try:
            with urllib.request.urlopen(source, timeout=timeout_s) as response:
                return response.read().decode("utf8").splitlines()
        except (OSError, ValueError) as err:
            reason = str(getattr(err, "reason", err))
    raise _offline_error("labels", source, reason, LABELS_SETTING)


def imagenet_preview(
    handle: str, labels: str, images: np.ndarray, timeout_s: float = 20.0, batch_size: int = 32
) -> list[str]:
    """The post's preview: a full classifier's predicted class name for each raw 0..255 image."""
    names = read_labels(labels, timeout_s)
    classifier = hub.KerasLayer(str(resolve_handle(handle, timeout_s, CLASSIFIER_SETTING)))
    logits = np.concatenate(
        [
            classifier(tf.constant(images[i : i + batch_size], tf.float32) / 255.0).numpy()
            for i in range(0, len(images), batch_size)
        ]
    )
    if logits.shape[-1] != len(names):
        raise HubHandleError(
            f"{LABELS_SETTING.key} has {len(names)} names but the classifier at "
            f"{handle!r} outputs {logits.shape[-1]} classes"
        )
    return [names[i] for i in logits.argmax(axis=-1)]
