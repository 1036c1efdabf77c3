"""Find the images of a dataset folder: class names, file lists per split, skipped files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from insect_exp import UserError

# What TensorFlow's decode_image understands; anything else is reported, not read.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})


class DatasetError(UserError):
    """The dataset folder cannot be trained on as it is."""


@dataclass
class FileList:
    """Image files of one split and their integer labels."""

    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Manifest:
    """Everything known about a dataset before any image is decoded."""

    root: Path
    class_names: list[str]
    train: FileList
    test: FileList | None
    # (path, reason) for every file that will not be used.
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_split(
    split_dir: Path,
    class_names: list[str],
    max_per_class: int | None,
    skipped: list[tuple[str, str]],
) -> FileList:
    files = FileList()
    for label, name in enumerate(class_names):
        kept = 0
        for path in sorted((split_dir / name).rglob("*")):
            if not path.is_file():
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append((str(path), "not an image file"))
                continue
            if path.stat().st_size == 0:
                skipped.append((str(path), "empty file"))
                continue
            if max_per_class is not None and kept >= max_per_class:
                continue
            files.paths.append(str(path))
            files.labels.append(label)
            kept += 1
    return files


def scan(root: str | Path, max_per_class: int | None = None) -> Manifest:
    """List ROOT/train/<class>/* and ROOT/test/<class>/*; raise DatasetError if unusable.

    Files are checked by name and size here; files that fail to decode are added to the skipped
    list later, by the decoder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {str(root)!r} is not a directory (set dataset.root=PATH)")
    train_dir, test_dir = root / "train", root / "test"
    if not train_dir.is_dir():
        raise DatasetError(f"{str(root)!r} has no train/ folder (expected ROOT/train/<class>/*)")
    class_names = _class_dirs(train_dir)
    if len(class_names) < 2:
        raise DatasetError(
            f"{str(train_dir)!r} needs at least 2 class folders, found {len(class_names)}"
        )
    skipped: list[tuple[str, str]] = []
    train = _scan_split(train_dir, class_names, max_per_class, skipped)
    test = None
    if test_dir.is_dir():
        test_classes = _class_dirs(test_dir)
        if test_classes != class_names:
            raise DatasetError(
                f"test classes {test_classes} differ from train classes {class_names}"
            )
        test = _scan_split(test_dir, class_names, max_per_class, skipped)
    check_usable(root, class_names, train.labels, None if test is None else test.labels)
    return Manifest(root, class_names, train, test, skipped)


def check_usable(
    root: Path,
    class_names: Sequence[str],
    train_labels: Sequence[int],
    test_labels: Sequence[int] | None,
) -> None:
    """Raise DatasetError if a split or a train class has no images left."""
    for split, labels in {"train": train_labels, "test": test_labels}.items():
        if labels is not None and len(labels) == 0:
            raise DatasetError(f"the {split} split of {str(root)!r} has no readable images")
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=len(class_names))
    empty = [name for name, n in zip(class_names, counts, strict=True) if n == 0]
    if empty:
        raise DatasetError(f"train classes with no readable images: {', '.join(empty)}")


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) holding out `fraction` of every class, chosen by `seed`."""
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"dataset.val_split must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_held = int(round(len(idx) * fraction))
        # Every class must keep at least one training image and give at least one to validation.
        n_held = min(max(n_held, 1), len(idx) - 1)
        if n_held < 1:
            raise DatasetError("dataset.val_split needs at least 2 images in every class")
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))
