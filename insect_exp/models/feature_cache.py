"""Frozen-backbone features computed once per image, kept in memory or on disk.

On disk, features live under a directory named by a digest of the backbone (its SavedModel files,
or its architecture and weights), one row per image keyed by a digest of the decoded pixels
(which covers the file's content, the image size and the decoder). A changed backbone, image size
or file therefore never reuses stale features, and unchanged images are reused across runs,
splits and sweeps. Nothing is evicted:
delete the directory to reclaim the space.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tf_keras as keras

from insect_exp.data.pipeline import ImageSplit, make_dataset

log = logging.getLogger(__name__)

_VERSION = "features-v1"  # bump when the layout or the meaning of a stored row changes


def default_cache_dir() -> Path:
    """$INSECT_EXP_DATA_DIR/features-v1 if set, else ($XDG_CACHE_HOME or ~/.cache)/insect_exp/..."""
    data_dir = os.environ.get("INSECT_EXP_DATA_DIR")
    if data_dir:
        return Path(data_dir).expanduser() / _VERSION
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "insect_exp" / _VERSION


def saved_model_digest(path: str | Path) -> str:
    """Digest of every file (name and content) of a SavedModel directory."""
    root = Path(path)
    digest = hashlib.blake2b(digest_size=16)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        with file.open("rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def weights_digest(name: str, weights: Sequence[np.ndarray]) -> str:
    """Digest of a backbone's name and every weight's shape and values."""
    digest = hashlib.blake2b(name.encode() + b"\0", digest_size=16)
    for array in weights:
        digest.update(str(array.shape).encode() + np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def image_digests(images: np.ndarray) -> list[str]:
    """One digest per image of its shape and pixels."""
    return [
        hashlib.blake2b(str(image.shape).encode() + image.tobytes(), digest_size=16).hexdigest()
        for image in images
    ]


class FeatureStore:
    """Feature rows on disk for one backbone, in shards written atomically.

    Shards are (NAME.keys.npy, NAME.features.npy) pairs; the keys file is renamed into place last,
    so concurrent runs (sweeps) only ever see complete shards.
    """

    def __init__(self, root: str | Path, backbone_key: str):
        """Args: backbone_key: a digest that changes whenever the backbone's function does."""
        self.dir = Path(root) / backbone_key

    def _index(self) -> dict[str, tuple[str, int]]:
        index: dict[str, tuple[str, int]] = {}
        for keys_file in sorted(self.dir.glob("*.keys.npy")):
            shard = keys_file.name.removesuffix(".keys.npy")
            for row, key in enumerate(np.load(keys_file).tolist()):
                index[key] = (shard, row)
        return index

    def get(self, keys: Sequence[str]) -> tuple[np.ndarray | None, np.ndarray]:
        """Stored features of `keys` (None if none is stored) and the mask of those found."""
        index = self._index() if self.dir.is_dir() else {}
        found = np.array([key in index for key in keys], dtype=bool)
        if not found.any():
            return None, found
        features = None
        by_shard: dict[str, list[int]] = {}
        for i in np.flatnonzero(found):
            by_shard.setdefault(index[keys[i]][0], []).append(i)
        for shard, positions in by_shard.items():
            stored = np.load(self.dir / f"{shard}.features.npy", mmap_mode="r")
            if features is None:
                features = np.zeros((len(keys), stored.shape[1]), dtype=np.float32)
            features[positions] = stored[[index[keys[i]][1] for i in positions]]
        return features, found

    def put(self, keys: Sequence[str], features: np.ndarray) -> None:
        """Store one feature row per key."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.blake2b("".join(keys).encode(), digest_size=16).hexdigest()
        for suffix, array in (("features", features.astype(np.float32)), ("keys", np.array(keys))):
            tmp = self.dir / f".{name}.{suffix}.{uuid.uuid4().hex}.tmp"
            with tmp.open("wb") as f:
                np.save(f, array)
            os.replace(tmp, self.dir / f"{name}.{suffix}.npy")


def _predict(extractor: keras.Model, split: ImageSplit, batch_size: int) -> np.ndarray:
    return extractor.predict(make_dataset(split, batch_size), verbose=0).astype(np.float32)


def cached_features(
    extractor: keras.Model,
    split: ImageSplit,
    batch_size: int,
    store: FeatureStore | None = None,
) -> tuple[ImageSplit, int]:
    """The split with each image replaced by its backbone features, computing only missing ones.

    Returns:
        A split whose `images` are float32 feature rows (same labels, paths and order), and how
        many images went through the backbone.
    """
    if store is None:
        features = _predict(extractor, split, batch_size)
        return ImageSplit(features, split.labels, split.paths), len(split)
    keys = image_digests(split.images)
    features, found = store.get(keys)
    missing = np.flatnonzero(~found)
    if missing.size:
        new = _predict(extractor, split.subset(missing), batch_size)
        store.put([keys[i] for i in missing], new)
        if features is None:
            features = np.zeros((len(split), new.shape[1]), dtype=np.float32)
        features[missing] = new
    log.info("feature cache %s: %d of %d images computed", store.dir, missing.size, len(split))
    return ImageSplit(features, split.labels, split.paths), int(missing.size)
