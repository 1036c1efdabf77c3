"""The caches' files damaged, left behind by killed writers, or out of disk space mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from insect_exp.data.cache import ImageCache
from tests.faults.conftest import only_run, start
from tests.models.conftest import TINY_FEATURES, export_tiny

REPO = Path(__file__).resolve().parents[2]
TRAIN_IMAGES = 90  # the `folder` fixture: 30 train images a class, 3 classes
RECORD_BYTES = 32 * 32 * 3  # TINY's image size


def _disk(cache: Path, *args: str) -> tuple[str, ...]:
    return ("dataset.cache=disk", f"dataset.cache_dir={cache}", "epochs=1", *args)


def _digests(uri: str) -> dict[str, str]:
    """The run's dataset inputs: the lineage digest of each split, by role."""
    found = {}
    for item in only_run(uri).inputs.dataset_inputs:
        tags = {tag.key: tag.value for tag in item.tags}
        found[tags["mlflow.data.context"]] = item.dataset.digest
    return found


def _train_entry(cache: Path) -> Path:
    """The train split's entry: the larger of the two."""
    return max((cache / "images").glob("*.imgs"), key=lambda p: p.stat().st_size)


def _lines(output: str, text: str) -> list[str]:
    return [line for line in output.splitlines() if text in line]


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    """Wait for PROCESS; its exit code and output (the log is on stdout, errors on stderr)."""
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout + stderr


def _run(*args: str, cwd: Path) -> tuple[int, str]:
    """`python -m insect_exp TINY... ARGS` to its end: exit code and output."""
    return _finish(start(*args, cwd=cwd))


@pytest.mark.parametrize(
    ("where", "length", "repaired"),
    [
        pytest.param(
            TRAIN_IMAGES * RECORD_BYTES // 3, 64 * 1024, True, id="random bytes in the records"
        ),
        pytest.param(TRAIN_IMAGES * RECORD_BYTES + 8 * 5, 8, False, id="a fingerprint"),
    ],
)
def test_a_damaged_image_cache_entry_is_rebuilt_or_repaired_with_one_warning_and_clean_digest(
    tmp_path, folder, where, length, repaired
):
    # Given a finished run whose train split went to the disk cache
    cache = tmp_path / "cache"
    code, output = _run(f"dataset.root={folder}", *_disk(cache), cwd=tmp_path)
    assert code == 0, output[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    clean_digests = _digests(uri)
    entry = _train_entry(cache)
    clean = entry.read_bytes()
    MlflowClient(uri).delete_run(only_run(uri).info.run_id)

    # When random bytes overwrite part of its entry (records, or the fingerprints after them)
    damage = np.random.default_rng(0).integers(0, 256, length, dtype=np.uint8).tobytes()
    with entry.open("r+b") as f:
        f.seek(where)
        f.write(damage)

    # Then the next run says so in one warning naming the entry, and finishes with the lineage
    # digests of the clean data: damaged fingerprints rebuild the entry before any use; damaged
    # records are found as they are first read, before their batch is served, and decoded again
    # from their files (the entry is reused, and repaired in place)
    code, output = _run(f"dataset.root={folder}", *_disk(cache), cwd=tmp_path)
    assert code == 0, output[-3000:]
    (line,) = _lines(output, "is damaged")
    assert "WARNING" in line and str(entry) in line
    fix = "decoding its damaged records again" if repaired else "rebuilding it"
    assert fix in line
    assert len(_lines(output, "images reused from")) == (2 if repaired else 1)
    assert entry.read_bytes() == clean
    assert only_run(uri).info.status == "FINISHED"
    assert _digests(uri) == clean_digests


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny feature-vector SavedModel (images -> 8 features), as tests/models use."""
    return export_tiny(tmp_path_factory.mktemp("hub") / "feature_vector", TINY_FEATURES)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 300, np.uint8).tobytes())


@pytest.mark.parametrize(
    ("part", "damage"),
    [
        pytest.param("features", _truncate, id="truncated features"),
        pytest.param("features", _garbage, id="garbage features"),
        pytest.param("keys", _garbage, id="garbage keys"),
    ],
)
def test_a_damaged_feature_shard_is_computed_again_with_one_warning(
    tmp_path, folder, backbone, part, damage
):
    # Given a finished hub run whose backbone features went to the disk feature cache
    features = tmp_path / "features"
    hub = (
        "model=hub_mobilenet",
        f"model.handle={backbone}",
        "model.feature_cache=disk",
        f"model.feature_cache_dir={features}",
        f"dataset.root={folder}",
        "epochs=1",
    )
    code, output = _run(*hub, cwd=tmp_path)
    assert code == 0, output[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    MlflowClient(uri).delete_run(only_run(uri).info.run_id)

    # When one file of a shard (NAME.features.*, NAME.keys.*) is damaged
    shard = sorted(features.rglob(f"*.{part}.*"))[0]
    damage(shard)

    # Then the next run says so once, naming the shard, computes its features again and finishes
    code, output = _run(*hub, cwd=tmp_path)
    assert code == 0, output[-3000:]
    (line,) = _lines(output, "is damaged")
    assert "WARNING" in line and shard.name.split(".")[0] in line
    again = only_run(uri)
    assert again.info.status == "FINISHED"
    assert again.data.metrics["backbone_images_computed"] > 0
    assert shard.exists()  # written anew


def _writing(process: subprocess.Popen, images: Path, timeout: float = 120) -> Path:
    """Wait until PROCESS is writing a cache entry, and stop it there (SIGSTOP).

    Returns:
        The entry's temporary file.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(images.glob(".*.tmp")) if images.is_dir() else []
        if found:
            process.send_signal(signal.SIGSTOP)
            return found[0]
        if process.poll() is not None:
            break
        time.sleep(0.002)
    process.kill()
    raise AssertionError(f"no entry was being written\n{''.join(process.communicate())[-3000:]}")


def test_a_killed_writers_temporary_file_is_deleted_at_the_next_start(tmp_path, folder):
    # Given a run killed (no cleanup at all) while it wrote a cache entry
    cache = tmp_path / "cache"
    process = start(f"dataset.root={folder}", *_disk(cache), cwd=tmp_path)
    tmp = _writing(process, cache / "images")
    process.kill()
    process.wait()
    assert tmp.exists()

    # When the next run starts
    code, output = _run(f"dataset.root={folder}", *_disk(cache), cwd=tmp_path)

    # Then it deletes the dead writer's file, says so, and finishes with its own entries
    assert code == 0, output[-3000:]
    assert not tmp.exists()
    assert _lines(output, "left by a cache writer that died")
    assert list((cache / "images").glob(".*.tmp")) == []
    assert len(list((cache / "images").glob("*.imgs"))) == 2


_SLOW_WRITER = """
import sys, time
from pathlib import Path
import numpy as np
from insect_exp.data.cache import ImageCache

directory, go = sys.argv[1:]

def fill(writer):
    print("WRITING", flush=True)
    while not Path(go).exists():
        time.sleep(0.05)
    writer.put(np.arange(4), np.ones((4, 100, 100, 3), np.uint8), np.arange(4, dtype=np.uint64))
    return []

ImageCache(directory, 10**9).get_or_build("slow", 4, (100, 100, 3), fill)
"""


def _fill(images: np.ndarray):
    def fill(writer) -> list:
        index = np.arange(len(images))
        writer.put(index, images, index.astype(np.uint64))
        return []

    return fill


def test_a_live_writers_temporary_file_counts_toward_the_cap_and_stays(tmp_path):
    # Given an old entry, and another process writing a 120 KB entry right now
    one = np.zeros((4, 100, 100, 3), np.uint8)
    ImageCache(tmp_path, 10**9).get_or_build("old", 4, (100, 100, 3), _fill(one))
    old = ImageCache(tmp_path, 10**9).entry_path("old")
    os.utime(old, (1000, 1000))
    go = tmp_path / "go"
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_SLOW_WRITER), str(tmp_path), str(go)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "WRITING"
        (tmp,) = (tmp_path / "images").glob(".*.tmp")

        # When a third entry is written under a cap that the two entries fit, but not the
        # file being written as well
        size = old.stat().st_size
        cache = ImageCache(tmp_path, 2 * size + tmp.stat().st_size // 2)
        cache.get_or_build("new", 4, (100, 100, 3), _fill(one + 1))

        # Then the old entry went to make room, and the live writer's file was left alone
        assert not old.exists() and cache.entry_path("new").exists()
        assert tmp.exists()
    finally:
        go.touch()
        writer.wait(timeout=120)
    # And that writer finishes its entry
    assert writer.returncode == 0
    assert cache.open("slow", 4, (100, 100, 3)) is not None


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB ext4 file system of its own (loop-mounted; it takes direct I/O as disks do)."""
    image, mount = tmp_path / "disk.img", tmp_path / "small_disk"
    mount.mkdir()
    with image.open("wb") as f:
        f.truncate(16 * 2**20)
    made = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], capture_output=True, text=True
    )
    mounted = (
        made.returncode == 0
        and (
            subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True)
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip(f"cannot make and mount a small file system here: {made.output.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill_up(mount: Path) -> None:
    """Write into MOUNT until its disk is full."""
    block = b"\0" * 2**16
    with (mount / "filler").open("wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
                os.fsync(f.fileno())
        except OSError as err:
            assert err.errno == 28, err  # ENOSPC


@pytest.mark.parametrize(
    ("memory_mb", "fits"), [pytest.param(2048, True, id="fits"), pytest.param(0, False, id="not")]
)
def test_a_disk_that_fills_during_a_cache_write(tmp_path, folder, small_disk, memory_mb, fits):
    # Given a run writing its train split into a cache on a small disk
    overrides = _disk(small_disk, f"dataset.cache_max_memory_mb={memory_mb}")
    process = start(f"dataset.root={folder}", *overrides, cwd=tmp_path)
    tmp = _writing(process, small_disk / "images")

    # When the disk fills up before the entry is written
    _fill_up(small_disk)
    process.send_signal(signal.SIGCONT)
    code, output = _finish(process)

    # Then the run says so in one line, with no traceback, and leaves no partial entry behind
    assert "Traceback" not in output and "BufferError" not in output, output[-3000:]
    assert not tmp.exists()
    assert list((small_disk / "images").glob("*.imgs")) == []
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    if fits:
        # ... a warning, and the images are kept in memory for a run that finishes
        assert code == 0, output[-3000:]
        (line,) = _lines(output, "cannot write the image cache")
        assert "WARNING" in line and "disk full" in line and "in memory instead" in line
        assert only_run(uri).info.status == "FINISHED"
    else:
        # ... or, when they do not fit the memory cap either, an error that stops it
        assert code == 2, output[-3000:]
        last = output.strip().splitlines()[-1]
        assert last.startswith("insect_exp: error: ") and "disk full" in last
        assert "cache_max_memory_mb=0" in last
