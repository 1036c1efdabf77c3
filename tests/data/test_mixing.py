"""Mixup and cutmix (train.mixup_alpha, train.cutmix_alpha): soft targets that match the mixed
pixels, draws that a resume repeats, a stop epoch, the loss and accuracy on soft targets, and a
run of the command line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient

from insect_exp.data.mixing import Mixing, batch_key, mix_batch
from insect_exp.data.pipeline import ImageSplit
from insect_exp.fit import BatchEdits, Crossentropy, accuracy, train_batches
from tests.conftest import make_image_folder, run_cli

CLASSES = 3


def _black_and_white() -> tuple[tf.Tensor, tf.Tensor]:
    """Four 8x8 images: two black ones of class 0, then two white ones of class 1.

    Each image is mixed with the one at the mirrored place: the first black with the last white.
    """
    images = np.zeros((4, 8, 8, 3), np.float32)
    images[2:] = 255.0
    return tf.constant(images), tf.constant([0, 0, 1, 1], tf.int32)


def _mixed(mixing: Mixing, batch: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _black_and_white()
    mixed, targets = mix_batch(images, labels, CLASSES, mixing, batch_key(7, 0, batch))
    return mixed.numpy(), targets.numpy()


def test_mixup_targets_are_the_two_labels_weighted_as_the_pixels_are_blended():
    shares = []
    for batch in range(8):
        # When a black image (class 0) is mixed up with a white one (class 1)
        images, targets = _mixed(Mixing(mixup_alpha=1.0), batch)

        # Then every pixel is white * (1 - share), and the targets are share, 1 - share
        first = images[0]
        share = 1 - first[0, 0, 0] / 255
        np.testing.assert_allclose(first, (1 - share) * 255, rtol=1e-5)
        np.testing.assert_allclose(targets[0], [share, 1 - share, 0], atol=1e-5)
        np.testing.assert_allclose(targets.sum(axis=1), 1, rtol=1e-6)
        shares.append(share)
    # And the shares are Beta(1, 1) draws: spread out, none at the ends
    assert min(shares) > 0 and max(shares) < 1 and np.ptp(shares) > 0.3


def test_cutmix_target_share_is_the_area_of_the_image_left():
    pasted_some = False
    for batch in range(8):
        # When a white box is pasted into a black image
        images, targets = _mixed(Mixing(cutmix_alpha=1.0), batch)

        # Then pixels are either black or white, and the white area is the second label's share
        first = images[0]
        assert set(np.unique(first)) <= {0.0, 255.0}
        white = (first[..., 0] == 255).mean()
        np.testing.assert_allclose(targets[0], [1 - white, white, 0], atol=1e-6)
        pasted_some |= 0 < white < 1
    assert pasted_some


def test_both_on_with_switch_probability_one_always_cuts_and_zero_always_blends():
    for batch in range(4):
        cut, _ = _mixed(Mixing(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0), batch)
        blend, _ = _mixed(Mixing(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.0), batch)
        assert set(np.unique(cut)) <= {0.0, 255.0}
        assert len(np.unique(blend[0])) == 1 and 0 < blend[0, 0, 0, 0] < 255


@pytest.mark.parametrize("mixing", [Mixing(), Mixing(mixup_alpha=1.0, prob=0.0)])
def test_no_alpha_or_no_probability_leaves_the_batch_as_it_is_with_one_hot_targets(mixing):
    images, labels = _black_and_white()
    mixed, targets = _mixed(mixing, batch=0)
    np.testing.assert_array_equal(mixed, images.numpy())
    np.testing.assert_array_equal(targets, np.eye(CLASSES)[labels.numpy()])


def _split(count: int = 12) -> ImageSplit:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)
    labels = (np.arange(count) % CLASSES).astype(np.int32)
    return ImageSplit(images, labels, [f"{i}.png" for i in range(count)])


def _epochs(
    split: ImageSplit, mixing: Mixing | None, first: int, last: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The training batches of epochs first..last, from a pipeline started at `first`."""
    steps = math.ceil(len(split) / 4)
    ds = train_batches(split, 4, seed, first, None, BatchEdits(mixing=mixing, num_classes=CLASSES))
    return [(x.numpy(), y.numpy()) for x, y in ds.take(steps * (last - first + 1))]


def test_a_pipeline_resumed_at_an_epoch_mixes_its_batches_as_an_uninterrupted_one():
    split = _split()
    mixing = Mixing(mixup_alpha=0.2, cutmix_alpha=1.0)
    # Given the batches of epochs 0 to 2 in one go
    whole = _epochs(split, mixing, 0, 2)
    # When a pipeline starts at epoch 1 (a resume)
    resumed = _epochs(split, mixing, 1, 2)
    # Then it yields the same mixed images and targets
    assert len(resumed) == 6
    for (x, y), (rx, ry) in zip(whole[3:], resumed, strict=True):
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)
    # And another seed mixes otherwise
    other = _epochs(split, mixing, 1, 2, seed=1)
    assert any(not np.array_equal(y, oy) for (_, y), (_, oy) in zip(resumed, other, strict=True))


def test_batches_from_the_stop_epoch_on_are_unmixed_also_after_a_resume():
    split = _split()
    mixing = Mixing(mixup_alpha=1.0, stop_epoch=1)
    plain = _epochs(split, None, 0, 2)
    mixed = _epochs(split, mixing, 0, 2)
    resumed = _epochs(split, mixing, 2, 2)
    # Epoch 0 is mixed: images differ from the plain batches and targets are soft
    for (x, y), (px, _) in zip(mixed[:3], plain[:3], strict=True):
        assert not np.array_equal(x, px) and (y.max(axis=1) < 1).any()
    # Epochs 1 and 2 are not: the plain images with one-hot targets of their labels
    for (x, y), (px, py) in zip(mixed[3:] + resumed, plain[3:] + plain[6:], strict=True):
        np.testing.assert_array_equal(x, px)
        np.testing.assert_array_equal(y, np.eye(CLASSES)[py])


def test_loss_on_soft_targets_is_cross_entropy_against_the_smoothed_mix():
    logits = tf.constant([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    targets = tf.constant([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])
    s = 0.1
    # When the loss is computed on soft targets with label smoothing
    loss = Crossentropy(s)(targets, logits).numpy()
    # Then it is the cross-entropy against (1 - s) * targets + s / classes
    log_probs = tf.nn.log_softmax(logits).numpy()
    smoothed = (1 - s) * targets.numpy() + s / 3
    assert loss == pytest.approx(-(smoothed * log_probs).sum(axis=1).mean(), rel=1e-5)
    # And one-hot targets give the loss of their integer labels
    one_hot = Crossentropy(s)(tf.one_hot([0, 2], 3), logits).numpy()
    assert one_hot == pytest.approx(Crossentropy(s)(tf.constant([0, 2]), logits).numpy())


def test_accuracy_on_soft_targets_is_against_their_largest_share():
    logits = tf.constant([[2.0, 0.5, -1.0], [2.0, 0.5, -1.0]])
    targets = tf.constant([[0.6, 0.4, 0.0], [0.3, 0.7, 0.0]])
    np.testing.assert_array_equal(accuracy(targets, logits).numpy(), [1.0, 0.0])
    np.testing.assert_array_equal(accuracy(tf.constant([0, 1]), logits).numpy(), [1.0, 0.0])


def test_a_mixed_run_logs_its_settings_and_finite_metrics(tmp_path):
    folder = make_image_folder(tmp_path / "insects", train_per_class=4, test_per_class=2)
    # When a run mixes up and cut-mixes in its first epoch only
    out = run_cli(
        "dataset=insects", f"dataset.root={folder}", "model.image_size=[16,16]", "batch_size=4",
        "epochs=2", "mlflow.log_model=false", "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0",
        "train.mix_stop_epoch=1", cwd=tmp_path,
    )  # fmt: skip
    # Then it ends well, with the mixing among its params
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("insect_exp").experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.mixup_alpha"] == "0.2" and params["train.cutmix_alpha"] == "1.0"
    assert params["train.mix_stop_epoch"] == "1"
    # And every epoch's and batch's metrics are finite, accuracies within [0, 1]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "batch_loss", "batch_accuracy"):
        values = [m.value for m in client.get_metric_history(run.info.run_id, key)]
        assert values and all(math.isfinite(v) for v in values), key
        if key.endswith("accuracy"):
            assert all(-1e-6 <= v <= 1 + 1e-6 for v in values), key
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.mixup_alpha=-0.2"], "train.mixup_alpha=-0.2 is out of range: must be >= 0"),
        (["train.mix_prob=1.5"], "train.mix_prob=1.5 is out of range: must be in [0, 1]"),
        (
            ["train.cutmix_alpha=1.0", "dataset.class_weight=balanced"],
            "dataset.class_weight=balanced cannot be combined with train.mixup_alpha",
        ),
    ],
)
def test_invalid_mixing_settings_exit_2_with_one_line(tmp_path, overrides, message):
    out = run_cli(*overrides, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("insect_exp: error: ") and message in line
    assert not (tmp_path / "mlruns").exists()
