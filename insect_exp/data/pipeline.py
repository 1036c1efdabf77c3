"""Decode a Manifest once into in-memory arrays and serve them as tf.data pipelines."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from insect_exp.data.decode import decode_image
from insect_exp.data.scan import (
    DatasetError,
    FileList,
    Manifest,
    check_usable,
    diagnose,
    stratified_split,
)

log = logging.getLogger(__name__)


@dataclass
class ImageSplit:
    """Decoded, resized RGB images (uint8, N x H x W x 3) with labels and source paths."""

    images: np.ndarray
    labels: np.ndarray
    paths: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageSplit:
        return ImageSplit(self.images[index], self.labels[index], [self.paths[i] for i in index])


@dataclass
class Data:
    """The splits a run trains, validates and tests on."""

    class_names: list[str]
    train: ImageSplit
    val: ImageSplit
    # None when the folder has no test/ split and validation was held out of train.
    test: ImageSplit | None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def val_is_test(self) -> bool:
        return self.test is not None and self.val is self.test

    def stats(self) -> dict[str, object]:
        """Images per class per split, and the skipped files, for logging."""
        splits = {"train": self.train, "val": self.val, "test": self.test}
        per_class = {
            name: dict(
                zip(
                    self.class_names,
                    np.bincount(s.labels, minlength=len(self.class_names)).tolist(),
                    strict=True,
                )
            )
            for name, s in splits.items()
            if s is not None
        }
        return {
            "class_names": self.class_names,
            "validation": "test split" if self.val_is_test else "held out of train",
            "images_per_class": per_class,
            "num_images": {name: len(s) for name, s in splits.items() if s is not None},
            "num_skipped": len(self.skipped),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


def _decode_fn(image_size: Sequence[int]):
    # The one decoder: the served model decodes uploaded files with it too (data/decode.py).
    def decode(path: tf.Tensor) -> tf.Tensor:
        return decode_image(tf.io.read_file(path), image_size)

    return decode


def decode_files(
    files: FileList, image_size: Sequence[int], workers: int = 0
) -> tuple[ImageSplit, list[tuple[str, str]]]:
    """Decode and resize every file in parallel; files TensorFlow cannot decode are returned apart.

    All files go through one tf.data map (parallel, in TensorFlow's own threads, three times faster
    than a Python thread pool); the few that fail there are tried once more alone and, if they fail
    again, examined by `scan.diagnose` (header and last bytes, Pillow) only to learn why.

    Returns:
        The decoded split, and (path, reason) for each file that failed to decode, the reason short
        and stable (`truncated`, `not an image`, `permission denied`, ...).
    """
    decode = _decode_fn(image_size)
    height, width = (int(v) for v in image_size)
    images = np.empty((len(files), height, width, 3), dtype=np.uint8)
    ok = np.zeros(len(files), dtype=bool)
    if files.paths:
        ds = (
            tf.data.Dataset.from_tensor_slices(files.paths)
            .enumerate()
            .map(lambda i, p: (i, decode(p)), num_parallel_calls=workers or tf.data.AUTOTUNE)
            .ignore_errors()  # dropped elements are the failures: their indices never arrive
            .batch(64)
        )
        for index, batch in ds.as_numpy_iterator():
            images[index] = batch
            ok[index] = True
    failures: list[tuple[str, str]] = []
    single = tf.function(decode, input_signature=[tf.TensorSpec([], tf.string)])
    for i in np.flatnonzero(~ok):
        try:
            images[i] = single(tf.constant(files.paths[i])).numpy()
            ok[i] = True
        except tf.errors.OpError as err:  # corrupt, truncated, not an image, gone since the scan
            log.debug("TensorFlow cannot decode %s: %s", files.paths[i], err.message)
            failures.append((files.paths[i], diagnose(files.paths[i])))
    labels = np.asarray(files.labels, dtype=np.int32)
    if ok.all():  # the usual case: no copy of the whole array
        return ImageSplit(images, labels, list(files.paths)), failures
    keep = np.flatnonzero(ok)
    split = ImageSplit(images[keep], labels[keep], [files.paths[i] for i in keep])
    return split, sorted(failures)


def load(
    manifest: Manifest,
    image_size: Sequence[int],
    val_split: float = 0.0,
    seed: int = 0,
    workers: int = 0,
) -> Data:
    """Decode every split once; validate on test, or on a seeded stratified hold-out of train."""
    train, failed = decode_files(manifest.train, image_size, workers)
    skipped = list(manifest.skipped) + failed
    test = None
    if manifest.test is not None:
        test, failed = decode_files(manifest.test, image_size, workers)
        skipped += failed
    # Undecodable files may have emptied a split or a class: say so before training starts.
    check_usable(
        manifest.root,
        manifest.class_names,
        train.labels,
        None if test is None else test.labels,
    )
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    log.info(
        "decoded %d train and %d test images of %d classes; %d files skipped",
        len(train),
        0 if test is None else len(test),
        len(manifest.class_names),
        len(skipped),
    )
    if val_split > 0:
        keep, held = stratified_split(train.labels, val_split, seed)
        train, val = train.subset(keep), train.subset(held)
    elif test is not None:
        val = test
    else:
        raise DatasetError(
            f"{str(manifest.root)!r} has no test/ split: set dataset.val_split (e.g. 0.2) to "
            "hold out part of train for validation"
        )
    return Data(manifest.class_names, train, val, test, skipped)


def make_dataset(split: ImageSplit, batch_size: int) -> tf.data.Dataset:
    """Batches of (float32 images in 0..255, int32 labels), in order: for predicting and validating.

    Training batches, shuffled epoch by epoch, are `insect_exp.fit.train_batches`.
    """
    ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels))
    ds = ds.batch(batch_size).map(
        lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE
    )
    return ds.prefetch(tf.data.AUTOTUNE)
