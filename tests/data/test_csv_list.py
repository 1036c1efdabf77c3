"""dataset=csv: images listed in a CSV of path,label[,split] rows, bad rows reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from insect_exp.data import load_data
from insect_exp.data.csv_list import scan_csv
from insect_exp.data.scan import DatasetError
from tests.conftest import make_flat_images


def _flat_images(tmp_path: Path) -> list[Path]:
    """The tiny folder's images (1 test a class), moved into one flat folder."""
    return make_flat_images(tmp_path, test_per_class=1)


def test_a_csv_file_list_gives_classes_splits_and_reports_bad_rows(tmp_path, compose_cfg):
    # Given a CSV with a header, relative paths, a split column and every kind of bad row
    images = _flat_images(tmp_path)
    rows = ["path,label,split"]
    for path in images:
        split, name = path.name.split("-", 1)
        rows.append(f"images/{path.name},{name.rsplit('_', 1)[0]},{split}")
    rows += [
        "images/missing.jpg,beetles,train",
        "images/train-beetles_0.jpg,,train",
        "images/train-beetles_1.jpg,beetles,holdout",
        "images/test-beetles_0.jpg,moths,test",
        ",beetles,train",
    ]
    csv_file = tmp_path / "data" / "labels.csv"
    csv_file.write_text("\n".join(rows) + "\n")

    # When the csv dataset is loaded through the config
    cfg = compose_cfg("dataset=csv", f"dataset.path={csv_file}")
    data = load_data(cfg.dataset, cfg.model.image_size, cfg.seed)

    # Then classes come from the train labels, files land in their splits, bad rows are skipped
    assert data.class_names == ["beetles", "cockroach", "dragonflies"]
    assert len(data.train) == 12 and len(data.test) == 3
    assert data.source == str(csv_file)
    reasons = {(Path(p).name, r) for p, r in data.skipped}
    assert reasons == {
        ("missing.jpg", "file not found"),
        ("train-beetles_0.jpg", "empty label"),
        ("train-beetles_1.jpg", "unknown split (holdout)"),
        ("test-beetles_0.jpg", "label not in train (moths)"),
        (f"{csv_file.name}:{len(rows)}", "malformed row"),
    }


def test_a_csv_without_header_or_split_column_is_all_train(tmp_path):
    images = _flat_images(tmp_path)
    csv_file = tmp_path / "list.csv"
    csv_file.write_text(
        "".join(f"{p},{p.name.split('-', 1)[1].rsplit('_', 1)[0]}\n" for p in images)
    )
    manifest = scan_csv(csv_file)
    assert manifest.test is None and len(manifest.train) == 15 and not manifest.skipped


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "is not a file"),
        ("path,label\n", "at least 2 labels"),
        ("path,label,when\n", "unknown columns"),
    ],
)
def test_an_unusable_csv_fails_with_one_line(tmp_path, content, message):
    csv_file = tmp_path / "labels.csv"
    if content is not None:
        csv_file.write_text(content)
    with pytest.raises(DatasetError, match=message) as err:
        scan_csv(csv_file)
    assert "\n" not in str(err.value)


def test_each_file_is_used_once_per_split_and_test_wins_over_train(tmp_path):
    # Given a CSV without a header that lists a file twice in train, a test file in train too,
    # and a row of four fields
    images = _flat_images(tmp_path)
    rows = [f"{p},{p.name.split('-', 1)[1].rsplit('_', 1)[0]},{p.name.split('-')[0]}"
            for p in images]  # fmt: skip
    first = next(r for r in rows if r.endswith(",train"))
    line, train = rows.index(first) + 1, first.split(",")
    test = next(r for r in rows if r.endswith(",test")).split(",")
    rows += [
        ",".join(train),  # again, the same label
        f"{train[0]},dragonflies,train",  # again, another label
        f"{test[0]},{test[1]},train",  # a test file listed for training
        f"{train[0]},{train[1]},train,extra",
    ]
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("\n".join(rows) + "\n")

    # When it is scanned
    manifest = scan_csv(csv_file)

    # Then each file is in one split once, and every other row is reported with its reason
    assert sorted(manifest.train.paths) == sorted(set(manifest.train.paths))
    assert test[0] not in manifest.train.paths and test[0] in manifest.test.paths
    assert set(manifest.skipped) == {
        (train[0], f"duplicate of line {line}"),
        (train[0], f"labelled {train[1]} at line {line}"),
        (test[0], "also in test"),
        (f"{csv_file}:{len(rows)}", "malformed row"),
    }
