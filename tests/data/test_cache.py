"""The on-disk image cache: same images as memory, keyed by the files, atomic, shared, capped."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from insect_exp.config import CacheMode as Mode
from insect_exp.data.cache import (
    FORMAT_VERSION,
    CachePolicy,
    ImageCache,
    damage_reported,
    split_key,
)
from insect_exp.data.pipeline import load, make_dataset
from insect_exp.data.scan import DatasetError, scan
from insect_exp.fit import train_batches
from insect_exp.models.feature_cache import FeatureStore
from tests.conftest import make_image_folder

SIZE = (16, 16)
REPO = Path(__file__).resolve().parents[2]


def _policy(directory: Path, mode: Mode = Mode.disk, max_memory_mb: int = 64) -> CachePolicy:
    return CachePolicy(mode, directory, max_memory_mb * 2**20, 10**9)


def _entries(directory: Path) -> list[Path]:
    return sorted((directory / "images").glob("*.imgs"))


def _batches(ds, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in ds.take(count)]


def test_disk_mode_serves_the_same_images_batches_and_order_as_memory(tmp_path, caplog):
    # Given a folder with a file that fails to decode, loaded in memory and through the disk cache
    root = make_image_folder(tmp_path / "insects", train_per_class=7, test_per_class=2)
    (root / "train" / "beetles" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    memory = load(scan(root), SIZE, val_split=0.3, seed=1)
    disk = load(scan(root), SIZE, val_split=0.3, seed=1, cache=_policy(tmp_path / "cache"))
    reused = load(scan(root), SIZE, val_split=0.3, seed=1, cache=_policy(tmp_path / "cache"))

    # Then the disk splits stream from the cache, and every batch of every epoch is the same
    assert memory.storage == "memory" and disk.storage == reused.storage == "disk"
    assert not isinstance(disk.train.images, np.ndarray)
    assert disk.skipped == reused.skipped == memory.skipped
    assert [Path(p).name for p, _ in disk.skipped] == ["broken.jpg"]
    for split in (disk, reused):
        assert split.train.paths == memory.train.paths and split.val.paths == memory.val.paths
        for a, b in zip(
            _batches(train_batches(memory.train, 4, seed=3), 12),
            _batches(train_batches(split.train, 4, seed=3), 12),
            strict=True,
        ):
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
        for a, b in zip(
            _batches(make_dataset(memory.val, 4), 10),
            _batches(make_dataset(split.val, 4), 10),
            strict=True,
        ):
            np.testing.assert_array_equal(a[0], b[0])
    # ... resumed at epoch 2 too, and indexing reads the same pixels
    np.testing.assert_array_equal(
        _batches(train_batches(memory.train, 4, seed=3, first_epoch=2), 3)[2][0],
        _batches(train_batches(disk.train, 4, seed=3, first_epoch=2), 3)[2][0],
    )
    np.testing.assert_array_equal(disk.test.images[[4, 1, 2]], memory.test.images[[4, 1, 2]])
    assert len(_entries(tmp_path / "cache")) == 2  # train and test, written once
    assert "damaged" not in caplog.text  # the broken file's record (zeros) is never read


def _damage(entry: Path, record: int, record_bytes: int) -> None:
    """Random bytes over one record of ENTRY, in place (a reader holding it open sees them)."""
    noise = np.random.default_rng(record).integers(0, 256, record_bytes, dtype=np.uint8)
    with entry.open("r+b") as f:
        f.seek(record * record_bytes)
        f.write(noise.tobytes())


def test_a_record_damaged_after_its_entry_was_opened_is_decoded_again_before_its_batch(
    tmp_path, caplog
):
    # Given a split reused from the disk cache (its entry opened), and the same split in memory
    root = make_image_folder(tmp_path / "insects", train_per_class=5, test_per_class=1)
    memory = load(scan(root), SIZE)
    load(scan(root), SIZE, cache=_policy(tmp_path / "cache"))
    reused = load(scan(root), SIZE, cache=_policy(tmp_path / "cache"))
    entry = reused.train.images.path
    clean = entry.read_bytes()

    # When random bytes overwrite two of its records before they are read
    for record in (3, 7):
        _damage(entry, record, SIZE[0] * SIZE[1] * 3)
    batches = _batches(train_batches(reused.train, 4, seed=3), 8)

    # Then every batch holds the clean images, one warning names the entry, and the entry is
    # whole again
    for a, b in zip(_batches(train_batches(memory.train, 4, seed=3), 8), batches, strict=True):
        np.testing.assert_array_equal(a[0], b[0])
    damaged = [r for r in caplog.records if "damaged" in r.getMessage()]
    assert len(damaged) == 1 and damaged[0].levelname == "WARNING"
    assert str(entry) in damaged[0].getMessage()
    assert entry.read_bytes() == clean


def test_a_damaged_record_whose_file_is_gone_stops_its_batch_naming_the_entry(tmp_path):
    # Given a split reused from the disk cache, one of whose files was deleted since
    root = make_image_folder(tmp_path / "insects", train_per_class=5, test_per_class=1)
    load(scan(root), SIZE, cache=_policy(tmp_path / "cache"))
    reused = load(scan(root), SIZE, cache=_policy(tmp_path / "cache"))
    Path(reused.train.paths[2]).unlink()

    # When that file's record is damaged
    entry = reused.train.images.path
    _damage(entry, 2, SIZE[0] * SIZE[1] * 3)

    # Then no batch holding it is served, and the error carries one line (what the command
    # prints) naming the entry and what to do
    with pytest.raises(tf.errors.OpError) as stopped:
        _batches(make_dataset(reused.train, 4), 3)
    line = damage_reported(stopped.value)
    assert line is not None and "\n" not in line
    assert str(entry) in line and "record 2" in line and "delete the entry" in line


def test_auto_keeps_small_folders_in_memory_and_big_ones_on_disk(tmp_path):
    root = make_image_folder(tmp_path / "insects", train_per_class=4, test_per_class=1)
    small = load(scan(root), SIZE, cache=_policy(tmp_path / "c", Mode.auto, max_memory_mb=1))
    big = load(scan(root), (400, 400), cache=_policy(tmp_path / "c", Mode.auto, max_memory_mb=1))
    assert (small.storage, big.storage) == ("memory", "disk")


def _rewrite(path: Path, value: int) -> None:
    Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(path, quality=95)


def test_the_content_digest_follows_the_files_and_the_key_their_stats(tmp_path):
    # Given a folder, and a copy of it elsewhere
    root = make_image_folder(tmp_path / "insects", train_per_class=3, test_per_class=1)
    copy = shutil.copytree(root, tmp_path / "elsewhere" / "copy")
    first = load(scan(root), SIZE, seed=0)
    key = split_key(scan(root).train.paths, SIZE)

    # When one file changes
    _rewrite(root / "train" / "beetles" / "beetles_0.jpg", 7)
    edited = load(scan(root), SIZE, seed=0)

    # Then the copy has the digest the folder had, the edited folder another, and the cache key
    # of the edited folder is another (its pixels are never reused)
    names = first.class_names
    digest = first.train.content_digest(str(root), names)
    assert load(scan(copy), SIZE).train.content_digest(str(copy), names) == digest
    assert load(scan(root), SIZE).train.content_digest(str(root), names) != digest
    assert edited.train.content_digest(str(root), names) != digest
    assert first.test.content_digest(str(root), names) == edited.test.content_digest(
        str(root), names
    )
    assert split_key(scan(root).train.paths, SIZE) != key
    assert split_key(scan(root).train.paths, (8, 8)) != split_key(scan(root).train.paths, SIZE)


def test_a_changed_file_is_decoded_again_not_read_from_the_cache(tmp_path):
    root = make_image_folder(tmp_path / "insects", train_per_class=3, test_per_class=1)
    policy = _policy(tmp_path / "cache")
    load(scan(root), SIZE, cache=policy)
    _rewrite(root / "test" / "beetles" / "beetles_0.jpg", 200)
    data = load(scan(root), SIZE, cache=policy)
    i = data.test.paths.index(str(root / "test" / "beetles" / "beetles_0.jpg"))
    assert (data.test.images[i] == 200).all()


def _fill_with(images: np.ndarray, fail_after: int | None = None):
    def fill(writer):
        for i in range(len(images)):
            if fail_after is not None and i == fail_after:
                raise KeyboardInterrupt  # the run is stopped mid-write
            writer.put(np.array([i]), images[i : i + 1], np.array([i + 1], np.uint64))
        return [(len(images) - 1, "truncated")]

    return fill


def test_an_interrupted_write_leaves_nothing_to_read_and_is_redone(tmp_path):
    # Given a cache whose first writer is interrupted half way
    cache = ImageCache(tmp_path / "cache", 10**9)
    images = np.arange(4 * 4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 4, 3)
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_build("k1", 4, (4, 4, 3), _fill_with(images, fail_after=2))

    # Then no entry exists (nor its temporary file), and the next run writes a complete one
    assert cache.open("k1", 4, (4, 4, 3)) is None
    assert list((tmp_path / "cache" / "images").glob("*k1*")) == []
    entry, written = cache.get_or_build("k1", 4, (4, 4, 3), _fill_with(images))
    assert written
    np.testing.assert_array_equal(entry.images[np.arange(4)], images)
    assert entry.failures == [(3, "truncated")]
    assert entry.fingerprints.tolist() == [1, 2, 3, 4]


def test_records_arriving_out_of_order_each_land_in_place(tmp_path):
    # Given records of 5,000 bytes (not a multiple of a page) that arrive out of order, in runs
    # long and short, the last one a single record
    shape, count = (50, 50, 2), 40
    images = np.random.default_rng(0).integers(0, 255, (count, *shape), dtype=np.uint8)
    batches = ([7, 3, 4, 5, 6, 0, 1, 2], [20, 21, 22, 23, 8, 9, 10, 11, 12, 13, 14, 15],
               [16, 17, 18, 19, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38],
               [39])  # fmt: skip

    def fill(writer):
        for batch in batches:
            index = np.array(batch)
            writer.put(index, images[index], index.astype(np.uint64))
        return []

    # When they are written as an entry
    cache = ImageCache(tmp_path / "cache", 10**9)
    cache.get_or_build("k1", count, shape, fill)

    # Then a fresh read of it gives every record in place, and every fingerprint
    entry = ImageCache(tmp_path / "cache", 10**9).open("k1", count, shape)
    assert entry is not None
    np.testing.assert_array_equal(entry.images[np.arange(count)], images)
    assert entry.fingerprints.tolist() == list(range(count))


def test_a_process_killed_mid_write_leaves_only_a_temporary_file(tmp_path):
    # Given a process that dies (no cleanup at all) while writing an entry
    script = f"""
        import os, numpy as np
        from insect_exp.data.cache import ImageCache
        def fill(writer):
            writer.put(np.array([0]), np.ones((1, 4, 4, 3), np.uint8), np.array([1], np.uint64))
            os._exit(9)
        ImageCache({str(tmp_path / "cache")!r}, 10**9).get_or_build("k1", 2, (4, 4, 3), fill)
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, timeout=120)
    assert done.returncode == 9

    # Then nothing readable is left, and the dead writer's temporary file goes at the next use
    cache = ImageCache(tmp_path / "cache", 10**9)
    assert cache.open("k1", 2, (4, 4, 3)) is None
    (tmp,) = (tmp_path / "cache" / "images").glob(".k1.*.tmp")
    cache.evict()
    assert not tmp.exists()


def test_a_truncated_entry_or_one_of_another_format_version_is_rebuilt(tmp_path):
    cache = ImageCache(tmp_path / "cache", 10**9)
    images = np.full((3, 2, 2, 3), 9, np.uint8)
    cache.get_or_build("k1", 3, (2, 2, 3), _fill_with(images))
    path = cache.entry_path("k1")

    # A cache written by another version of the format: same name, other version in its footer
    # (the 4 bytes after its magic)
    data = bytearray(path.read_bytes())
    at = data.rindex(b"INSXIMGS") + 8
    data[at : at + 4] = (FORMAT_VERSION + 1).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    assert cache.open("k1", 3, (2, 2, 3)) is None
    _, written = cache.get_or_build("k1", 3, (2, 2, 3), _fill_with(images))
    assert written

    # A truncated copy of an entry
    path.write_bytes(path.read_bytes()[:-5])
    assert cache.open("k1", 3, (2, 2, 3)) is None
    entry, written = cache.get_or_build("k1", 3, (2, 2, 3), _fill_with(images))
    assert written and entry.images[1].tolist() == images[1].tolist()


_SHARED_JOB = """
import logging, sys, time
from pathlib import Path
import numpy as np
from insect_exp.data.cache import ImageCache

logging.basicConfig(level=logging.INFO)
cache_dir, go = sys.argv[1:]

def slow_fill(writer):
    print("DECODING", flush=True)
    time.sleep(3)  # long enough for the other job to arrive while this one writes
    writer.put(np.arange(4), np.full((4, 2, 2, 3), 7, np.uint8), np.arange(1, 5, dtype=np.uint64))
    return []

while not Path(go).exists():
    time.sleep(0.01)
entry, written = ImageCache(cache_dir, 10**9).get_or_build("k1", 4, (2, 2, 3), slow_fill)
print("WRITTEN" if written else "REUSED", int(entry.images[np.arange(4)].sum()), flush=True)
"""


def test_two_jobs_at_once_share_one_cache_written_once(tmp_path):
    # Given two jobs started together on the same cache, each to decode the same split slowly
    go = tmp_path / "go"
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", _SHARED_JOB, str(tmp_path / "cache"), str(go)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(1)
    go.touch()
    outputs = [job.communicate(timeout=240) for job in jobs]

    # Then the split was decoded once, by one job; the other job waited for that one's entry and
    # reused it, with the same pixels
    out = "".join(o for o, _ in outputs)
    err = "".join(e for _, e in outputs)
    assert [job.returncode for job in jobs] == [0, 0], err
    assert out.count("DECODING") == 1
    pixels = 4 * 2 * 2 * 3 * 7
    assert out.count(f"WRITTEN {pixels}") == 1 and out.count(f"REUSED {pixels}") == 1
    assert "waiting for another process" in err
    assert len(_entries(tmp_path / "cache")) == 1


def test_least_recently_used_entries_go_when_the_cache_is_over_its_cap(tmp_path):
    # Given a cache capped at two entries' size, holding entries a, b, c used in that order
    one = np.zeros((10, 10, 10, 3), np.uint8)
    writer = ImageCache(tmp_path / "cache", 10**9)
    for i, key in enumerate("abc"):
        writer.get_or_build(key, 10, (10, 10, 3), _fill_with(one))
        os.utime(writer.entry_path(key), (1000 + i, 1000 + i))
    size = writer.entry_path("a").stat().st_size
    cache = ImageCache(tmp_path / "cache", 3 * size)

    # When a is used again and a fourth entry d is written
    assert cache.open("a", 10, (10, 10, 3)) is not None
    cache.get_or_build("d", 10, (10, 10, 3), _fill_with(one))

    # Then b, the least recently used, went; a (just used) and d (in use) stay
    left = {p.stem for p in _entries(tmp_path / "cache")}
    assert left == {"a", "c", "d"}

    # And entries in use are kept even when they alone exceed the cap
    tiny = ImageCache(tmp_path / "cache", 1)
    tiny.open("c", 10, (10, 10, 3))
    tiny.evict()
    assert {p.stem for p in _entries(tmp_path / "cache")} == {"c"}


def test_the_feature_cache_evicts_its_least_recently_used_shards(tmp_path):
    # Given feature shards of two backbones, the oldest first
    old = FeatureStore(tmp_path / "features", "backbone1")
    old.put(["x1", "x2"], np.ones((2, 256), np.float32))
    shard_bytes = sum(p.stat().st_size for p in (tmp_path / "features" / "backbone1").iterdir())
    for p in (tmp_path / "features" / "backbone1").iterdir():
        os.utime(p, (1000, 1000))

    # When another backbone's features are stored under a cap of about one shard
    new = FeatureStore(tmp_path / "features", "backbone2", max_bytes=int(shard_bytes * 1.5))
    new.put(["y1", "y2"], np.zeros((2, 256), np.float32))

    # Then the old shard went, and a lookup of it finds nothing (to compute again)
    features, found = old.get(["x1", "x2"])
    assert features is None and not found.any()
    features, found = new.get(["y1", "y2"])
    assert found.all()


def _unwritable_cache(tmp_path: Path) -> Path:
    """A cache_dir that cannot be created: a file stands where its folder would be."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file")
    return blocker / "cache"


def test_an_unwritable_cache_falls_back_to_memory_with_one_line(tmp_path, caplog):
    root = make_image_folder(tmp_path / "insects", train_per_class=3, test_per_class=1)
    with caplog.at_level(logging.WARNING):
        data = load(scan(root), SIZE, cache=_policy(_unwritable_cache(tmp_path)))
    assert data.storage == "memory" and len(data.train) == 9
    lines = [r.getMessage() for r in caplog.records if "image cache" in r.getMessage()]
    assert lines and all("keeping the decoded images in memory" in line for line in lines)
    assert "cannot write the image cache" in lines[0]


def test_a_read_only_or_full_cache_stops_before_training_when_memory_is_too_small(
    tmp_path, monkeypatch
):
    root = make_image_folder(tmp_path / "insects", train_per_class=3, test_per_class=1)
    too_small = _policy(_unwritable_cache(tmp_path), Mode.auto, max_memory_mb=0)
    with pytest.raises(DatasetError, match="cannot write the image cache") as err:
        load(scan(root), SIZE, cache=too_small)
    assert "\n" not in str(err.value) and "cache_max_memory_mb=0" in str(err.value)

    # A full disk says so
    full = shutil.disk_usage(tmp_path)._replace(free=10)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: full)
    with pytest.raises(DatasetError, match="disk full"):
        load(scan(root), SIZE, cache=_policy(tmp_path / "cache", Mode.auto, max_memory_mb=0))


def test_a_read_only_cache_with_the_entry_already_in_it_is_used(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "insects", train_per_class=3, test_per_class=1)
    load(scan(root), SIZE, cache=_policy(tmp_path / "cache"))

    def read_only(*_args, **_kwargs):
        raise OSError(30, "Read-only file system")  # EROFS: what a lock file gets on a ro mount

    # Every write of an entry starts with a lock (of its key, then of its temporary file)
    monkeypatch.setattr(fcntl, "flock", read_only)
    data = load(scan(root), SIZE, cache=_policy(tmp_path / "cache"))
    assert data.storage == "disk"


def _cache_root_twice(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    """A fresh process that asks for the cache root twice, with these variables only."""
    script = """
        import logging
        from insect_exp.data.cache import cache_root
        logging.basicConfig(format="%(levelname)s %(message)s")
        print(cache_root())
        print(cache_root())
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSECT_EXP_")}
    env.update(variables, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip


def test_one_variable_names_the_cache_root_and_its_former_name_warns_once(tmp_path):
    # Given no variable, then INSECT_EXP_CACHE_DIR: the user cache folder, then that one, silently
    done = _cache_root_twice(tmp_path)
    assert done.stdout.split() == [str(tmp_path / "xdg" / "insect_exp")] * 2
    done = _cache_root_twice(tmp_path, INSECT_EXP_CACHE_DIR=str(tmp_path / "new"))
    assert done.stdout.split() == [str(tmp_path / "new")] * 2 and done.stderr == ""

    # When only the former variable, INSECT_EXP_DATA_DIR, is set: it is used, with one warning
    done = _cache_root_twice(tmp_path, INSECT_EXP_DATA_DIR=str(tmp_path / "old"))
    assert done.stdout.split() == [str(tmp_path / "old")] * 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("WARNING") and "INSECT_EXP_DATA_DIR is deprecated" in line
    assert "set INSECT_EXP_CACHE_DIR instead" in line

    # When both are set: the new one wins, and the warning says the former one is ignored
    both = {"INSECT_EXP_CACHE_DIR": str(tmp_path / "new"), "INSECT_EXP_DATA_DIR": "old"}
    done = _cache_root_twice(tmp_path, **both)
    assert done.stdout.split() == [str(tmp_path / "new")] * 2
    (line,) = done.stderr.splitlines()
    assert "ignored, as INSECT_EXP_CACHE_DIR is set" in line
