"""Training-recipe options change training as they say: schedules, AdamW, smoothing, class weights,
early stopping, augmentation; and the train job logs them to MLflow."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from mlflow.tracking import MlflowClient

from insect_exp import train
from insect_exp.callbacks import Validation, scores
from insect_exp.config import (
    AdamConfig,
    AdamWConfig,
    AugmentConfig,
    ClassWeight,
    EarlyStoppingConfig,
    Monitor,
    Schedule,
    SGDConfig,
)
from insect_exp.data.pipeline import ImageSplit, make_dataset
from insect_exp.fit import (
    FitSettings,
    Stage,
    class_weights,
    compile_classifier,
    epoch_learning_rate,
    fit,
    make_optimizer,
)
from insect_exp.models.layers import augmentation_layers

SIZE = 8  # image side: every model here is Rescaling + Flatten + Dense on 8x8x3 pixels


def _split(labels, seed: int = 0, bright_class: int | None = None) -> ImageSplit:
    """Random 8x8 RGB images with these labels; `bright_class` images are brighter (learnable)."""
    labels = np.asarray(labels, dtype=np.int32)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 128, (len(labels), SIZE, SIZE, 3), dtype=np.uint8)
    if bright_class is not None:
        images[labels == bright_class] += 127
    return ImageSplit(images, labels, [f"img_{i}.png" for i in range(len(labels))])


def _linear_model(num_classes: int = 2, seed: int = 0, trainable: bool = True) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            keras.layers.Rescaling(1.0 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(num_classes, name="logits"),
        ]
    )
    model.trainable = trainable
    return model


def _settings(optimizer, epochs: int, batch_size: int = 4, **kwargs) -> FitSettings:
    return FitSettings(epochs=epochs, batch_size=batch_size, seed=0, optimizer=optimizer, **kwargs)


class _Sink:
    """A metric sink that records each epoch's metrics and, optionally, the model's weights.

    Per-batch values (batch_loss, batch_accuracy) that reach the same sink are left out.
    """

    def __init__(self, model: keras.Model | None = None):
        self.model = model
        self.steps: list[int] = []
        self.metrics: list[dict[str, float]] = []
        self.weights: dict[int, list[np.ndarray]] = {}

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if "loss" not in metrics:
            return  # a batch's values, not an epoch's
        self.steps.append(step)
        self.metrics.append(dict(metrics))
        if self.model is not None:
            self.weights[step] = [w.copy() for w in self.model.get_weights()]

    def values(self, key: str) -> list[float]:
        return [m[key] for m in self.metrics]


def _fit_lr(optimizer_cfg, epochs: int, model: keras.Model | None = None) -> tuple[list, list]:
    """Fit a tiny model with this optimizer config; the lr per epoch from History and the sink."""
    model = model or _linear_model()
    compile_classifier(model, make_optimizer(optimizer_cfg))
    sink = _Sink()
    settings = _settings(optimizer_cfg, epochs)
    fitted = fit(model, _split([0, 1] * 4), _split([0, 1] * 2, seed=1), settings, sink, verbose=0)
    assert sink.steps == list(range(epochs))  # every epoch's metrics reach the sink, lr among them
    return fitted.history.epochs["lr"], sink.values("lr")


# Learning-rate schedules


def test_cosine_schedule_warms_up_linearly_then_decays_to_the_floor():
    # Given Adam at 0.01 with cosine decay to 0.001 after 2 warm-up epochs, over 6 epochs
    cfg = AdamConfig(
        learning_rate=0.01, schedule=Schedule.cosine, warmup_epochs=2, min_learning_rate=0.001
    )

    # When a model trains with it
    history_lr, sink_lr = _fit_lr(cfg, epochs=6)

    # Then each epoch trained at: base * (e + 1) / 3 during warm-up, then
    # floor + (base - floor) * (1 + cos(pi * (e - 2) / 3)) / 2, the last epoch at the floor
    def cosine(e: int) -> float:
        return 0.001 + 0.5 * 0.009 * (1 + math.cos(math.pi * (e - 2) / 3))

    expected = [0.01 / 3, 0.02 / 3, 0.01, cosine(3), cosine(4), cosine(5)]
    assert history_lr == pytest.approx(expected, rel=1e-6)
    assert sink_lr == pytest.approx(expected, rel=1e-6)
    rate = epoch_learning_rate(cfg, 6)
    assert history_lr == pytest.approx([rate(e) for e in range(6)], rel=1e-6)
    # And it rises during warm-up, peaks at the base rate, then decays every epoch to the floor
    assert history_lr[0] < history_lr[1] < history_lr[2]
    assert history_lr[2] > history_lr[3] > history_lr[4] > history_lr[5]
    assert history_lr[5] == pytest.approx(0.001)


@pytest.mark.parametrize(
    ("floor", "expected"),
    [(0.0, [0.1, 0.1, 0.05, 0.05, 0.025]), (0.03, [0.1, 0.1, 0.05, 0.05, 0.03])],
    ids=["no-floor", "floor"],
)
def test_step_schedule_multiplies_the_rate_by_decay_factor_every_decay_epochs(floor, expected):
    # Given SGD at 0.1 halved every 2 epochs (and maybe a floor of 0.03)
    cfg = SGDConfig(
        learning_rate=0.1,
        schedule=Schedule.step,
        decay_epochs=2,
        decay_factor=0.5,
        min_learning_rate=floor,
    )

    # When a model trains with it for 5 epochs
    history_lr, sink_lr = _fit_lr(cfg, epochs=5)

    # Then the rate drops by half every second epoch, never below the floor
    assert history_lr == pytest.approx(expected, rel=1e-6)
    assert sink_lr == pytest.approx(expected, rel=1e-6)


def test_reduce_on_plateau_lowers_the_rate_after_plateau_patience_flat_epochs():
    # Given a frozen model, so val_loss never improves after the first epoch, and a rate halved
    # after 2 epochs without a better val_loss
    cfg = SGDConfig(
        learning_rate=0.1, schedule=Schedule.reduce_on_plateau, decay_factor=0.5, plateau_patience=2
    )

    # When it trains for 7 epochs
    history_lr, sink_lr = _fit_lr(cfg, epochs=7, model=_linear_model(trainable=False))

    # Then epoch 0 sets the best val_loss, epochs 1-2 are flat, so epoch 3 trains at half the rate;
    # two more flat epochs (3-4) halve it again for epoch 5 on
    expected = [0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    assert history_lr == pytest.approx(expected, rel=1e-6)
    assert sink_lr == pytest.approx(expected, rel=1e-6)


def test_constant_schedule_keeps_the_rate_and_logs_it_every_epoch():
    # Given Adam at 0.003 with no schedule
    cfg = AdamConfig(learning_rate=0.003, schedule=Schedule.constant)

    # When a model trains with it for 3 epochs
    history_lr, sink_lr = _fit_lr(cfg, epochs=3)

    # Then every epoch reports the same rate
    assert history_lr == pytest.approx([0.003] * 3, rel=1e-6)
    assert sink_lr == pytest.approx([0.003] * 3, rel=1e-6)


# AdamW


def test_make_optimizer_gives_adamw_with_the_configured_weight_decay():
    # Given an AdamW config
    cfg = AdamWConfig(learning_rate=0.002, weight_decay=0.05, beta_1=0.8)

    # When it becomes a Keras optimizer
    optimizer = make_optimizer(cfg)

    # Then it is tf_keras's AdamW with those options
    assert isinstance(optimizer, keras.optimizers.AdamW)
    assert optimizer.weight_decay == pytest.approx(0.05)
    assert float(optimizer.learning_rate) == pytest.approx(0.002)
    assert float(optimizer.beta_1) == pytest.approx(0.8)


def test_the_optimizer_built_from_config_clips_gradients_only_when_clipnorm_is_set():
    # Given an optimizer config with optimizer.clipnorm, and one without
    clipped = make_optimizer(SGDConfig(learning_rate=1.0, momentum=0.0, clipnorm=0.5))
    plain = make_optimizer(SGDConfig(learning_rate=1.0, momentum=0.0))

    # Then only the first clips, and a step of gradient (3, 4) moves the weights by 0.5 only
    assert clipped.clipnorm == 0.5 and plain.clipnorm is None
    weights = tf.Variable([0.0, 0.0])
    clipped.apply_gradients([(tf.constant([3.0, 4.0]), weights)])
    np.testing.assert_allclose(weights.numpy(), [-0.3, -0.4], rtol=1e-6)


def test_adamw_weight_decay_shrinks_the_weights_by_lr_times_decay_on_each_step():
    # Given two identical models and data in one batch (a single optimizer step per epoch)
    lr, decay = 0.01, 0.2
    train_split, val_split = _split([0, 1] * 4), _split([0, 1], seed=1)

    def one_step(weight_decay: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
        model = _linear_model(seed=3)
        initial = model.get_weights()
        cfg = AdamWConfig(learning_rate=lr, weight_decay=weight_decay)
        compile_classifier(model, make_optimizer(cfg))
        fit(model, train_split, val_split, _settings(cfg, epochs=1, batch_size=8), verbose=0)
        return initial, model.get_weights()

    # When one trains with AdamW(weight_decay=0.2) and the other with weight_decay=0
    initial, decayed = one_step(decay)
    _, plain = one_step(0.0)

    # Then both took the same Adam step, and AdamW also subtracted lr * weight_decay * w
    # (decoupled from the gradient), so the kernel moved by exactly that
    for w0, w_decayed, w_plain in zip(initial, decayed, plain, strict=True):
        np.testing.assert_allclose(w_decayed, w_plain - lr * decay * w0, atol=1e-6)
    assert np.abs(decayed[0] - plain[0]).max() > 1e-4


# Label smoothing


def test_label_smoothing_changes_the_loss_to_cross_entropy_against_smoothed_targets():
    # Given a model with fixed weights, its logits on some images, and smoothing 0.2
    split = _split([0, 1, 2] * 4)
    model = _linear_model(num_classes=3)
    images = split.images.astype("float32")
    logits = model.predict(images, verbose=0)

    # When it is compiled with and without label smoothing and evaluated
    compile_classifier(model, keras.optimizers.SGD(0.0), label_smoothing=0.2)
    smoothed, _ = model.evaluate(images, split.labels, batch_size=5, verbose=0)
    compile_classifier(model, keras.optimizers.SGD(0.0))
    plain, _ = model.evaluate(images, split.labels, batch_size=5, verbose=0)

    # Then the smoothed loss is cross-entropy against (1 - s) * one_hot + s / 3, as scores says
    expected = scores(logits, split.labels, 0.2)["loss"]
    assert smoothed == pytest.approx(expected, abs=1e-5)
    assert plain == pytest.approx(scores(logits, split.labels)["loss"], abs=1e-5)
    # And it differs from the unsmoothed loss
    assert abs(smoothed - plain) > 1e-3


def test_validation_loss_with_smoothing_matches_keras_validation_data():
    # Given the same seeded model and data, trained by fit and by Keras with validation_data,
    # both with smoothing 0.3, one batch an epoch (so the shuffle order does not matter)
    train_split = _split([0, 1, 2] * 4, bright_class=1)
    val_split = _split([0, 1, 2] * 2, seed=1, bright_class=1)
    cfg = AdamConfig(learning_rate=0.05)
    settings = _settings(cfg, epochs=3, batch_size=16, label_smoothing=0.3)

    def compiled() -> keras.Model:
        model = _linear_model(num_classes=3)
        compile_classifier(model, make_optimizer(cfg), label_smoothing=0.3)
        return model

    ours = fit(compiled(), train_split, val_split, settings, verbose=0).history.epochs
    model = compiled()
    train_ds = make_dataset(train_split, 16)
    val_ds = make_dataset(val_split, 4)
    theirs = model.fit(train_ds, epochs=3, validation_data=val_ds, verbose=0).history

    # Then every epoch's val_loss and val_accuracy match Keras's own
    for key in ("loss", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    # And the smoothed val_loss is not the plain one
    logits = model.predict(val_ds, verbose=0)
    plain = scores(logits, val_split.labels)["loss"]
    assert abs(ours["val_loss"][-1] - plain) > 1e-3
    # And Validation on its own reports the smoothed loss of those logits
    validation = Validation(val_ds.map(lambda x, _: x), val_split.labels, 0.3)
    validation.set_model(model)
    logs: dict[str, float] = {}
    validation.on_epoch_end(0, logs)
    assert logs["val_loss"] == pytest.approx(scores(logits, val_split.labels, 0.3)["loss"])


# Class weights


def test_balanced_class_weights_are_n_over_classes_times_class_count():
    labels = np.array([0] * 12 + [1] * 3)

    assert class_weights(labels, 2, ClassWeight.balanced) == pytest.approx({0: 0.625, 1: 2.5})
    assert class_weights(labels, 2, ClassWeight.none) == {}


@pytest.mark.parametrize("mode", [ClassWeight.balanced, ClassWeight.none])
def test_balanced_class_weight_weighs_each_sample_loss_by_its_class(mode):
    # Given 12 images of class 0 and 3 of class 1, one batch holding them all, and a model that
    # does not change while training (learning rate 0)
    split = _split([0] * 12 + [1] * 3, bright_class=1)
    model = _linear_model()
    logits = model.predict(split.images.astype("float32"), verbose=0)
    compile_classifier(model, keras.optimizers.SGD(0.0))
    settings = _settings(SGDConfig(), epochs=1, batch_size=16, class_weight=mode)

    # When it trains one epoch
    history = fit(model, split, _split([0, 1], seed=1), settings, verbose=0).history

    # Then the training loss is sum(w_i * l_i) / n: each class's mean loss counts the same
    # (balanced), or each image does (none)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    per_sample = -log_probs[np.arange(len(split)), split.labels]
    weights = np.where(split.labels == 0, 15 / (2 * 12), 15 / (2 * 3))
    weighted = float((weights * per_sample).sum() / len(split))
    unweighted = float(per_sample.mean())
    assert abs(weighted - unweighted) > 1e-3
    expected = weighted if mode is ClassWeight.balanced else unweighted
    assert history.epochs["loss"] == pytest.approx([expected], rel=1e-5)


# Early stopping


def _diverging_fit(
    early_stopping: EarlyStoppingConfig, epochs: int = 10, first_epoch: int = 0
) -> tuple[keras.Model, _Sink, object, ImageSplit]:
    """Fit on a learnable split, validating on the same images with the labels swapped: the
    training loss falls every epoch while val_loss rises."""
    train_split = _split([0, 1] * 4, bright_class=1)
    val_split = ImageSplit(train_split.images, 1 - train_split.labels, train_split.paths)
    model = _linear_model()
    cfg = SGDConfig(learning_rate=0.01, momentum=0.0)
    compile_classifier(model, make_optimizer(cfg))
    sink = _Sink(model)
    settings = _settings(cfg, epochs=epochs, batch_size=8, early_stopping=early_stopping)
    fitted = fit(
        model, train_split, val_split, settings, sink,
        Stage(epochs=epochs, first_epoch=first_epoch), verbose=0,
    )  # fmt: skip
    return model, sink, fitted, val_split


def test_early_stopping_stops_when_val_loss_worsens_and_restores_the_best_weights():
    # Given val_loss that gets worse every epoch, patience 2, restore_best, and a later stage
    # whose epochs are numbered from 4
    es = EarlyStoppingConfig(enabled=True, monitor=Monitor.val_loss, patience=2, restore_best=True)

    # When it trains for up to 10 epochs
    model, sink, fitted, _ = _diverging_fit(es, epochs=10, first_epoch=4)

    # Then val_loss did worsen, training stopped after 2 epochs without a better one, and the
    # best and stopped epochs are numbered as the logged steps are
    history = fitted.history
    val_loss = history.epochs["val_loss"]
    assert val_loss[0] < val_loss[1] < val_loss[2]
    assert history.num_epochs == 3 < 10
    assert sink.steps == [4, 5, 6]
    assert history.best_epoch == 4
    assert history.stopped_epoch == 6
    # And the model ends with the best epoch's weights, not the last one's
    for final, best in zip(model.get_weights(), sink.weights[4], strict=True):
        np.testing.assert_array_equal(final, best)
    changed = zip(sink.weights[4], sink.weights[6], strict=True)
    assert any(not np.array_equal(best, last) for best, last in changed)
    # And no validation logits are handed on: they belong to the last epoch's weights
    assert fitted.val_logits is None


def test_early_stopping_without_restore_best_keeps_the_last_weights_and_their_logits():
    # Given the same worsening val_loss, without restore_best
    es = EarlyStoppingConfig(enabled=True, monitor=Monitor.val_loss, patience=1, restore_best=False)

    # When it trains for up to 10 epochs
    model, sink, fitted, val_split = _diverging_fit(es, epochs=10)

    # Then it stops after one epoch without improvement, keeping the last epoch's weights
    assert fitted.history.num_epochs == 2
    assert fitted.history.best_epoch == 0 and fitted.history.stopped_epoch == 1
    for final, last in zip(model.get_weights(), sink.weights[1], strict=True):
        np.testing.assert_array_equal(final, last)
    # And the validation logits are the final model's
    expected = model.predict(val_split.images.astype("float32"), verbose=0)
    np.testing.assert_allclose(fitted.val_logits, expected, rtol=1e-5, atol=1e-6)


def test_early_stopping_watches_the_configured_monitor():
    # Given the same run, watching the training loss, which improves every epoch
    es = EarlyStoppingConfig(enabled=True, monitor=Monitor.loss, patience=1)

    # When it trains for 5 epochs
    _, sink, fitted, _ = _diverging_fit(es, epochs=5)

    # Then it never stops, and the best epoch is the last
    history = fitted.history
    assert np.all(np.diff(history.epochs["loss"]) < 0)
    assert history.num_epochs == 5 and sink.steps == [0, 1, 2, 3, 4]
    assert history.stopped_epoch is None
    assert history.best_epoch == 4
    assert fitted.val_logits is not None


def test_early_stopping_on_val_accuracy_stops_when_accuracy_cannot_improve():
    # Given a frozen model (val_accuracy stays put) watched on val_accuracy, patience 3
    model = _linear_model(trainable=False)
    cfg = AdamConfig()
    compile_classifier(model, make_optimizer(cfg))
    es = EarlyStoppingConfig(enabled=True, monitor=Monitor.val_accuracy, patience=3)

    # When it trains for up to 10 epochs
    fitted = fit(
        model, _split([0, 1] * 4), _split([0, 1] * 2, seed=1),
        _settings(cfg, epochs=10, early_stopping=es), verbose=0,
    )  # fmt: skip

    # Then it stops after 3 epochs without a better val_accuracy than the first
    assert fitted.history.num_epochs == 4
    assert fitted.history.best_epoch == 0 and fitted.history.stopped_epoch == 3


def test_early_stopping_on_val_accuracy_takes_the_highest_accuracy_as_best():
    # Given a model that starts out calling every image class 0 and learns the bright class 1
    # within a few epochs (val_accuracy 0.5, 0.5, 0.75, then 1.0), watched on val_accuracy
    split = _split([0, 1] * 8, bright_class=1)
    model = _linear_model()
    model.get_layer("logits").bias.assign([2.0, 0.0])
    cfg = SGDConfig(learning_rate=0.01, momentum=0.0)
    compile_classifier(model, make_optimizer(cfg))
    es = EarlyStoppingConfig(enabled=True, monitor=Monitor.val_accuracy, patience=2)
    settings = _settings(cfg, epochs=10, batch_size=16, early_stopping=es)

    # When it trains for up to 10 epochs
    history = fit(model, split, split, settings, verbose=0).history

    # Then a higher accuracy counts as better: the best epoch is the first at the highest
    # val_accuracy, and training stops 2 epochs after it
    accuracy = history.epochs["val_accuracy"]
    best = int(np.argmax(accuracy))
    assert accuracy[0] < accuracy[best] == 1.0 and best > 0
    assert history.best_epoch == best
    assert history.stopped_epoch == best + 2 and history.num_epochs == best + 3 < 10


def test_a_later_stage_without_schedule_keeps_the_rate_and_never_stops_early():
    # Given a step schedule and early stopping with patience 0 on a model whose val_loss is flat
    cfg = SGDConfig(learning_rate=0.1, schedule=Schedule.step, decay_epochs=1, decay_factor=0.5)
    es = EarlyStoppingConfig(enabled=True, patience=0)
    model = _linear_model(trainable=False)
    compile_classifier(model, make_optimizer(cfg))
    sink = _Sink()

    # When it trains as a later stage (no schedule), numbered from epoch 5
    fitted = fit(
        model, _split([0, 1] * 4), _split([0, 1] * 2, seed=1),
        _settings(cfg, epochs=3, early_stopping=es), sink,
        Stage(first_epoch=5, schedule=False), verbose=0,
    )  # fmt: skip

    # Then every epoch runs at the optimizer's own rate, with no stopping reported
    assert fitted.history.epochs["lr"] == pytest.approx([0.1] * 3, rel=1e-6)
    assert sink.steps == [5, 6, 7]
    assert fitted.history.stopped_epoch is None and fitted.history.best_epoch is None


def test_without_early_stopping_every_epoch_runs_and_no_best_epoch_is_reported():
    # Given the worsening val_loss, with early stopping disabled
    _, sink, fitted, _ = _diverging_fit(EarlyStoppingConfig(enabled=False), epochs=4)

    # Then all epochs run and no stopping epochs are reported
    assert fitted.history.num_epochs == 4 and sink.steps == [0, 1, 2, 3]
    assert fitted.history.stopped_epoch is None and fitted.history.best_epoch is None


# Augmentation


def _mirrored_or_same(
    out: np.ndarray, images: np.ndarray, axis: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per image: unchanged or mirrored along `axis` (1: rows, 2: columns); and mirrored."""
    same = np.all(out == images, axis=(1, 2, 3))
    mirrored = np.all(out == np.flip(images, axis=axis), axis=(1, 2, 3))
    return same | mirrored, mirrored


@pytest.mark.parametrize(
    "option",
    [
        {"flip": True},
        {"vertical_flip": True},
        {"rotation": 0.2},
        {"zoom": 0.3},
        {"translation": 0.3},
        {"contrast": 0.5},
        {"brightness": 0.3},
    ],
    ids=lambda option: next(iter(option)),
)
def test_each_augmentation_changes_images_in_training_only(option):
    # Given the augmentation layers for one option, and a batch of random 16x16 images
    keras.utils.set_random_seed(0)
    (layer,) = augmentation_layers(AugmentConfig(**option))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 16, 16, 3)).astype("float32")

    # When they run in training and in inference
    trained = np.asarray(layer(tf.constant(images), training=True))
    inferred = np.asarray(layer(tf.constant(images), training=False))

    # Then training changes the images and inference leaves them as they are
    assert trained.shape == images.shape
    assert np.abs(trained - images).max() > 1.0
    np.testing.assert_array_equal(inferred, images)
    # And flips mirror along their own axis, image by image
    if "flip" in option or "vertical_flip" in option:
        axis = 2 if "flip" in option else 1
        ok, mirrored = _mirrored_or_same(trained, images, axis)
        assert ok.all() and mirrored.any()


def test_flips_in_both_directions_are_one_layer():
    assert augmentation_layers(AugmentConfig()) == []
    (layer,) = augmentation_layers(AugmentConfig(flip=True, vertical_flip=True))
    assert layer.mode == "horizontal_and_vertical"


def test_brightness_shifts_raw_pixels_by_up_to_factor_times_255():
    # Given mid-grey images in the 0..255 range (no clipping at either end) and brightness 0.3
    keras.utils.set_random_seed(0)
    (layer,) = augmentation_layers(AugmentConfig(brightness=0.3))
    images = np.full((16, 4, 4, 3), 128.0, dtype="float32")

    # When it runs in training
    shifted = np.asarray(layer(tf.constant(images), training=True))

    # Then each image moves by one offset within +-0.3 * 255 pixel levels, and the offsets are
    # in pixel levels (tens), not in a 0..1 range
    offsets = shifted.reshape(16, -1) - 128.0
    np.testing.assert_allclose(offsets, offsets[:, :1].repeat(offsets.shape[1], axis=1), atol=1e-3)
    assert np.abs(offsets).max() <= 0.3 * 255 + 1e-3
    assert np.abs(offsets).max() > 10
    assert shifted.min() >= 0 and shifted.max() <= 255


# End to end


def test_train_logs_the_recipe_options_and_the_step_schedule_to_mlflow(
    compose_cfg, tracking_uri, image_folder
):
    # Given the real config with a step schedule, early stopping, smoothing and class weights
    cfg = compose_cfg(
        "dataset=insects", f"dataset.root={image_folder}", "epochs=3",
        "optimizer.schedule=step", "optimizer.decay_epochs=1",
        "train.early_stopping.enabled=true", "loss.label_smoothing=0.1",
        "dataset.class_weight=balanced", "mlflow.log_model=false",
    )  # fmt: skip

    # When the train job runs
    train.run(cfg)

    # Then training got the options
    settings = FitSettings.from_config(cfg)
    assert settings.label_smoothing == 0.1 and settings.class_weight is ClassWeight.balanced
    assert settings.early_stopping.enabled and settings.optimizer.schedule is Schedule.step
    # And the run finished, with the options among its params
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("insect_exp").experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["optimizer.schedule"] == "step"
    assert params["loss.label_smoothing"] == "0.1"
    assert params["dataset.class_weight"] == "balanced"
    assert params["train.early_stopping.enabled"] == "True"
    # And one lr per trained epoch, multiplied by the decay factor every epoch
    trained = client.get_metric_history(run.info.run_id, "loss")
    lr = sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)
    assert [m.step for m in lr] == sorted(m.step for m in trained)
    base, factor = cfg.optimizer.learning_rate, cfg.optimizer.decay_factor
    expected = [base * factor**m.step for m in lr]
    assert [m.value for m in lr] == pytest.approx(expected, rel=1e-6)
    assert len(lr) == 3  # patience 3 cannot stop 3 epochs
    # And the best epoch is logged
    assert 0 <= run.data.metrics["best_epoch"] <= 2
