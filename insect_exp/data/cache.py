"""The on-disk image cache: each split decoded and resized once, kept as uint8 records on disk.

An entry is one file, `<cache_dir>/images/<key>.imgs`: the records (N x H x W x 3 uint8, in file
list order, zeros where a file failed to decode), one 8-byte content fingerprint per file, one
64-bit XXH3 hash per record, a JSON trailer (shape, count, failures and their reasons) and a
fixed footer (magic, format version, trailer offset and length, and a CRC-32 of everything after
the records).
Readers check the footer, the version, the file's size and the checksum of the fingerprints and
trailer before they use an entry, so a truncated file, one of another format version or one whose
fingerprints are damaged is rebuilt, never misread: the lineage digest (tracking/lineage.py) never
comes from damaged fingerprints. Each record's checksum is checked where the record is read anyway,
the first time a process reads it (a second pass over the entry before training would read it
twice from the disk), so no damaged pixels reach a model either: a damaged record is decoded again
from its file and written back, with one warning naming the entry. The records' hash is XXH3
(xxhash), several times faster than CRC-32, so that checking where the records are read costs
little beside reading them; it misses all but 2**-64 of random damage. CRC-32, which detects any
burst of damage up to 32 bits, guards the smaller rest.

The key is a digest of the format version, the image size, the pixel limit
(`dataset.max_image_pixels`) and every file's absolute path, size,
mtime and ctime (`stat` only: a hit reads no image file). Any write to a file changes its ctime,
which no tool can set back, so changed pixels are never reused; a `chmod`/`touch` or a copy of
the folder rebuilds an entry that would have been the same (a content digest would not, but would
read every file on every run: 5-10 GB for IP102). The content fingerprints are still computed
while decoding (for the lineage digest), at no extra read.

Entries are written to a temporary file in the same folder, fsynced and renamed into place
(insect_exp/files.py), so an interrupted write is never read. The writer
holds a lock on its temporary file (`fcntl.flock`) until the rename: a temporary file nobody
holds belongs to a writer that died, and the next start deletes it; those still being written
count toward the cap. A lock file per key (`flock` too, which Linux maps to POSIX locks on NFS)
makes a second run or sweep job wait for the first one's entry and reuse it. Using an entry
touches its mtime; after each write the least recently used entries are deleted until the folder
is under its cap (an entry another process has open stays readable until it closes).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from insect_exp import files
from insect_exp.config import MAX_IMAGE_PIXELS, CacheMode, DatasetConfig

log = logging.getLogger(__name__)

# Bump when the layout or the meaning of an entry changes. 2: JPEGs reduced while decoding;
# 3: a CRC-32 per record, and one of the fingerprints, checksums and trailer in the footer;
# 4: an XXH3 hash per record instead (checked as records are read).
FORMAT_VERSION = 4
_MAGIC = b"INSXIMGS"
# CRC-32 of the bytes between the records and the footer, magic, format version, trailer offset
# and length (the last four where format version 2 had them: it sees another version here)
_FOOTER = struct.Struct("<I8sIQQ")
_SUFFIX = ".imgs"
_META_BYTES = 8 + 8  # per record, after the records: its fingerprint and its checksum


@dataclass(frozen=True)
class CachePolicy:
    """What dataset.cache asks for: where decoded images go, and the caps."""

    mode: CacheMode
    directory: Path
    max_memory_bytes: int
    max_disk_bytes: int

    @classmethod
    def from_config(cls, cfg: DatasetConfig) -> CachePolicy:
        directory = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root()
        return cls(
            cfg.cache,
            directory,
            cfg.cache_max_memory_mb * 2**20,
            int(cfg.cache_max_disk_gb * 1e9),
        )


class CacheUnavailable(Exception):
    """The cache folder cannot be written (read-only, full, no permission); the message says why."""


CACHE_DIR_VARIABLE = "INSECT_EXP_CACHE_DIR"
_FORMER_VARIABLE = "INSECT_EXP_DATA_DIR"  # deprecated: the demo set's and features' folder


def cache_root() -> Path:
    """The folder of every cache (decoded images, backbone features, the demo set):
    $INSECT_EXP_CACHE_DIR if set, else ($XDG_CACHE_HOME or ~/.cache)/insect_exp.

    $INSECT_EXP_DATA_DIR, its former name, is still read (with a warning) when it is not set.
    """
    directory = os.environ.get(CACHE_DIR_VARIABLE)
    former = os.environ.get(_FORMER_VARIABLE)
    if former:
        _warn_former(bool(directory))
    chosen = directory or former
    if chosen:
        return Path(chosen).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "insect_exp"


@functools.cache
def _warn_former(ignored: bool) -> None:
    """Say once per process that INSECT_EXP_DATA_DIR is deprecated."""
    what = f"ignored, as {CACHE_DIR_VARIABLE} is set" if ignored else "read for now"
    log.warning("%s is deprecated (%s): set %s instead", _FORMER_VARIABLE, what,
                CACHE_DIR_VARIABLE)  # fmt: skip


def touch(path: Path) -> None:
    """Mark PATH as just used (its mtime: atime is often off), if the folder lets us."""
    with contextlib.suppress(OSError):
        os.utime(path)


def evict_lru(groups: dict[str, list[Path]], max_bytes: int, keep: Iterable[str] = ()) -> list[str]:
    """Delete whole groups of files, least recently used first, until they total <= max_bytes.

    A group's last use is its newest mtime. Groups in `keep` (in use here) are never deleted.

    Returns:
        The names of the deleted groups.
    """
    sizes: dict[str, int] = {}
    used: dict[str, float] = {}
    for name, members in groups.items():
        size, latest = 0, 0.0
        for path in members:
            with contextlib.suppress(OSError):
                st = path.stat()
                size += st.st_size
                latest = max(latest, st.st_mtime)
        sizes[name], used[name] = size, latest
    total = sum(sizes.values())
    kept = set(keep)
    deleted = []
    for name in sorted(groups, key=lambda n: used[n]):
        if total <= max_bytes:
            break
        if name in kept:
            continue
        for path in groups[name]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        total -= sizes[name]
        deleted.append(name)
    if deleted:
        log.info("cache over %.1f GB: evicted %d least recently used entries", max_bytes / 1e9,
                 len(deleted))  # fmt: skip
    return deleted


def _unavailable(directory: Path, err: OSError) -> CacheUnavailable:
    reason = {
        errno.ENOSPC: "disk full",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
    }.get(err.errno or 0, (err.strerror or type(err).__name__).lower())
    return CacheUnavailable(f"cannot write the image cache in {str(directory)!r}: {reason}")


class CacheDamaged(OSError):
    """A record of an entry is damaged and cannot be decoded again from its file."""


_DAMAGED = re.compile(
    r"image cache entry .+? is damaged at record \d+, .+?delete the entry to rebuild it"
)


def damage_reported(err: BaseException) -> str | None:
    """The CacheDamaged message that ERR carries, if any: one raised where a batch was read comes
    wrapped in TensorFlow's error, among its traceback."""
    found = _DAMAGED.search(str(err))
    return found.group(0) if found else None


# A record's checksum (XXH3, 64 bits): the module docstring says why.
_record_hash = xxhash.xxh3_64_intdigest

# The image of record i decoded again from its file, to repair a damaged record (None: it cannot).
Repair = Callable[[int], np.ndarray | None]


class _RecordFile:
    """An open entry, shared by the views of its records; closed when the last one goes.

    With `checksums`, each record's hash is checked the first time this process reads it, where
    it is read anyway (in tf.data's parallel calls), so that checking costs no
    second pass over the entry. A damaged record is decoded again by `repair` (and written back
    when that gives the bytes that were cached), with one warning naming the entry.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.checksums: np.ndarray | None = None  # None: trusted (this process wrote it)
        self.checked = np.zeros(0, dtype=bool)  # which records were read and checked
        self.repair: Repair | None = None
        self._lock = threading.Lock()
        self._warned = False

    def check_on_read(self, checksums: np.ndarray, repair: Repair | None) -> None:
        """Check each record against CHECKSUMS as it is first read; repair damaged ones."""
        self.checksums, self.repair = checksums, repair
        self.checked = np.zeros(len(checksums), dtype=bool)

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self.fd)

    def verify(self, records: np.ndarray, flat: np.ndarray) -> None:
        """Check the records just read into FLAT's rows (once each); repair damaged ones."""
        if self.checksums is None:
            return
        for k in np.flatnonzero(~self.checked[records]).tolist():
            record = int(records[k])
            if _record_hash(flat[k].data) != int(self.checksums[record]):
                flat[k] = self._repaired(record, flat.shape[1])
            self.checked[record] = True

    def _repaired(self, record: int, size: int) -> np.ndarray:
        """Record RECORD decoded again from its file, written back if it is what was cached."""
        with self._lock:  # one warning, and one repair at a time
            if not self._warned:
                log.warning("image cache entry %s is damaged (record %d does not match its "
                            "checksum): decoding its damaged records again from their files",
                            self.path, record)  # fmt: skip
                self._warned = True
            again = None if self.repair is None else self.repair(record)
            if again is not None:
                again = np.ascontiguousarray(again, dtype=np.uint8).reshape(-1)
            if again is None or again.size != size or not self._intact(record, again):
                raise CacheDamaged(errno.EIO, f"image cache entry {self.path} is damaged at "
                                   f"record {record}, which cannot be decoded again as it was "
                                   "cached: delete the entry to rebuild it")  # fmt: skip
            self._write_back(record, again)
            return again

    def _intact(self, record: int, data: np.ndarray) -> bool:
        return self.checksums is not None and _record_hash(data.data) == int(self.checksums[record])

    def _write_back(self, record: int, image: np.ndarray) -> None:
        """Put the repaired record into the entry, if it is still this one and writable."""
        with contextlib.suppress(OSError):
            fd = os.open(self.path, os.O_WRONLY)
            try:
                if os.fstat(fd).st_ino == os.fstat(self.fd).st_ino:
                    files.write_all(fd, image.data, record * image.size)
            finally:
                os.close(fd)


class DiskImages:
    """Images read from an entry's records on demand, indexed like the in-memory uint8 array.

    `images[i]`, `images[a:b]` and `images[index_array]` read those records (pread, which leaves
    them in the page cache rather than in this process's memory); `subset` gives a view.
    """

    def __init__(self, file: _RecordFile, record_shape: Sequence[int], rows: np.ndarray):
        self._file = file
        self._record_shape = tuple(int(v) for v in record_shape)
        self._record_bytes = int(np.prod(self._record_shape))
        self._rows = np.asarray(rows, dtype=np.int64)

    dtype = np.dtype(np.uint8)
    ndim = 4

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._rows), *self._record_shape)

    @property
    def path(self) -> Path:
        return self._file.path

    def __len__(self) -> int:
        return len(self._rows)

    def subset(self, index: np.ndarray) -> DiskImages:
        return DiskImages(self._file, self._record_shape, self._rows[index])

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self._read(np.atleast_1d(self._rows[index]))[0]
        return self._read(self._rows[index])

    def _read(self, records: np.ndarray) -> np.ndarray:
        records = np.atleast_1d(records)
        out = np.empty((len(records), *self._record_shape), dtype=np.uint8)
        flat = out.reshape(len(records), -1)
        # One read per run of consecutive records (a whole batch when reading in order).
        for start, end in _consecutive_runs(records):
            view = flat[start:end].data.cast("B")
            _pread_into(self._file.fd, view, int(records[start]) * self._record_bytes)
        self._file.verify(records, flat)
        return out


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill VIEW from the file's bytes at OFFSET (a read may return fewer)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, "the image cache entry ends early")
        done += n


def _consecutive_runs(records: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) positions of each run of consecutive record numbers, one I/O call each."""
    breaks = (np.flatnonzero(np.diff(records) != 1) + 1).tolist()
    return list(zip([0, *breaks], [*breaks, len(records)], strict=True))


@dataclass
class CachedSplit:
    """An entry as read back: every record, the content fingerprints, the files that failed."""

    images: DiskImages  # one record per file of the list, failed ones included (zeros)
    fingerprints: np.ndarray  # uint64, one per file
    failures: list[tuple[int, str]]  # (index in the file list, reason)


class RecordWriter:
    """Writes decoded images into a temporary entry as they arrive, in any order."""

    def __init__(self, fd: int, count: int, record_shape: Sequence[int]):
        self.fd = fd
        self.count = count
        self.record_shape = tuple(int(v) for v in record_shape)
        self.record_bytes = int(np.prod(self.record_shape))
        self.fingerprints = np.zeros(count, dtype=np.uint64)
        self.checksums = np.zeros(count, dtype=np.uint64)  # each record's hash

    def put(self, index: np.ndarray, images: np.ndarray, fingerprints: np.ndarray) -> None:
        """Write images[k] as record index[k]."""
        index = np.asarray(index)
        images = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(index), -1)
        self.fingerprints[index] = fingerprints
        self.checksums[index] = [_record_hash(image.data) for image in images]
        if len(index) > 1 and (np.diff(index) < 0).any():  # decoding finishes in any order
            order = np.argsort(index, kind="stable")
            index, images = index[order], images[order]
        for start, end in _consecutive_runs(index):
            data = images[start:end].data.cast("B")
            files.write_all(self.fd, data, int(index[start]) * self.record_bytes)


def split_key(
    paths: Sequence[str], image_size: Sequence[int], max_pixels: int = MAX_IMAGE_PIXELS
) -> str:
    """The entry key of a file list at an image size and pixel limit: names and `stat`s only
    (module docstring)."""
    digest = hashlib.blake2b(digest_size=16)
    size = f"{int(image_size[0])}x{int(image_size[1])}"
    # The limit decides which files fail: an entry made under another one is not reused.
    digest.update(f"v{FORMAT_VERSION} {size} max {int(max_pixels)} pixels\n".encode())
    for path in paths:
        try:
            st = os.stat(path)
            stamp = f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"
        except OSError as err:
            stamp = f"error {err.errno}"  # it fails to decode too, and is reported then
        digest.update(f"{os.path.abspath(path)}\0{stamp}\n".encode())
    return digest.hexdigest()


class Unusable(ValueError):
    """Why an entry cannot be used; `damaged` when its bytes are not the ones written."""

    def __init__(self, reason: str, damaged: bool = True):
        super().__init__(reason)
        self.damaged = damaged


class ImageCache:
    """The entries of one cache folder, capped at max_bytes (least recently used go first)."""

    def __init__(self, directory: str | Path, max_bytes: int):
        self.root = Path(directory).expanduser()
        self.dir = self.root / "images"
        self.max_bytes = int(max_bytes)
        self._in_use: set[str] = set()

    def entry_path(self, key: str) -> Path:
        return self.dir / f"{key}{_SUFFIX}"

    def open(
        self,
        key: str,
        count: int,
        record_shape: Sequence[int],
        verify: bool = True,
        repair: Repair | None = None,
    ) -> CachedSplit | None:
        """The complete entry of KEY with intact fingerprints and trailer, or None if there is none
        (or it is of another version, or damaged: said in the log).

        Args:
            verify: check each record's checksum as it is first read (`_RecordFile`); False
                trusts them.
            repair: decodes record i again from its file, for a damaged record (without it, reading
                one raises CacheDamaged).
        """
        found, problem = self._load(key, count, record_shape, verify, repair)
        if problem is not None:
            self._report(key, problem)
        return found

    def _report(self, key: str, problem: Unusable) -> None:
        name = self.entry_path(key)
        if problem.damaged:
            log.warning("image cache entry %s is damaged (%s): rebuilding it", name, problem)
        else:
            log.info("image cache entry %s cannot be used (%s): rebuilding it", name.name, problem)

    def _load(
        self,
        key: str,
        count: int,
        record_shape: Sequence[int],
        verify: bool = True,
        repair: Repair | None = None,
    ) -> tuple[CachedSplit | None, Unusable | None]:
        """KEY's entry if it is there and intact; else why not (None: there is none).

        verify: check each record's checksum when read (not for an entry this process just wrote).
        """
        path = self.entry_path(key)
        try:
            file = _RecordFile(path)
        except OSError:
            return None, None
        try:
            meta, fingerprints, checksums = self._check(file.fd, key, count, record_shape)
        except Unusable as problem:
            return None, problem
        except (OSError, ValueError) as err:  # unreadable, or a trailer that is not JSON
            return None, Unusable(str(err))
        if verify:
            file.check_on_read(checksums, repair)
        touch(path)
        self._in_use.add(key)
        images = DiskImages(file, record_shape, np.arange(count))
        failures = [(int(i), str(reason)) for i, reason in meta["failures"]]
        return CachedSplit(images, fingerprints, failures), None

    @staticmethod
    def _check(
        fd: int, key: str, count: int, record_shape: Sequence[int]
    ) -> tuple[dict, np.ndarray, np.ndarray]:
        """The entry's trailer, fingerprints and records' checksums, once the checksum of these
        matches (else Unusable)."""
        size = os.fstat(fd).st_size
        if size < _FOOTER.size:
            raise Unusable("too short")
        crc, magic, version, at, length = _FOOTER.unpack(
            os.pread(fd, _FOOTER.size, size - _FOOTER.size)
        )
        if magic != _MAGIC:
            raise Unusable("not an image cache entry")
        if version != FORMAT_VERSION:
            raise Unusable(f"format version {version}, this is {FORMAT_VERSION}", damaged=False)
        record_bytes = int(np.prod(record_shape))
        records = count * record_bytes
        if at != records + count * _META_BYTES or at + length + _FOOTER.size != size:
            raise Unusable("incomplete")
        tail = os.pread(fd, at + length - records, records)
        if zlib.crc32(tail) != crc:
            raise Unusable("its fingerprints or trailer do not match their checksum")
        meta = json.loads(tail[at - records :])
        if meta.get("key") != key or meta.get("shape") != list(record_shape):
            raise Unusable("written for other files", damaged=False)
        fingerprints = np.frombuffer(tail, np.uint64, count).copy()
        checksums = np.frombuffer(tail, np.uint64, count, count * 8).copy()
        return meta, fingerprints, checksums

    @contextlib.contextmanager
    def _lock(self, key: str):
        """Hold KEY's lock file; a second process waits here until the first one is done."""
        locks = self.dir / "locks"
        try:
            locks.mkdir(parents=True, exist_ok=True)
            fd = os.open(locks / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise _unavailable(self.dir, err) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process writing image cache entry %s", key[:12])
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def get_or_build(
        self,
        key: str,
        count: int,
        record_shape: Sequence[int],
        fill: Callable[[RecordWriter], list[tuple[int, str]]],
        repair: Repair | None = None,
    ) -> tuple[CachedSplit, bool]:
        """KEY's entry, reused or written by `fill` (which decodes into the writer it is given).

        A reused entry's records are checked as they are read, and a damaged one decoded again by
        `repair` (`open`).

        Returns:
            The entry, and whether this call wrote it.

        Raises:
            CacheUnavailable: the folder cannot be written (and holds no entry for KEY).
        """
        files.sweep_temporaries(self.dir)  # dead writers' files (none where the folder is not yet)
        found, problem = self._load(key, count, record_shape, repair=repair)
        if found is not None:
            return found, False
        seen = None
        if problem is not None:
            self._report(key, problem)  # once: the look under the lock says nothing new
            seen = _identity(self.entry_path(key))
        with self._lock(key):
            if seen is None or _identity(self.entry_path(key)) != seen:  # written while we waited
                found, _ = self._load(key, count, record_shape, repair=repair)
                if found is not None:
                    return found, False
            self._write(key, count, record_shape, fill)
        found, problem = self._load(key, count, record_shape, verify=False)
        if found is None:  # gone already: another process evicted it, or the disk lost it
            why = "vanished" if problem is None else f"unusable once written ({problem})"
            raise CacheUnavailable(f"image cache entry {self.entry_path(key)} {why}")
        self.evict()
        return found, True

    def _write(
        self,
        key: str,
        count: int,
        record_shape: Sequence[int],
        fill: Callable[[RecordWriter], list[tuple[int, str]]],
    ) -> None:
        record_bytes = int(np.prod(record_shape))
        needed = count * (record_bytes + _META_BYTES)
        try:
            free = shutil.disk_usage(self.dir).free
        except OSError as err:
            raise _unavailable(self.dir, err) from None
        if needed > free:
            raise CacheUnavailable(
                f"cannot write the image cache in {str(self.dir)!r}: disk full "
                f"({needed / 2**20:.0f} MB needed, {free / 2**20:.0f} MB free)"
            )
        try:
            with files.replacing(self.entry_path(key)) as fd:
                os.ftruncate(fd, count * record_bytes)
                writer = RecordWriter(fd, count, record_shape)
                _finish_entry(fd, key, writer, fill(writer))
        except OSError as err:
            raise _unavailable(self.dir, err) from None

    def evict(self) -> list[str]:
        """Delete least recently used entries (not those this process uses) down to the cap.

        Temporary files of writers still at work count toward it; dead writers' are deleted.
        """
        writing = {p.name: [p] for p in files.sweep_temporaries(self.dir)}
        groups = {p.name.removesuffix(_SUFFIX): [p] for p in self.dir.glob(f"*{_SUFFIX}")}
        return evict_lru({**groups, **writing}, self.max_bytes, self._in_use | set(writing))


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What tells one file at PATH from the next one renamed there (None: there is none)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _finish_entry(fd: int, key: str, writer: RecordWriter, failures: list[tuple[int, str]]) -> None:
    """Write the fingerprints, checksums, trailer and footer after the writer's records."""
    meta = {"key": key, "shape": list(writer.record_shape), "count": writer.count,
            "failures": [[int(i), r] for i, r in failures]}  # fmt: skip
    tail = writer.fingerprints.tobytes() + writer.checksums.tobytes() + json.dumps(meta).encode()
    records = writer.count * writer.record_bytes
    at = records + writer.count * _META_BYTES
    footer = _FOOTER.pack(zlib.crc32(tail), _MAGIC, FORMAT_VERSION, at, records + len(tail) - at)
    files.write_all(fd, tail + footer, records)
