"""The data audit of a loaded dataset (data/duplicates.py), run as the data is loaded, and
`dataset.dedupe`: the test images with a twin in train dropped before any training.

With the disk cache, each split's perceptual hashes, thumbnails and original sizes are kept in a
small file beside the cache's entries, `<cache_dir>/images/audit/<key>.hashes`, keyed by the image
size and the content fingerprints of the split's files: a run reusing the decoded images reuses it,
and a change to any file's bytes makes another key. Like a cache entry, it ends in a footer (magic,
format version, count, CRC-32 of the rest); one that does not check out is computed again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from insect_exp import files
from insect_exp.config import CacheMode, DatasetConfig
from insect_exp.data import duplicates
from insect_exp.data.audit_inputs import AuditInputs
from insect_exp.data.cache import evict_lru, touch
from insect_exp.data.scan import DatasetError

if TYPE_CHECKING:
    from insect_exp.data.cache import CachePolicy
    from insect_exp.data.pipeline import Data, ImageSplit

log = logging.getLogger(__name__)

_VERSION = 3  # bump when what is kept changes meaning
_MAGIC = b"INSXAUDT"
_FOOTER = struct.Struct("<I8sIQ")  # CRC-32 of the rest, magic, version, count
_SUFFIX = ".hashes"
# The kept hashes may take this share of the disk cache's cap (least recently used go first):
# a few hundred bytes an image, against an entry's tens of KB.
_SHARE_OF_CAP = 0.01


def audit_data(data: Data, cfg: DatasetConfig, policy: CachePolicy | None) -> Data:
    """DATA with its audit (data.audit), and without its test images that have a twin in train
    when cfg.dedupe; unchanged when cfg.audit and cfg.dedupe are both off."""
    if not (cfg.audit or cfg.dedupe):
        return data
    store = None
    if policy is not None and data.storage is CacheMode.disk:
        store = Path(policy.directory) / "images" / "audit"
    splits = {"train": data.train, "val": None if data.val_is_test else data.val, "test": data.test}
    hashes = {
        name: split_hashes(split, store, name)
        for name, split in splits.items()
        if split is not None
    }
    if store is not None and policy is not None:
        used = {f"{_key(split)}{_SUFFIX}" for split in splits.values() if split is not None}
        _tidy(store, int(policy.max_disk_bytes * _SHARE_OF_CAP), used)
    audit = duplicates.find_duplicates(hashes, cfg.duplicate_distance)
    twins = len(audit.test_twins)
    if twins:
        dropped = (
            "dropped (dataset.dedupe=true)" if cfg.dedupe else "dataset.dedupe=true drops them"
        )
        log.warning(
            "%d test images have a twin in train (exact or near duplicates): pairs in %s; %s",
            twins,
            duplicates.TSV_NAME,
            dropped,
        )
    if cfg.dedupe and data.test is not None:
        return _dedupe(data, audit)
    data.audit = audit
    return data


def _dedupe(data: Data, audit: duplicates.Audit) -> Data:
    """DATA without the test images that have a twin in train (validation too, if it is test)."""
    assert data.test is not None
    if not len(audit.test_twins):
        data.audit = audit
        return data
    keep, audit = duplicates.without_test_twins(audit, len(data.test))
    if not len(keep):
        raise DatasetError(
            f"every test image has a twin in train ({duplicates.TSV_NAME}): dataset.dedupe=true "
            "would leave no test split"
        )
    log.info("dataset.dedupe: %d of %d test images kept", len(keep), len(data.test))
    test = data.test.subset(keep)
    val = test if data.val_is_test else data.val
    return dataclasses.replace(data, val=val, test=test, audit=audit)


def split_hashes(split: ImageSplit, store: Path | None, name: str) -> duplicates.SplitHashes:
    """The split's perceptual hashes and original sizes: kept ones from STORE if there, else
    those its decoding took (or, for a reused cache entry, computed now), and kept in STORE
    when it is given."""
    key = _key(split)
    path = None if store is None or key is None else store / f"{key}{_SUFFIX}"
    kept = None if path is None else _read(path, len(split))
    if kept is not None:
        log.info("audit of %s: %d images' hashes reused from %s", name, len(split), path)
        hashes, sizes, thumbs = kept
    else:
        inputs = split.audit_inputs or AuditInputs.of_images(split.images, split.paths)
        hashes, sizes, thumbs = inputs.hashes, inputs.sizes, inputs.thumbs
        if path is not None:
            _write(path, hashes, sizes, thumbs)
    return duplicates.SplitHashes(list(split.paths), split.fingerprints, hashes, sizes, thumbs)


def _key(split: ImageSplit) -> str | None:
    """What the hashes depend on: the image size and each file's bytes (by its fingerprint)."""
    if split.fingerprints is None:
        return None
    digest = hashlib.blake2b(digest_size=16)
    shape = "x".join(str(int(v)) for v in split.images.shape[1:])
    digest.update(f"v{_VERSION} {shape} phash{duplicates.HASH_SIZE}\n".encode())
    digest.update(np.ascontiguousarray(split.fingerprints, dtype=np.uint64).tobytes())
    return digest.hexdigest()


def _tidy(store: Path, max_bytes: int, used: set[str]) -> None:
    """Delete the least recently used kept hashes (not those of this run) down to MAX_BYTES."""
    evict_lru({path.name: [path] for path in store.glob(f"*{_SUFFIX}")}, max_bytes, used)


Kept = tuple[np.ndarray, np.ndarray, np.ndarray]  # hashes, sizes, thumbnails


def _read(path: Path, count: int) -> Kept | None:
    """The hashes, sizes and thumbnails kept at PATH if it is whole and for COUNT images."""
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    thumb = duplicates.THUMB_BYTES
    body = count * (8 + 8 + thumb)
    if len(blob) != body + _FOOTER.size:
        return None
    crc, magic, version, kept = _FOOTER.unpack(blob[body:])
    if magic != _MAGIC or version != _VERSION or kept != count or zlib.crc32(blob[:body]) != crc:
        log.info("audit hashes %s cannot be used: computing them again", path.name)
        return None
    hashes = np.frombuffer(blob, np.uint64, count).copy()
    sizes = np.frombuffer(blob, np.int32, 2 * count, 8 * count).reshape(count, 2).copy()
    thumbs = np.frombuffer(blob, np.uint8, thumb * count, 16 * count).copy()
    touch(path)  # used: for whoever tidies the folder by age
    return hashes, sizes, thumbs.reshape(count, *duplicates.THUMB_SHAPE)


def _write(path: Path, hashes: np.ndarray, sizes: np.ndarray, thumbs: np.ndarray) -> None:
    """Keep what the audit computed at PATH (atomically); a folder that cannot be written is
    fine."""
    body = hashes.astype(np.uint64).tobytes() + sizes.astype(np.int32).tobytes()
    body += np.ascontiguousarray(thumbs, dtype=np.uint8).tobytes()
    footer = _FOOTER.pack(zlib.crc32(body), _MAGIC, _VERSION, len(hashes))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomic(path, body + footer)
    except OSError as err:
        log.info("cannot keep the audit's hashes in %s (%s)", path.parent, err)
