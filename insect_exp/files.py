"""Files and folders replaced whole: a reader sees the old one or the new one, never a part.

A file is written to a temporary file in its folder, fsynced, renamed into place and the folder
fsynced; a folder is built aside and renamed into place. Temporary files are locked (`flock`)
by their writer until the rename, so a temporary file nobody holds belongs to a writer that
died and `sweep_temporaries` deletes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def locked_temporary(directory: Path, stem: str) -> tuple[Path, int]:
    """A new file DIRECTORY/.STEM.<random>.tmp, open for writing and locked (`flock`) while the
    returned descriptor is open: `sweep_temporaries` then leaves it alone.

    Rename it into place before closing the descriptor: once closed, it is a dead writer's.
    """
    while True:
        path = directory / f".{stem}.{uuid.uuid4().hex}.tmp"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:
            return path, fd
        os.close(fd)  # swept as a dead writer's between its creation and our lock: another name


def sweep_temporaries(directory: Path, pattern: str = ".*.tmp") -> list[Path]:
    """Delete the temporary files in DIRECTORY (matching PATTERN) that no writer holds.

    Returns:
        The ones still being written.
    """
    live = []
    for path in directory.glob(pattern):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # renamed into place or deleted since the listing
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held (EWOULDBLOCK), or no locks here (ENOLCK): its writer may be alive
            live.append(path)
        else:
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    path.unlink()
                    log.info("deleted %s, left by a cache writer that died", path)
        finally:
            os.close(fd)
    return live


def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite until every byte is written (a write may take fewer)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[int]:
    """A locked temporary file's descriptor, to write PATH's new content into; on a clean exit
    it is fsynced and renamed to PATH, then the folder fsynced. On an error PATH is as it was."""
    tmp, fd = locked_temporary(path.parent, path.name)
    try:
        yield fd
        os.fsync(fd)
        os.replace(tmp, path)  # while locked: see locked_temporary
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """PATH holds DATA whole and durably, or is as it was."""
    with replacing(path) as fd:
        write_all(fd, data, 0)


def fsync_dir(directory: Path) -> None:
    """Make a rename in DIRECTORY durable (where the file system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def aside(path: Path, label: str) -> Path:
    """A new, unused name next to PATH (a hidden sibling: renames stay on one file system)."""
    return path.with_name(f".{path.name}-{label}{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def new_dir(target: Path) -> Iterator[Path]:
    """A fresh folder to fill, put in TARGET's place (whole) when the block ends; on an error it
    goes at once (on a full disk it holds the space others need) and TARGET is as it was."""
    fresh = aside(target, "")
    try:
        fresh.mkdir(parents=True)
        yield fresh
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    replace_dir(fresh, target)


def replace_dir(fresh: Path, target: Path) -> None:
    """Put the complete folder FRESH where TARGET is (renames: nothing is copied)."""
    old = aside(target, "old-")
    if target.exists():
        target.rename(old)
    fresh.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Remove the folder PATH, moved aside first so that it is never half there."""
    gone = aside(path, "removed-")
    path.rename(gone)
    shutil.rmtree(gone, ignore_errors=True)
