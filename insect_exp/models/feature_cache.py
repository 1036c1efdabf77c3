"""Frozen-backbone features computed once per image, kept in memory or on disk.

On disk, features live under a directory named by a digest of the backbone (its SavedModel files,
or its architecture and weights), one row per image keyed by a digest of the decoded pixels
(which covers the file's content, the image size and the decoder). A changed backbone, image size
or file therefore never reuses stale features, and unchanged images are reused across runs,
splits and sweeps. Each shard carries a CRC-32 of its features, checked before they are used: a
damaged or truncated shard is deleted with one warning and its features computed again. Reading
a shard touches it; after each write the least recently used shards (of every backbone under the
cache root) are deleted until they fit `max_bytes` (model.feature_cache_max_disk_gb), as the
image cache does (data/cache.py).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import shutil
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tf_keras as keras

from insect_exp import distribute
from insect_exp.data.cache import DiskImages, cache_root, evict_lru, touch
from insect_exp.data.pipeline import ImageSplit, make_dataset
from insect_exp.files import sweep_temporaries, write_atomic
from insect_exp.progress import Progress

log = logging.getLogger(__name__)

# Bump when the layout or the meaning of a stored row changes. 2: keys as JSON with the features'
# CRC-32.
_VERSION = "features-v2"
_FORMER_VERSIONS = ("features-v1",)
_KEYS = ".keys.json"
_FEATURES = ".features.npy"


def disk_store(directory: str | None, backbone_key: str, max_gb: float) -> FeatureStore:
    """The disk store of a backbone's features, in DIRECTORY (model.feature_cache_dir), else in
    the cache root's features-v2 (the root's former versions deleted first), capped at MAX_GB."""
    if directory:
        root = Path(directory).expanduser()
    else:
        root = cache_root() / _VERSION
        for former in _FORMER_VERSIONS:
            # Read by no release since: evicted by nothing else.
            if (root.parent / former).is_dir():
                log.info("deleting %s, features of a former format", root.parent / former)
                shutil.rmtree(root.parent / former, ignore_errors=True)
    return FeatureStore(root, backbone_key, int(max_gb * 1e9))


def shared_by_workers(extractor: keras.Model) -> bool:
    """True in a multi_worker run: its workers get the chief's features through the disk store."""
    return distribute.cluster_role(extractor.distribute_strategy)[0]


def saved_model_digest(path: str | Path) -> str:
    """Digest of every file (name and content) of a SavedModel directory."""
    root = Path(path)
    digest = hashlib.blake2b(digest_size=16)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        with file.open("rb") as f:
            for chunk in iter(functools.partial(f.read, 1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def weights_digest(name: str, weights: Sequence[np.ndarray]) -> str:
    """Digest of a backbone's name and every weight's shape and values."""
    digest = hashlib.blake2b(name.encode() + b"\0", digest_size=16)
    for array in weights:
        digest.update(str(array.shape).encode() + np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def image_digests(images: np.ndarray | DiskImages, chunk: int = 256) -> list[str]:
    """One digest per image of its shape and pixels (read a chunk at a time from a disk split)."""
    digests = []
    for start in range(0, len(images), chunk):
        for image in images[start : start + chunk]:
            data = str(image.shape).encode() + image.tobytes()
            digests.append(hashlib.blake2b(data, digest_size=16).hexdigest())
    return digests


class DamagedShard(ValueError):
    """A shard whose files are not the ones written (truncated, overwritten, not ours)."""


def _file_crc32(path: Path) -> tuple[int, int]:
    """(size, CRC-32) of a file, read a chunk at a time."""
    crc, size = 0, 0
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


class FeatureStore:
    """Feature rows on disk for one backbone, in shards written atomically.

    Shards are (NAME.keys.json, NAME.features.npy) pairs. The keys file holds the features file's
    size and CRC-32 and is renamed into place last, each fsynced first, so concurrent runs
    (sweeps) only ever see complete shards, and a damaged one is known before it is read.
    """

    def __init__(self, root: str | Path, backbone_key: str, max_bytes: int | None = None):
        """Args: backbone_key: a digest that changes whenever the backbone's function does;
        max_bytes: the cap of the whole cache root (None: no eviction)."""
        self.root = Path(root)
        self.dir = self.root / backbone_key
        self.max_bytes = max_bytes
        self._used: set[str] = set()  # shards this process read or wrote: never evicted by it

    def _index(self) -> tuple[dict[str, tuple[str, int]], dict[str, dict]]:
        """Each stored key's (shard, row), and each shard's keys file."""
        index: dict[str, tuple[str, int]] = {}
        shards: dict[str, dict] = {}
        for keys_file in sorted(self.dir.glob(f"*{_KEYS}")):
            shard = keys_file.name.removesuffix(_KEYS)
            try:
                stored = _read_keys(keys_file)
            except FileNotFoundError:  # evicted since the listing
                continue
            except DamagedShard as err:
                self._discard(shard, str(err))
                continue
            shards[shard] = stored
            for row, key in enumerate(stored["keys"]):
                index[key] = (shard, row)
        return index, shards

    def _discard(self, shard: str, reason: str) -> None:
        """Delete a damaged shard (keys file first), saying so once."""
        log.warning(
            "feature cache shard %s is damaged (%s): computing its features again",
            self.dir / shard,
            reason,
        )
        for suffix in (_KEYS, _FEATURES):
            try:
                (self.dir / f"{shard}{suffix}").unlink()
            except FileNotFoundError:
                pass
            except OSError as err:  # a read-only cache: it stays, and is found damaged again
                log.debug("cannot delete %s: %s", shard, err)

    def _features(self, shard: str, stored: dict) -> np.ndarray:
        """The shard's feature rows (mapped), once its size and checksum match the keys file's."""
        path = self.dir / f"{shard}{_FEATURES}"
        size, crc = _file_crc32(path)
        if (size, crc) != (stored["bytes"], stored["crc32"]):
            raise DamagedShard("its features do not match their checksum")
        try:
            features = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as err:  # a header that is not NumPy's, after all
            raise DamagedShard(str(err)) from None
        if features.ndim != 2 or len(features) != len(stored["keys"]):
            raise DamagedShard(f"{features.shape} features for {len(stored['keys'])} keys")
        return features

    def get(self, keys: Sequence[str]) -> tuple[np.ndarray | None, np.ndarray]:
        """Stored features of `keys` (None if none is stored) and the mask of those found."""
        if self.dir.is_dir():
            sweep_temporaries(self.dir)  # left by writers that died
            index, shards = self._index()
        else:
            index, shards = {}, {}
        found = np.array([key in index for key in keys], dtype=bool)
        features = None
        by_shard: dict[str, list[int]] = {}
        for i in np.flatnonzero(found).tolist():
            by_shard.setdefault(index[keys[i]][0], []).append(i)
        for shard, positions in by_shard.items():
            try:
                stored = self._features(shard, shards[shard])
            except FileNotFoundError:  # evicted by another process since the index was read
                found[positions] = False
                continue
            except DamagedShard as err:
                self._discard(shard, str(err))
                found[positions] = False
                continue
            touch(self.dir / f"{shard}{_FEATURES}")
            self._used.add(f"{self.dir.name}/{shard}")
            if features is None:
                features = np.zeros((len(keys), stored.shape[1]), dtype=np.float32)
            features[positions] = stored[[index[keys[i]][1] for i in positions]]
        return (features if found.any() else None), found

    def put(self, keys: Sequence[str], features: np.ndarray) -> None:
        """Store one feature row per key; where the disk refuses (full, read-only), say so once
        and go on: the features are at hand."""
        name = hashlib.blake2b("".join(keys).encode(), digest_size=16).hexdigest()
        data = io.BytesIO()
        np.save(data, features.astype(np.float32), allow_pickle=False)
        crc = zlib.crc32(data.getbuffer())
        listing = {"keys": list(keys), "bytes": data.getbuffer().nbytes, "crc32": crc}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.dir / f"{name}{_FEATURES}", data.getbuffer())
            write_atomic(self.dir / f"{name}{_KEYS}", json.dumps(listing).encode())
        except OSError as err:
            log.warning(
                "cannot write the feature cache in %s (%s): these features are not kept",
                self.dir,
                err.strerror or err,
            )
            return
        self._used.add(f"{self.dir.name}/{name}")
        if self.max_bytes is not None:
            self.evict()

    def evict(self) -> list[str]:
        """Delete least recently used shards of every backbone down to the cap (keys file first,
        so that no reader indexes rows whose features are gone). Temporary files of writers
        still at work count toward it; dead writers' are deleted."""
        groups: dict[str, list[Path]] = {}
        for keys_file in self.root.glob(f"*/*{_KEYS}"):
            shard = keys_file.name.removesuffix(_KEYS)
            features = keys_file.with_name(f"{shard}{_FEATURES}")
            groups[f"{keys_file.parent.name}/{shard}"] = [keys_file, features]
        writing = {
            f"{tmp.parent.name}/{tmp.name}": [tmp]
            for folder in self.root.iterdir()
            if folder.is_dir()
            for tmp in sweep_temporaries(folder)
        }
        return evict_lru({**groups, **writing}, self.max_bytes or 0, self._used | set(writing))


def _read_keys(path: Path) -> dict:
    """A shard's keys file: its keys, and its features file's size and CRC-32."""
    try:
        stored = json.loads(path.read_bytes())
        keys, size, crc = stored["keys"], int(stored["bytes"]), int(stored["crc32"])
    except (ValueError, KeyError, TypeError) as err:  # not JSON, not UTF-8, not ours
        raise DamagedShard(f"unreadable keys file: {err}") from None
    if not all(isinstance(key, str) for key in keys):
        raise DamagedShard("unreadable keys file")
    return {"keys": keys, "bytes": size, "crc32": crc}


class _PredictProgress(keras.callbacks.Callback):
    def __init__(self, progress: Progress, batch_size: int):
        super().__init__()
        self.progress = progress
        self.batch_size = batch_size

    def on_predict_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.progress.update(min(self.batch_size, self.progress.total - self.progress.done))


def _predict(extractor: keras.Model, split: ImageSplit, batch_size: int) -> np.ndarray:
    with Progress(len(split), "backbone features") as progress:
        # Streams cut the run's peak RSS: benchmarks/hub_vs_reference.py (benchmarks/RESULTS.md).
        if isinstance(extractor, keras.Model) and _on_the_cpu_alone(extractor):
            # A batch's images split across the streams: as many in flight as in one batch.
            per_stream = max(1, -(-batch_size // _STREAMS))
            features = _predict_in_streams(extractor, make_dataset(split, per_stream), progress)
        else:
            features = extractor.predict(
                make_dataset(split, batch_size),
                verbose=0,
                callbacks=[_PredictProgress(progress, batch_size)],
            )
    return features.astype(np.float32)


def _on_the_cpu_alone(model: keras.Model) -> bool:
    """True without a GPU, under TensorFlow's default strategy (no replicas, no workers)."""
    import tensorflow as tf

    return (
        not tf.config.list_logical_devices("GPU")
        and not tf.distribute.has_strategy()
        and model.distribute_strategy is tf.distribute.get_strategy()
    )


_STREAMS = 4  # batches in flight at once on the CPU (_predict_in_streams)

# One traced inference function per extractor, as Keras keeps one predict function per model.
_INFERENCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _inference_fn(model: keras.Model) -> Callable:
    if model not in _INFERENCE:
        import tensorflow as tf

        shape = [None, *model.input_shape[1:]]
        of = weakref.ref(model)  # a strong one would keep the key alive

        def infer(images: Any) -> Any:
            extractor = of()
            assert extractor is not None  # the key of its entry: alive while it is looked up
            return extractor(images, training=False)

        _INFERENCE[model] = tf.function(infer, input_signature=[tf.TensorSpec(shape, tf.float32)])
    return _INFERENCE[model]


def _predict_in_streams(extractor: keras.Model, dataset, progress: Progress) -> np.ndarray:
    """The extractor's output for every batch of `dataset`, in order, `_STREAMS` batches at once.

    On the CPU one batch at a time leaves cores idle between a backbone's many small ops, and
    smaller batches take less memory than Keras's predict on whole ones.
    The calls release the GIL. The other streams are threads that stop, like this one, at the
    first error or interrupt of any.
    """
    call = _inference_fn(extractor)
    batches = enumerate(dataset)
    lock = threading.Lock()
    results: dict[int, np.ndarray] = {}
    failed: list[BaseException] = []
    stop = threading.Event()

    def stream() -> None:
        try:
            while not stop.is_set():
                with lock:
                    item = next(batches, None)
                if item is None:
                    return
                index, (images, _) = item
                features = call(images).numpy()
                with lock:
                    results[index] = features
                    progress.update(len(features))
        except BaseException as err:  # noqa: BLE001 (re-raised by the main thread)
            failed.append(err)
            stop.set()

    helpers = [
        threading.Thread(target=stream, name="insect_exp-features", daemon=True)
        for _ in range(_STREAMS - 1)
    ]
    for helper in helpers:
        helper.start()
    try:
        stream()
    finally:
        stop.set()
        for helper in helpers:
            helper.join()
    if failed:
        raise failed[0]
    if not results:
        return np.zeros((0, *extractor.output_shape[1:]), np.float32)
    return np.concatenate([results[i] for i in range(len(results))])


def cached_features(
    extractor: keras.Model,
    split: ImageSplit,
    batch_size: int,
    store: FeatureStore | None = None,
    worker_timeout_s: float = 600.0,
) -> tuple[ImageSplit, int]:
    """The split with each image replaced by its backbone features, computing only missing ones.

    In a multi_worker run with a store, the chief extracts on its own and writes the store; the
    other workers wait for it to hold their images (after worker_timeout_s they extract what is
    missing themselves).

    Returns:
        A split whose `images` are float32 feature rows (same labels, paths and order), and how
        many images went through the backbone.
    """
    if store is None:
        computed = _predict(extractor, split, batch_size)
        return ImageSplit(computed, split.labels, split.paths), len(split)
    keys = image_digests(split.images)
    several, chief = distribute.cluster_role(extractor.distribute_strategy)
    if several:
        if not chief:
            _wait_for_the_chief(store, keys, worker_timeout_s)
        # Locally: Keras's predict would gather across workers, which would wait for the others.
        extractor = distribute.LocalPredictor(extractor)
    features, found = store.get(keys)
    missing = np.flatnonzero(~found)
    if missing.size:
        # All missing (the first run): the split itself, not a copy of its images.
        todo = split if missing.size == len(split) else split.subset(missing)
        new = _predict(extractor, todo, batch_size)
        store.put([keys[i] for i in missing], new)
        if features is None:
            features = np.zeros((len(split), new.shape[1]), dtype=np.float32)
        features[missing] = new
    log.info("feature cache %s: %d of %d images computed", store.dir, missing.size, len(split))
    assert features is not None  # every image's features were stored or computed above
    return ImageSplit(features, split.labels, split.paths), int(missing.size)


def _wait_for_the_chief(store: FeatureStore, keys: Sequence[str], timeout_s: float) -> None:
    """Until the store holds every key's features, or for timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not store.get(keys)[1].all():
        if time.monotonic() > deadline:
            log.warning("the chief's features did not come in %g s: extracting here", timeout_s)
            return
        time.sleep(0.5)
