"""A dataset given as a CSV file list: `path,label[,split]` rows instead of class folders.

Paths are relative to the CSV file's folder (or absolute); the split is `train` (the default when
the column is missing or empty) or `test`. An optional first row `path,label[,split]` is a header
and may order the columns. Classes are the train labels, sorted. Bad rows are reported with the
bad files, in dataset/skipped.tsv: `file not found` (and every reason `scan` gives a file),
`empty label`, `unknown split (<value>)`, `label not in train (<label>)` for a test row, and
`malformed row` for a row without a path and a label or with more columns than the header (three
without one); rows without a path are named `<csv>:<line>`.

A file is used once per split. Where a split lists it again, the first row counts and the others
are skipped: `duplicate of line <n>` (the same label) or `labelled <label> at line <n>` (another
one). A file listed in both splits is a test image: its train rows are skipped, `also in test`, so
that no image is both trained and scored on. Labels that differ only in case (`Cockroach` and
`cockroach`) or hold a control character stop the scan with one line naming them: which spelling
is meant is the user's call, and merging them silently would move images between classes.
"""

from __future__ import annotations

import csv
import os
import stat
from pathlib import Path

from insect_exp.config import MAX_IMAGE_PIXELS
from insect_exp.data.scan import (
    DatasetError,
    FileList,
    Manifest,
    check_class_names,
    check_usable,
    file_reason,
    stat_entry,
)

SPLITS = ("train", "test")
_COLUMNS = ("path", "label", "split")
# (line, file, label) of the rows of one split that name a usable file.
Rows = list[tuple[int, str, str]]


def _read_rows(csv_path: Path) -> list[tuple[int, list[str] | None]]:
    """(line number, fields) of every non-empty row, the header removed; columns as _COLUMNS.

    A row with more fields than the header has (or than _COLUMNS, without a header) has None.
    """
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            rows = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if any(row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"cannot read dataset.path {str(csv_path)!r}: {err}") from None
    order, width = [0, 1, 2], len(_COLUMNS)
    if rows and [c.strip().lower() for c in rows[0][1][:2]] == ["path", "label"]:
        header = [c.strip().lower() for c in rows.pop(0)[1]]
        if not set(header) <= set(_COLUMNS):
            raise DatasetError(
                f"{str(csv_path)!r}: unknown columns in its header {header} (expected "
                "path,label[,split])"
            )
        order, width = [header.index(c) if c in header else -1 for c in _COLUMNS], len(header)
    fields = [[row[i].strip() if 0 <= i < len(row) else "" for i in order] for _, row in rows]
    return [(n, None if len(row) > width else f) for (n, row), f in zip(rows, fields, strict=True)]


def _file_problem(path: Path) -> str | None:
    st = stat_entry(path)
    if isinstance(st, str):
        return st
    if stat.S_ISDIR(st.st_mode) or not stat.S_ISREG(st.st_mode):
        return "not a file"
    return file_reason(path, st)


def usable_rows(csv_path: Path, skipped: list[tuple[str, str]]) -> dict[str, Rows]:
    """The rows of each split that name a usable file; the others go to SKIPPED with a reason."""
    base = csv_path.parent
    good: dict[str, Rows] = {split: [] for split in SPLITS}
    for line, fields in _read_rows(csv_path):
        if fields is None or not fields[0]:
            skipped.append((f"{csv_path}:{line}", "malformed row"))
            continue
        path, label, split = fields
        file = Path(os.path.expanduser(path))
        file = file if file.is_absolute() else base / file
        split = split.lower() or "train"
        reason = None
        if not label:
            reason = "empty label"
        elif split not in SPLITS:
            reason = f"unknown split ({split})"
        else:
            reason = _file_problem(file)
        if reason is not None:
            skipped.append((str(file), reason))
        else:
            good[split].append((line, str(file), label))
    return good


def once_per_file(good: dict[str, Rows], skipped: list[tuple[str, str]]) -> None:
    """Keep each file's first row in a split, and a file in both splits in test only."""
    first: dict[str, dict[str, tuple[int, str]]] = {split: {} for split in SPLITS}
    for split in ("test", "train"):  # test first: a train row needs to know what test holds
        kept: Rows = []
        for line, path, label in good[split]:
            key = os.path.normpath(path)
            seen = first[split].get(key)
            if split == "train" and key in first["test"]:
                skipped.append((path, "also in test"))
            elif seen is None:
                first[split][key] = (line, label)
                kept.append((line, path, label))
            elif seen[1] == label:
                skipped.append((path, f"duplicate of line {seen[0]}"))
            else:
                skipped.append((path, f"labelled {seen[1]} at line {seen[0]}"))
        good[split] = kept


def check_labels(csv_path: Path, good: dict[str, Rows]) -> list[str]:
    """The class names (the train labels, sorted); DatasetError for names that cannot be used."""
    check_class_names(sorted({label for rows in good.values() for _, _, label in rows}),
                      repr(str(csv_path)))  # fmt: skip
    class_names = sorted({label for _, _, label in good["train"]})
    if len(class_names) < 2:
        raise DatasetError(
            f"{str(csv_path)!r} needs train rows of at least 2 labels, found {len(class_names)}"
        )
    by_case: dict[str, str] = {}
    for name in class_names:
        other = by_case.setdefault(name.casefold(), name)
        if other != name:
            raise DatasetError(
                f"{str(csv_path)!r}: labels {other!r} and {name!r} differ only in case: use one "
                "spelling for a class"
            )
    return class_names


def existing_csv(csv_path: str | Path) -> Path:
    """The CSV's absolute path; a DatasetError if it is not a file."""
    path = Path(csv_path).expanduser().resolve()
    if not path.is_file():
        raise DatasetError(f"dataset.path {str(path)!r} is not a file (a CSV of path,label)")
    return path


def scan_csv(
    csv_path: str | Path, max_per_class: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> Manifest:
    """The files, labels and splits a CSV lists; bad rows go to the skipped list with a reason.

    Raises:
        DatasetError: the CSV cannot be read, has labels that cannot be class names (see the
            module docstring), or leaves a split or a class without images.
    """
    csv_path = existing_csv(csv_path)
    skipped: list[tuple[str, str]] = []
    good = usable_rows(csv_path, skipped)
    class_names = check_labels(csv_path, good)
    listed_test = bool(good["test"])  # a test split, even if none of its rows can be used
    known = [row for row in good["test"] if row[2] in class_names]
    skipped += [(path, f"label not in train ({label})") for _, path, label in good["test"]
                if label not in class_names]  # fmt: skip
    good["test"] = known
    once_per_file(good, skipped)
    index = {name: i for i, name in enumerate(class_names)}
    lists: dict[str, FileList] = {}
    for split, rows in good.items():
        files, kept = FileList(max_pixels=max_pixels), dict.fromkeys(class_names, 0)
        for _, path, label in rows:
            if max_per_class is not None and kept[label] >= max_per_class:
                continue
            kept[label] += 1
            files.paths.append(path)
            files.labels.append(index[label])
        lists[split] = files
    test = lists["test"] if listed_test else None
    base = csv_path.parent
    check_usable(base, class_names, lists["train"].labels, None if test is None else test.labels)
    return Manifest(base, class_names, lists["train"], test, skipped, source=csv_path)
