"""A dataset given as a CSV file list: `path,label[,split]` rows instead of class folders.

Paths are relative to the CSV file's folder (or absolute); the split is `train` (the default when
the column is missing or empty) or `test`. An optional first row `path,label[,split]` is a header
and may order the columns. Classes are the train labels, sorted. Bad rows are reported with the
bad files, in dataset/skipped.tsv: `file not found` (and every reason `scan` gives a file),
`empty label`, `unknown split (<value>)`, `label not in train (<label>)` for a test row, and
`malformed row` for a row without a path and a label; rows without a path are named
`<csv>:<line>`.
"""

from __future__ import annotations

import csv
import os
import stat
from pathlib import Path

from insect_exp.data.scan import (
    DatasetError,
    FileList,
    Manifest,
    check_usable,
    file_reason,
    stat_entry,
)

SPLITS = ("train", "test")
_COLUMNS = ("path", "label", "split")


def _read_rows(csv_path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-empty row, the header removed; columns as _COLUMNS."""
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            rows = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if any(row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"cannot read dataset.path {str(csv_path)!r}: {err}") from None
    order = [0, 1, 2]
    if rows and [c.strip().lower() for c in rows[0][1][:2]] == ["path", "label"]:
        header = [c.strip().lower() for c in rows.pop(0)[1]]
        if not set(header) <= set(_COLUMNS):
            raise DatasetError(
                f"{str(csv_path)!r}: unknown columns in its header {header} (expected "
                "path,label[,split])"
            )
        order = [header.index(c) if c in header else -1 for c in _COLUMNS]
    return [(n, [row[i].strip() if 0 <= i < len(row) else "" for i in order]) for n, row in rows]


def _file_problem(path: Path) -> str | None:
    st = stat_entry(path)
    if isinstance(st, str):
        return st
    if stat.S_ISDIR(st.st_mode) or not stat.S_ISREG(st.st_mode):
        return "not a file"
    return file_reason(path, st)


def scan_csv(csv_path: str | Path, max_per_class: int | None = None) -> Manifest:
    """The files, labels and splits a CSV lists; bad rows go to the skipped list with a reason.

    Raises:
        DatasetError: the CSV cannot be read, or leaves a split or a class without images.
    """
    csv_path = Path(csv_path).expanduser().resolve()
    if not csv_path.is_file():
        raise DatasetError(f"dataset.path {str(csv_path)!r} is not a file (a CSV of path,label)")
    base = csv_path.parent
    skipped: list[tuple[str, str]] = []
    good: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    for line, (path, label, split) in _read_rows(csv_path):
        where = f"{csv_path}:{line}"
        if not path:
            skipped.append((where, "malformed row"))
            continue
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
            good[split].append((str(file), label))
    class_names = sorted({label for _, label in good["train"]})
    if len(class_names) < 2:
        raise DatasetError(
            f"{str(csv_path)!r} needs train rows of at least 2 labels, found {len(class_names)}"
        )
    index = {name: i for i, name in enumerate(class_names)}
    lists: dict[str, FileList] = {}
    for split, rows in good.items():
        files, kept = FileList(), dict.fromkeys(class_names, 0)
        for path, label in rows:
            if label not in index:
                skipped.append((path, f"label not in train ({label})"))
                continue
            if max_per_class is not None and kept[label] >= max_per_class:
                continue
            kept[label] += 1
            files.paths.append(path)
            files.labels.append(index[label])
        lists[split] = files
    test = lists["test"] if good["test"] else None
    check_usable(base, class_names, lists["train"].labels, None if test is None else test.labels)
    return Manifest(base, class_names, lists["train"], test, skipped, source=csv_path)
