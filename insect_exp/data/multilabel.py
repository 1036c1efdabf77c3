"""A multi-label dataset (task=multilabel): CSV rows whose `label` holds a set of classes.

The CSV is read as for one label per image (data/csv_list.py: columns, paths, splits, skipped
rows), except that the label is split at `;` into class names, each stripped of spaces (`;` is
then never part of a class name). `red;blue` and `blue; red` are the same set; a name given twice
counts once. A row is skipped, with the reason in dataset/skipped.tsv, for `empty label`, for
`empty class name in label (<label>)` (`red;` or `red;;blue`), and, in the test split, for
`label not in train (<name>)`. Classes are every name the train rows use, sorted.

The labels become one multi-hot row per image, (images, classes) uint8, and validation is held
out of train at random (seeded): stratifying by class needs one class per image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from insect_exp.config import MAX_IMAGE_PIXELS
from insect_exp.data import csv_list
from insect_exp.data.scan import DatasetError, FileList, Manifest, check_usable

SEPARATOR = ";"


def label_set(label: str) -> tuple[str, ...] | None:
    """The sorted class names of a `a;b` label; None where a name is empty (`a;`, `a;;b`)."""
    names = [name.strip() for name in label.split(SEPARATOR)]
    if not all(names):
        return None
    return tuple(sorted(set(names)))


def _parsed(good: dict[str, csv_list.Rows], skipped: list[tuple[str, str]]) -> None:
    """Each row's label as its canonical set (`a;b`, sorted); malformed ones go to SKIPPED."""
    for split, rows in good.items():
        kept = []
        for line, path, label in rows:
            names = label_set(label)
            if names is None:
                skipped.append((path, f"empty class name in label ({label})"))
            else:
                kept.append((line, path, SEPARATOR.join(names)))
        good[split] = kept


def _known_test(good: dict[str, csv_list.Rows], classes: set[str], skipped: list) -> None:
    kept = []
    for row in good["test"]:
        unknown = sorted(set(row[2].split(SEPARATOR)) - classes)
        if unknown:
            skipped.append((row[1], f"label not in train ({', '.join(unknown)})"))
        else:
            kept.append(row)
    good["test"] = kept


def _file_list(
    rows: csv_list.Rows, class_names: list[str], cap: int | None, pixels: int
) -> FileList:
    """The rows' files and multi-hot labels; with a cap, a row is kept while one of its classes
    has fewer than `cap` images."""
    index = {name: i for i, name in enumerate(class_names)}
    files, kept, hot = FileList(max_pixels=pixels), np.zeros(len(class_names), np.int64), []
    for _, path, label in rows:
        where = [index[name] for name in label.split(SEPARATOR)]
        if cap is not None and kept[where].min() >= cap:
            continue
        kept[where] += 1
        row = np.zeros(len(class_names), np.uint8)
        row[where] = 1
        files.paths.append(path)
        hot.append(row)
    files.multi_hot = np.array(hot, np.uint8).reshape(len(hot), len(class_names))
    return files


def _hot(files: FileList) -> np.ndarray:
    assert files.multi_hot is not None  # every list _file_list makes has it
    return files.multi_hot


def scan_csv(
    csv_path: str | Path, max_per_class: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> Manifest:
    """The files, label sets and splits a multi-label CSV lists; bad rows skipped with a reason.

    Raises:
        DatasetError: as csv_list.scan_csv: an unreadable CSV, unusable class names, fewer than
            two classes in train, or an empty split or class.
    """
    csv_path = csv_list.existing_csv(csv_path)
    skipped: list[tuple[str, str]] = []
    good = csv_list.usable_rows(csv_path, skipped)
    _parsed(good, skipped)
    # Each name checked as a class name of its own (control characters, case clashes).
    names = {s: [(n, p, c) for n, p, lab in rows for c in lab.split(SEPARATOR)]
             for s, rows in good.items()}  # fmt: skip
    class_names = csv_list.check_labels(csv_path, names)
    listed_test = bool(good["test"])
    _known_test(good, set(class_names), skipped)
    csv_list.once_per_file(good, skipped)
    lists = {
        s: _file_list(rows, class_names, max_per_class, max_pixels) for s, rows in good.items()
    }
    test = lists["test"] if listed_test else None
    base = csv_path.parent
    check_usable(base, class_names, _hot(lists["train"]), None if test is None else _hot(test))
    return Manifest(base, class_names, lists["train"], test, skipped, source=csv_path)


def held_out(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) holding out `fraction` of COUNT images at random, by `seed`."""
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"dataset.val_split must be in (0, 1), got {fraction}")
    if count < 2:
        raise DatasetError("dataset.val_split needs at least 2 training images")
    order = np.random.default_rng(seed).permutation(count)
    n_held = min(max(int(round(count * fraction)), 1), count - 1)
    return np.sort(order[n_held:]), np.sort(order[:n_held])
