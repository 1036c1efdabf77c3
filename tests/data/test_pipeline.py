"""Scanning and decoding image folders, bad files included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from insect_exp.data.pipeline import decode_files, load, make_dataset
from insect_exp.data.scan import DatasetError, scan, stratified_split
from tests.conftest import make_image_folder


def _add_bad_files(folder: Path) -> dict[str, str]:
    """Every kind of file a real folder picks up; returns name -> the reason it is skipped with."""
    good = next(folder.glob("*.jpg")).read_bytes()
    (folder / "corrupt.jpg").write_bytes(good[:2] + bytes(40) + good[42:])
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # hidden: ignored, not reported
    (folder / "notes.txt").write_text("collected in the garden")
    (folder / "text_named.png").write_text("this is text, not a PNG")
    return {
        "corrupt.jpg": "corrupt JPEG",
        "truncated.jpg": "truncated",
        "empty.jpg": "empty file",
        "notes.txt": "not an image file",
        "text_named.png": "not an image",
    }


def _add_odd_formats(folder: Path) -> None:
    """Readable images that are not 3-channel JPEGs."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (15, 25, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0], "L").save(folder / "gray.jpg")
    Image.fromarray(np.dstack([rgb, np.full((15, 25), 128, np.uint8)]), "RGBA").save(
        folder / "rgba.png"
    )
    Image.fromarray(rgb).save(folder / "plain.bmp")
    Image.fromarray(rgb).convert("P").save(folder / "palette.gif")


def test_bad_files_are_skipped_with_reasons_and_odd_formats_become_rgb(tmp_path):
    # Given a folder with every kind of bad file and some odd but valid formats
    root = make_image_folder(tmp_path / "insects", train_per_class=4, test_per_class=2)
    expected = _add_bad_files(root / "train" / "beetles")
    _add_odd_formats(root / "train" / "cockroach")

    # When it is scanned and decoded
    data = load(scan(root), image_size=(16, 12), seed=0)

    # Then each bad file is reported with its reason, .DS_Store is ignored, nothing else is lost
    assert {Path(p).name: r for p, r in data.skipped} == expected
    assert len(data.train) == 12 + 4  # 3 classes x 4 good images + 4 odd formats
    assert data.train.images.shape[1:] == (16, 12, 3)
    assert data.train.images.dtype == np.uint8
    assert data.val_is_test and len(data.test) == 6
    stats = data.stats()
    assert stats["num_skipped"] == 5
    assert stats["images_per_class"]["train"]["cockroach"] == 8


def test_each_image_lands_at_its_own_file_and_label_around_failures(tmp_path):
    # Given a split whose undecodable files sit between good ones, and a file gone since the scan
    root = make_image_folder(tmp_path / "insects", train_per_class=5, test_per_class=1)
    # A JPEG start whose first segment claims more bytes than the file has.
    (root / "train" / "beetles" / "b_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    (root / "train" / "cockroach" / "c_gone.jpg").write_bytes(b"\xff\xd8\xff\xe0 soon gone")
    manifest = scan(root)
    (root / "train" / "cockroach" / "c_gone.jpg").unlink()

    # When the folder is decoded in parallel
    files = manifest.train
    split, failed = decode_files(files, (20, 24))

    # Then every kept image is its own file's pixels with its own label, and failures name why
    assert [(Path(p).name, reason) for p, reason in failed] == [
        ("b_corrupt.jpg", "truncated"),
        ("c_gone.jpg", "file not found"),
    ]
    assert len(split) == 15
    by_path = dict(zip(files.paths, files.labels, strict=True))
    for path, label, image in zip(split.paths, split.labels, split.images, strict=True):
        alone = tf.image.resize(tf.io.decode_image(tf.io.read_file(path), channels=3), (20, 24))
        expected = np.round(np.clip(alone.numpy(), 0, 255)).astype(np.uint8)
        np.testing.assert_array_equal(image, expected)
        assert label == by_path[path]


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing_root", "is not a directory"),
        ("no_train", "has no train/ folder"),
        ("one_class", "at least 2 class folders"),
        ("test_classes_differ", "test classes"),
        ("empty_test", "test split"),
        ("all_bad_class", "no readable images: cockroach"),
        ("no_test_no_val_split", "set dataset.val_split"),
    ],
)
def test_unusable_folders_fail_with_one_clear_line(tmp_path, breakage, message):
    # Given a folder broken in one way
    root = make_image_folder(tmp_path / "insects", train_per_class=2, test_per_class=1)
    if breakage == "missing_root":
        root = tmp_path / "nowhere"
    elif breakage == "no_train":
        (root / "train").rename(root / "training")
    elif breakage == "one_class":
        for name in ("cockroach", "dragonflies"):
            for split in ("train", "test"):
                for f in (root / split / name).iterdir():
                    f.unlink()
                (root / split / name).rmdir()
    elif breakage == "test_classes_differ":
        (root / "test" / "dragonflies").rename(root / "test" / "moths")
    elif breakage == "empty_test":
        for f in (root / "test").rglob("*.jpg"):
            f.unlink()
    elif breakage == "all_bad_class":
        for f in (root / "train" / "cockroach").iterdir():
            f.write_bytes(b"garbage")
    elif breakage == "no_test_no_val_split":
        for f in (root / "test").rglob("*.jpg"):
            f.unlink()
        for d in (root / "test").iterdir():
            d.rmdir()
        (root / "test").rmdir()

    # When it is loaded, Then a DatasetError names the problem in one line
    with pytest.raises(DatasetError, match=message) as err:
        load(scan(root), image_size=(8, 8), seed=0)
    assert "\n" not in str(err.value)


def test_val_split_holds_out_a_seeded_stratified_fraction_of_train(tmp_path):
    # Given a folder without test/
    root = make_image_folder(tmp_path / "insects", train_per_class=10, test_per_class=0)

    # When 20% is held out, twice with one seed and once with another
    first = load(scan(root), (8, 8), val_split=0.2, seed=1)
    again = load(scan(root), (8, 8), val_split=0.2, seed=1)
    other = load(scan(root), (8, 8), val_split=0.2, seed=2)

    # Then every class gives 2 images, the same ones for the same seed, and none overlap train
    assert first.test is None and not first.val_is_test
    assert np.bincount(first.val.labels).tolist() == [2, 2, 2]
    assert first.val.paths == again.val.paths != other.val.paths
    assert not set(first.val.paths) & set(first.train.paths)


def test_stratified_split_keeps_a_training_image_in_every_class():
    keep, held = stratified_split(np.array([0, 0, 1, 1, 1, 1]), 0.9, seed=0)
    assert sorted(np.array([0, 0, 1, 1, 1, 1])[keep].tolist()) == [0, 1]
    assert len(held) == 4


def test_max_per_class_caps_every_split(tmp_path):
    root = make_image_folder(tmp_path / "insects", train_per_class=5, test_per_class=4)
    manifest = scan(root, max_per_class=2)
    assert len(manifest.train) == 6 and len(manifest.test) == 6


def test_training_batches_are_float_pixels_with_every_image_once_an_epoch_in_a_new_order(
    tmp_path,
):
    from insect_exp.fit import train_batches

    # Given a decoded split of 12 images
    root = make_image_folder(tmp_path / "insects", train_per_class=4, test_per_class=1)
    data = load(scan(root), (8, 8), seed=0)

    # When it is served for training in batches of 5, two epochs
    batches = list(train_batches(data.train, batch_size=5, seed=3).take(6))
    epoch1 = [y.numpy().tolist() for _, y in batches[:3]]
    epoch2 = [y.numpy().tolist() for _, y in batches[3:]]
    images = batches[0][0]

    # Then batches are float32 pixels in 0..255, all labels come each epoch, order changes
    assert [len(b) for b in epoch1] == [5, 5, 2]
    assert images.dtype.name == "float32" and float(images.numpy().max()) > 1.0
    assert sorted(sum(epoch1, [])) == sorted(sum(epoch2, [])) == sorted(data.train.labels)
    assert epoch1 != epoch2


def test_a_windowed_shuffle_serves_every_image_once_an_epoch_and_a_resume_the_same_batches(
    tmp_path,
):
    from insect_exp.fit import train_batches

    # Given a decoded split of 12 images
    root = make_image_folder(tmp_path / "insects", train_per_class=4, test_per_class=1)
    data = load(scan(root), (8, 8), seed=0)

    # When it is served with dataset.shuffle_buffer's windowed shuffle, and again from epoch 1
    def sums(stream: tf.data.Dataset, count: int) -> list[list[float]]:
        return [x.numpy().sum(axis=(1, 2, 3)).tolist() for x, _ in stream.take(count)]

    whole = sums(train_batches(data.train, 5, seed=3, shuffle_buffer=4), 6)
    resumed = sums(train_batches(data.train, 5, seed=3, first_epoch=1, shuffle_buffer=4), 3)

    # Then each epoch holds every image once, and the resumed epoch is the uninterrupted one's
    every = sorted(data.train.images.astype(np.float32).sum(axis=(1, 2, 3)).tolist())
    assert sorted(sum(whole[:3], [])) == sorted(sum(whole[3:], [])) == every
    assert resumed == whole[3:]


def test_prediction_batches_keep_the_splits_order(tmp_path):
    root = make_image_folder(tmp_path / "insects", train_per_class=4, test_per_class=1)
    data = load(scan(root), (8, 8), seed=0)
    labels = [y.numpy().tolist() for _, y in make_dataset(data.train, batch_size=5)]
    assert sum(labels, []) == data.train.labels.tolist()


def test_the_training_and_prediction_batches_leave_tf_data_autotuning_off(tmp_path):
    from insect_exp.fit import train_batches

    # Given a decoded split
    root = make_image_folder(tmp_path / "insects", train_per_class=4, test_per_class=1)
    data = load(scan(root), (8, 8), seed=0)

    # When it is served for training and for prediction
    served = [train_batches(data.train, 5, seed=3), make_dataset(data.train, 5)]

    # Then neither is autotuned: deleting an autotuned iterator can wait out the tuner's period,
    # and Keras deletes the training one as fit returns (it returned 20 s late in 4 of 13 runs)
    assert [ds.options().autotune.enabled for ds in served] == [False, False]


def test_a_split_decoded_ahead_lands_row_for_row_as_one_decoded_at_once(tmp_path):
    from insect_exp.data.pipeline import in_memory

    # Given a split with a broken file among good ones, decoded at once
    root = make_image_folder(tmp_path / "insects", train_per_class=40, test_per_class=1)
    (root / "train" / "beetles" / "b_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    files = scan(root).train
    at_once, failed_at_once = decode_files(files, (20, 24))

    # When the same split is started ahead (its batches stored by tf.data's threads) and taken
    # later
    started = in_memory(files, (20, 24), ahead=True)
    ahead, failed_ahead = decode_files(files, (20, 24), started=started)

    # Then the images, their order, fingerprints and the failures are the same
    assert failed_ahead == failed_at_once and len(failed_ahead) == 1
    assert ahead.paths == at_once.paths
    np.testing.assert_array_equal(ahead.images, at_once.images)
    np.testing.assert_array_equal(ahead.fingerprints, at_once.fingerprints)


def test_a_failure_drops_its_batch_and_the_retry_drops_only_the_failure(tmp_path):
    from insect_exp.data.pipeline import Decoding

    # Given a split with a broken file among good ones
    root = make_image_folder(tmp_path / "insects", train_per_class=4, test_per_class=1)
    (root / "train" / "beetles" / "b_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    files = scan(root).train
    broken = files.paths.index(str(root / "train" / "beetles" / "b_corrupt.jpg"))

    # When every file is decoded in batches, then the rows that did not arrive one by one
    first = {int(i) for index, *_ in Decoding(files, (8, 8)) for i in index}
    missing = sorted(set(range(len(files))) - first)
    retried = {int(i) for index, *_ in Decoding(files, (8, 8), rows=missing) for i in index}

    # Then the broken file's batch (here all 13 files) is dropped whole, and the retry keeps all
    # but the broken file
    assert first == set()
    assert retried == set(range(len(files))) - {broken}


def test_a_splits_images_are_freed_with_it_after_training_and_prediction_batches_read_them(
    tmp_path,
):
    import gc
    import weakref

    from insect_exp.data.pipeline import in_memory
    from insect_exp.fit import train_batches

    # Given a split decoded into memory (its rows stored by tf.data's threads), then served for
    # training and prediction
    root = make_image_folder(tmp_path / "insects", train_per_class=4, test_per_class=1)
    files = scan(root).train
    split, _ = decode_files(files, (8, 8), started=in_memory(files, (8, 8)))
    list(train_batches(split, 5, seed=0).take(3))
    list(make_dataset(split, 5))
    images = weakref.ref(split.images)

    # When the run is done with it (the next job of an in-process sweep)
    del split
    gc.collect()

    # Then its images are freed: TensorFlow keeps a numpy_function's Python function for the
    # process's life, and it must not hold them
    assert images() is None
