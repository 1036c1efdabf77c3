"""Tests for the procedurally generated demo dataset (insect_exp.data.demo)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from insect_exp.data import demo

TINY = {"train_per_class": 3, "test_per_class": 2}
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _files(root: pathlib.Path) -> dict[str, bytes]:
    """Every image under root keyed by its path relative to root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def _mtimes(root: pathlib.Path) -> dict[str, int]:
    """Modification times (ns) of every file under root, the marker included."""
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


def _leftovers(parent: pathlib.Path) -> list[str]:
    """Temporary generation folders that were not cleaned up."""
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def test_layout_counts_and_marker(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "demo"
    assert demo.ensure_demo_dataset(root, **TINY, seed=0) == root
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["test", "train"]
    for split, count in (("train", 3), ("test", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == list(demo.CLASS_NAMES)
        for name in demo.CLASS_NAMES:
            files = sorted((root / split / name).iterdir())
            assert len(files) == count
            assert all(f.suffix == ".jpg" for f in files)
    marker = json.loads((root / demo.MARKER_NAME).read_text())
    assert marker["train_per_class"] == 3 and marker["test_per_class"] == 2
    assert marker["seed"] == 0 and marker["format_version"] == demo.FORMAT_VERSION
    assert _leftovers(tmp_path) == []


def test_class_names_are_the_three_insects() -> None:
    assert demo.CLASS_NAMES == ("beetles", "cockroach", "dragonflies")


def test_files_are_rgb_jpegs_of_varied_sizes(tmp_path: pathlib.Path) -> None:
    root = demo.ensure_demo_dataset(tmp_path / "demo", train_per_class=6, test_per_class=2)
    sizes = set()
    for path in root.rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            image.load()  # decodes fully, so a truncated file fails here
            sizes.add(image.size)
            assert all(100 <= side <= 420 for side in image.size)
    assert len(sizes) > 10
    ratios = [w / h for w, h in sizes]
    assert min(ratios) < 0.9 and max(ratios) > 1.1


def test_same_arguments_give_byte_identical_files(tmp_path: pathlib.Path) -> None:
    a = demo.ensure_demo_dataset(tmp_path / "a", **TINY, seed=5)
    b = demo.ensure_demo_dataset(tmp_path / "b", **TINY, seed=5)
    files_a = _files(a)
    assert len(files_a) == 3 * (3 + 2)
    assert files_a == _files(b)
    # Different images within the set and across seeds.
    assert len(set(files_a.values())) == len(files_a)
    other = _files(demo.ensure_demo_dataset(tmp_path / "c", **TINY, seed=6))
    assert not set(files_a.values()) & set(other.values())


def test_images_do_not_depend_on_the_counts(tmp_path: pathlib.Path) -> None:
    small = _files(
        demo.ensure_demo_dataset(tmp_path / "small", train_per_class=2, test_per_class=1)
    )
    large = _files(
        demo.ensure_demo_dataset(tmp_path / "large", train_per_class=4, test_per_class=2)
    )
    assert small == {name: data for name, data in large.items() if name in small}


def test_second_call_reuses_the_cache(tmp_path: pathlib.Path, monkeypatch) -> None:
    root = demo.ensure_demo_dataset(tmp_path / "demo", **TINY)
    before = _mtimes(root)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a complete cache")

    monkeypatch.setattr(demo, "_render_image", fail)
    assert demo.ensure_demo_dataset(str(tmp_path / "demo"), **TINY) == root
    assert _mtimes(root) == before


@pytest.mark.parametrize(
    "change",
    [{"seed": 1}, {"train_per_class": 1}, {"test_per_class": 4}],
    ids=["seed", "train_count", "test_count"],
)
def test_changed_parameters_regenerate(tmp_path: pathlib.Path, change: dict) -> None:
    root = tmp_path / "demo"
    old = _files(demo.ensure_demo_dataset(root, **TINY, seed=0))
    params = {**TINY, "seed": 0, **change}
    demo.ensure_demo_dataset(root, **params)
    new = _files(root)
    assert new == _files(demo.ensure_demo_dataset(tmp_path / "fresh", **params))
    assert new != old
    assert json.loads((root / demo.MARKER_NAME).read_text())["seed"] == params["seed"]
    assert _leftovers(tmp_path) == []


def test_incomplete_or_corrupt_cache_is_regenerated(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "demo"
    # An interrupted run: images but no marker, plus a stray class folder.
    (root / "train" / "beetles").mkdir(parents=True)
    (root / "train" / "beetles" / "beetles_0000.jpg").write_bytes(b"not a jpeg")
    (root / "train" / "ants").mkdir()
    (root / "keep.txt").write_text("user file")
    demo.ensure_demo_dataset(root, **TINY)
    expected = _files(demo.ensure_demo_dataset(tmp_path / "fresh", **TINY))
    assert _files(root) == expected
    assert not (root / "train" / "ants").exists()
    assert (root / "keep.txt").read_text() == "user file"

    (root / demo.MARKER_NAME).write_text("{truncated")
    (root / "test" / "cockroach" / "cockroach_0000.jpg").unlink()
    demo.ensure_demo_dataset(root, **TINY)
    assert _files(root) == expected


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the install lock is POSIX flock")
def test_loser_of_a_race_accepts_the_winner(tmp_path: pathlib.Path) -> None:
    import fcntl

    # Given two generations of one folder that both finish while the install lock is held, so
    # that one installs its copy and the other finds a finished folder when it gets the lock
    root = tmp_path / "demo"
    errors: list[BaseException] = []

    def generate() -> None:
        try:
            demo.ensure_demo_dataset(root, **TINY)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=generate) for _ in range(2)]
    with open(tmp_path / f".{root.name}.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        for thread in threads:
            thread.start()
        # Both copies are complete (marker written) and wait on the lock
        deadline = time.monotonic() + 120  # generous: against a hang only
        while len(list(tmp_path.glob(f".{root.name}.tmp-*/{demo.MARKER_NAME}"))) < 2:
            assert all(t.is_alive() for t in threads) and errors == [], errors
            assert time.monotonic() < deadline
            time.sleep(0.05)
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    for thread in threads:
        thread.join(timeout=120)

    # Then the loser leaves the winner's folder as it is, and no temporary copy behind
    assert errors == [] and _leftovers(tmp_path) == []
    winner = _mtimes(root)
    assert demo.ensure_demo_dataset(root, **TINY) == root
    assert _mtimes(root) == winner
    assert _files(root) == _files(demo.ensure_demo_dataset(tmp_path / "fresh", **TINY))


def test_concurrent_generations_agree(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "demo"
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            demo.ensure_demo_dataset(root, **TINY, seed=3)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert _leftovers(tmp_path) == []
    assert _files(root) == _files(demo.ensure_demo_dataset(tmp_path / "fresh", **TINY, seed=3))


@pytest.mark.parametrize("bad", [{"seed": -1}, {"train_per_class": -2}, {"test_per_class": 1.5}])
def test_rejects_invalid_arguments(tmp_path: pathlib.Path, bad: dict) -> None:
    with pytest.raises(ValueError):
        demo.ensure_demo_dataset(tmp_path / "demo", **{**TINY, **bad})


def test_default_root_follows_the_environment(tmp_path: pathlib.Path, monkeypatch) -> None:
    monkeypatch.setenv("INSECT_EXP_CACHE_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_demo_root() == tmp_path / "data" / "demo-v1"
    monkeypatch.delenv("INSECT_EXP_CACHE_DIR")
    assert demo.default_demo_root() == tmp_path / "xdg" / "insect_exp" / "demo-v1"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.default_demo_root() == tmp_path / "home" / ".cache" / "insect_exp" / "demo-v1"


def test_none_root_generates_into_the_default(tmp_path: pathlib.Path, monkeypatch) -> None:
    monkeypatch.setenv("INSECT_EXP_CACHE_DIR", str(tmp_path / "data"))
    root = demo.ensure_demo_dataset(None, train_per_class=1, test_per_class=1)
    assert root == tmp_path / "data" / "demo-v1"
    assert len(_files(root)) == 6


def test_module_does_not_import_tensorflow() -> None:
    code = "import sys, insect_exp.data.demo; sys.exit('tensorflow' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0


def _features(path: pathlib.Path) -> np.ndarray:
    """Hue/saturation/value histogram weighted towards the centre, where the insect usually is."""
    with Image.open(path) as image:
        hsv = np.asarray(image.convert("HSV").resize((64, 64)), dtype=np.int64)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0 - 0.5
    weight = np.exp(-(xx**2 + yy**2) / (2 * 0.2**2)).ravel()
    bins = ((hsv[..., 0] // 32) * 8 + (hsv[..., 1] // 128) * 4 + hsv[..., 2] // 64).ravel()
    return np.bincount(bins, weight, 64) / weight.sum()


def test_classes_are_learnable_by_a_simple_statistic(tmp_path: pathlib.Path) -> None:
    root = demo.ensure_demo_dataset(tmp_path / "demo", train_per_class=30, test_per_class=15)
    data = {}
    for split in ("train", "test"):
        pairs = [
            (_features(path), label)
            for label, name in enumerate(demo.CLASS_NAMES)
            for path in sorted((root / split / name).glob("*.jpg"))
        ]
        data[split] = (np.stack([f for f, _ in pairs]), np.array([y for _, y in pairs]))
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    centroids = np.stack([x_train[y_train == k].mean(0) for k in range(len(demo.CLASS_NAMES))])
    predicted = ((x_test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    accuracy = float((predicted == y_test).mean())
    # Chance is 1/3; a nearest-centroid classifier on colour statistics must clearly beat it.
    assert accuracy > 0.5, accuracy
