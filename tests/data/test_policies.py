"""Augmentation policies of the training batches: RandAugment, TrivialAugment, random erasing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient
from PIL import Image, ImageEnhance, ImageOps

from insect_exp import models
from insect_exp.config import AugmentConfig, AugmentPolicy, CNNConfig
from insect_exp.data import policies
from insect_exp.data.pipeline import ImageSplit
from insect_exp.fit import BatchEdits, train_batches
from tests.conftest import make_image_folder, run_cli

RANDAUGMENT = AugmentPolicy.randaugment


def _full_range_images(n: int, seed: int = 0) -> np.ndarray:
    """16x16 images whose every channel holds each level 0..255 once, in a random place: already
    stretched to the full range and equalized, so auto_contrast and equalize leave them as they
    are, and a policy at magnitude 0 must too."""
    rng = np.random.default_rng(seed)
    channels = [rng.permutation(256).reshape(16, 16) for _ in range(n * 3)]
    return np.stack(channels, axis=-1).reshape(16, 16, n, 3).transpose(2, 0, 1, 3).astype("f4")


def _key(epoch: int, batch: int, seed: int = 0) -> tf.Tensor:
    return policies.batch_key(seed, tf.constant(epoch), tf.constant(batch))


def _changed(out: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Per image: whether any pixel changed."""
    return np.any(out != images, axis=(1, 2, 3))


def test_every_op_at_magnitude_0_and_randaugment_at_magnitude_0_leave_images_unchanged():
    images = _full_range_images(16)

    # Each op of the papers' list at magnitude 0 is the identity on these images
    for name in policies.OPS:
        np.testing.assert_array_equal(policies.apply_op(name, images, 0.0), images, err_msg=name)

    # And RandAugment at magnitude 0, two ops an image, over several batches' draws
    augment = AugmentConfig(policy=RANDAUGMENT, num_ops=2, magnitude=0)
    for batch in range(4):
        out = policies.augment_images(images, _key(0, batch), augment)
        np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize(
    ("name", "magnitude", "pil"),
    [
        ("auto_contrast", 0.0, ImageOps.autocontrast),
        ("equalize", 0.0, ImageOps.equalize),
        ("solarize", 0.5, lambda image: ImageOps.solarize(image, 128)),
        ("posterize", 3.0, lambda image: ImageOps.posterize(image, 5)),
        ("color", 0.5, lambda image: ImageEnhance.Color(image).enhance(1.5)),
        ("contrast", -0.7, lambda image: ImageEnhance.Contrast(image).enhance(0.3)),
        ("brightness", 0.5, lambda image: ImageEnhance.Brightness(image).enhance(1.5)),
        ("sharpness", 0.9, lambda image: ImageEnhance.Sharpness(image).enhance(1.9)),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_each_pixel_op_does_what_pil_does_within_one_level(name, magnitude, pil):
    # Given random images, one of them not spanning the whole range
    images = np.random.default_rng(5).integers(0, 256, (4, 20, 24, 3)).astype(np.uint8)
    images[1] = images[1] // 2 + 40

    # When the op runs on the batch, and PIL's on each image
    ours = np.asarray(policies.apply_op(name, images.astype("float32"), magnitude))
    theirs = np.stack([np.asarray(pil(Image.fromarray(image))) for image in images])

    # Then they agree to a level (PIL truncates where the op rounds)
    assert np.abs(np.round(ours) - theirs).max() <= 1


def test_geometric_ops_move_pixels_about_the_centre_and_fill_with_grey():
    images = np.random.default_rng(6).integers(0, 256, (2, 16, 16, 3)).astype("float32")

    # A quarter turn of a square image moves every pixel onto another one
    turned = np.round(np.asarray(policies.apply_op("rotate", images, 90.0)))
    assert any(np.array_equal(turned, np.rot90(images, k, axes=(1, 2))) for k in (1, 3))

    # A translation by a quarter of the width shifts the image by 4 pixels, grey coming in
    moved = np.asarray(policies.apply_op("translate_x", images, 0.25))
    ahead, behind = np.roll(images, 4, axis=2), np.roll(images, -4, axis=2)
    shifted = ahead if np.array_equal(moved[:, :, 4:], ahead[:, :, 4:]) else behind
    kept = slice(4, None) if shifted is ahead else slice(None, -4)
    np.testing.assert_array_equal(moved[:, :, kept], shifted[:, :, kept])
    assert np.sum(moved == policies.FILL) >= 2 * 16 * 4 * 3


@pytest.mark.parametrize(
    "augment",
    [
        AugmentConfig(policy=RANDAUGMENT, num_ops=2, magnitude=10),
        AugmentConfig(policy=RANDAUGMENT, num_ops=3, magnitude=5, magnitude_std=2),
        AugmentConfig(policy=AugmentPolicy.trivialaugment),
        AugmentConfig(erasing=0.5),
    ],
    ids=["randaugment-m10", "randaugment-mstd", "trivialaugment", "erasing"],
)
def test_a_policy_changes_images_and_keeps_whole_levels_in_0_255(augment):
    # Given a batch of random images
    images = np.random.default_rng(1).integers(0, 256, (32, 16, 16, 3)).astype("float32")

    # When the policy runs
    out = np.asarray(policies.augment_images(images, _key(0, 0), augment))

    # Then most images change, and each stays a float32 image of whole levels in 0..255
    assert _changed(out, images).mean() > 0.3
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    np.testing.assert_array_equal(out, np.round(out))


def test_same_seed_epoch_and_batch_draw_the_same_images_and_others_differ():
    images = np.random.default_rng(2).integers(0, 256, (8, 16, 16, 3)).astype("float32")
    augment = AugmentConfig(policy=RANDAUGMENT, magnitude=9, erasing=0.5)

    outputs = {
        (seed, epoch, batch): np.asarray(
            policies.augment_images(images, _key(epoch, batch, seed), augment)
        )
        for seed, epoch, batch in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0)]
    }

    again = policies.augment_images(images, _key(0, 0, seed=0), augment)
    np.testing.assert_array_equal(again, outputs[0, 0, 0])
    for a, b in itertools.combinations(outputs.values(), 2):
        assert not np.array_equal(a, b)


def test_erasing_with_probability_1_fills_one_rectangle_of_each_image():
    # Given mid-grey images and random erasing that always fires
    images = np.full((16, 20, 24, 3), 128.0, dtype="float32")

    # When it runs
    out = np.asarray(policies.augment_images(images, _key(0, 0), AugmentConfig(erasing=1.0)))

    # Then each image's changed pixels fill a rectangle of 2%..1/3 of it (give or take rounding),
    # nearly all of whose pixels changed (random levels may hit 128 by chance)
    for changed in np.any(out != images, axis=-1):
        rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
        box = changed[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        assert 0.015 <= box.size / changed.size <= 0.4
        assert box.mean() > 0.95 and changed.sum() == box.sum()


def _epochs(batches: tf.data.Dataset, epochs: int, steps: int) -> list[np.ndarray]:
    return [np.asarray(images) for images, _ in batches.take(epochs * steps)]


def test_resumed_training_batches_are_those_of_an_uninterrupted_run():
    # Given a 10-image split in batches of 4 (3 batches an epoch) under RandAugment and erasing
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    split = ImageSplit(images, np.arange(10, dtype=np.int32) % 2, [f"{i}.png" for i in range(10)])
    augment = AugmentConfig(policy=RANDAUGMENT, magnitude=9, erasing=0.25)

    # When training runs epochs 0-2 at once, and again resumed at epoch 1
    whole = _epochs(train_batches(split, 4, seed=7, edits=BatchEdits(augment=augment)), 3, 3)
    resumed = _epochs(
        train_batches(split, 4, seed=7, first_epoch=1, edits=BatchEdits(augment=augment)), 2, 3
    )
    plain = _epochs(train_batches(split, 4, seed=7), 3, 3)

    # Then the resumed run sees the same augmented batches from epoch 1 on
    for a, b in zip(whole[3:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    # And they are not the plain batches (which come in the same order)
    assert all(a.shape == b.shape for a, b in zip(whole, plain, strict=True))
    assert not any(np.array_equal(a, b) for a, b in zip(whole, plain, strict=True))


def test_the_policy_adds_nothing_to_the_model():
    # The policy runs on the training batches: the model (so the exported one) is the same
    plain = models.recipe_for(CNNConfig(image_size=[32, 32])).build(3)
    augment = AugmentConfig(policy=RANDAUGMENT, erasing=0.5)
    augmented = models.recipe_for(CNNConfig(image_size=[32, 32], augment=augment)).build(3)
    assert [type(layer) for layer in augmented.layers] == [type(layer) for layer in plain.layers]
    assert augmented.count_params() == plain.count_params()


def test_train_with_randaugment_and_erasing_runs_and_logs_the_policy(tmp_path, tracking_uri):
    # Given a tiny folder
    root = make_image_folder(tmp_path / "insects", train_per_class=4, test_per_class=2)

    # When the CLI trains one epoch with RandAugment and random erasing
    uri = tracking_uri
    out = run_cli(
        "dataset=insects", f"dataset.root={root}", "model.image_size=[16,16]", "epochs=1",
        "batch_size=4", "mlflow.log_model=false", f"mlflow.tracking_uri={uri}",
        "model.augment.policy=randaugment", "model.augment.erasing=0.25",
        cwd=tmp_path,
    )  # fmt: skip

    # Then it succeeds, and the run's params name the policy
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("insect_exp").experiment_id])
    params = run.data.params
    assert params["model.augment.policy"] == "randaugment"
    assert (params["model.augment.num_ops"], params["model.augment.magnitude"]) == ("2", "9.0")
    assert params["model.augment.erasing"] == "0.25"
    assert run.info.status == "FINISHED"
