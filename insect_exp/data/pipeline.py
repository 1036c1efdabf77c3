"""Decode a Manifest once, into memory or the on-disk cache (data/cache.py), and serve the splits
as tf.data pipelines."""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import tensorflow as tf

from insect_exp import hardware
from insect_exp.config import MAX_IMAGE_PIXELS, CacheMode
from insect_exp.data import multilabel
from insect_exp.data.audit_inputs import AuditInputs
from insect_exp.data.cache import (
    CachePolicy,
    CacheUnavailable,
    DiskImages,
    ImageCache,
    RecordWriter,
    Repair,
    split_key,
)
from insect_exp.data.decode import decode_image_and_size, refusal
from insect_exp.data.scan import (
    DatasetError,
    FileList,
    Manifest,
    check_usable,
    class_counts,
    diagnose,
    stratified_split,
)
from insect_exp.progress import Progress

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ImageSplit:
    """Decoded, resized RGB images (uint8, N x H x W x 3) with labels and source paths.

    `labels` are integer classes (N,), or with task=multilabel multi-hot rows (N x classes, uint8).

    `images` is an in-memory array, or `DiskImages` streaming the same records from the disk cache
    (indexed the same way: images[i], images[a:b], images[index_array]).
    """

    images: np.ndarray | DiskImages
    labels: np.ndarray
    paths: list[str]
    # An 8-byte content fingerprint of each source file (None for derived splits: features).
    fingerprints: np.ndarray | None = None
    # What the data audit needs of each image, taken as it was decoded (None where it was not:
    # a reused disk cache entry, a model's own decoding, derived splits).
    audit_inputs: AuditInputs | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageSplit:
        """The images at `index` (a copy in memory; a view of the same records on disk)."""
        if isinstance(self.images, DiskImages):
            images = self.images.subset(index)
        else:
            images = self.images[index]
        fingerprints = None if self.fingerprints is None else self.fingerprints[index]
        inputs = None if self.audit_inputs is None else self.audit_inputs.subset(index)
        paths = [self.paths[i] for i in index]
        return ImageSplit(images, self.labels[index], paths, fingerprints, inputs)

    def content_digest(self, root: str, class_names: Sequence[str]) -> str:
        """A digest of the split's files: each one's path under ROOT, class and content fingerprint.

        The same for the same files wherever the folder lives; another one once any file's bytes,
        name or class change. Computed from the fingerprints taken while decoding: no file is read.
        """
        if self.fingerprints is None:
            raise ValueError("this split has no content fingerprints")
        rows = sorted(
            f"{os.path.relpath(path, root)}\0{_label_text(label, class_names)}\0{int(fp):016x}\n"
            for path, label, fp in zip(self.paths, self.labels, self.fingerprints, strict=True)
        )
        digest = hashlib.blake2b(digest_size=8)
        for row in rows:
            digest.update(row.encode())
        return digest.hexdigest()

    def partition(self, first: np.ndarray, second: np.ndarray) -> tuple[ImageSplit, ImageSplit]:
        """Two disjoint subsets; in memory the array is reordered in place and both are views of
        it, so a held-out validation split costs no second copy of the images (this split is
        consumed)."""
        if isinstance(self.images, DiskImages):
            return self.subset(first), self.subset(second)
        order = np.concatenate([first, second])
        _take_in_place(self.images, order)
        n = len(first)
        fps, inputs = self.fingerprints, self.audit_inputs

        def part(rows: slice, index: np.ndarray) -> ImageSplit:
            return ImageSplit(
                self.images[rows],
                self.labels[index],
                [self.paths[i] for i in index],
                None if fps is None else fps[index],
                None if inputs is None else inputs.subset(index),
            )

        return part(slice(0, n), first), part(slice(n, len(order)), second)


def _label_text(label: np.ndarray, class_names: Sequence[str]) -> str:
    """A label's class name; a multi-hot row's names joined as a multi-label CSV writes them."""
    if np.ndim(label):
        return multilabel.SEPARATOR.join(class_names[int(i)] for i in np.flatnonzero(label))
    return class_names[int(label)]


def _take_in_place(array: np.ndarray, order: np.ndarray) -> None:
    """array[:len(order)] = array[order], one row at a time instead of a copy of the array.

    Args:
        order: distinct row indices; a permutation of range(len(order)), or increasing.
    """
    order = np.asarray(order, dtype=np.int64)
    if np.all(np.diff(order) > 0):  # dropping rows: every row moves down, never onto a pending one
        for i, j in enumerate(order.tolist()):
            if i != j:
                array[i] = array[j]
        return
    done = np.zeros(len(order), dtype=bool)
    for start in range(len(order)):  # follow each cycle of the permutation with one spare row
        if done[start] or order[start] == start:
            continue
        spare = array[start].copy()
        j = start
        while True:
            done[j] = True
            k = int(order[j])
            if k == start:
                array[j] = spare
                break
            array[j] = array[k]
            j = k


@dataclass
class Data:
    """The splits a run trains, validates and tests on."""

    class_names: list[str]
    train: ImageSplit
    val: ImageSplit
    # None when the folder has no test/ split and validation was held out of train.
    test: ImageSplit | None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Where the files come from (the folder, or the CSV file listing them), for lineage.
    source: str = ""
    # Where the decoded images are kept: memory or disk (dataset.cache).
    storage: CacheMode = CacheMode.memory
    # What the data audit found (data/audit.py: duplicates.Audit); None when it did not run.
    audit: Any = None

    @property
    def val_is_test(self) -> bool:
        return self.test is not None and self.val is self.test

    def stats(self) -> dict[str, Any]:
        """Images per class per split, and the skipped files, for logging."""
        splits = {"train": self.train, "val": self.val, "test": self.test}
        per_class = {
            name: dict(
                zip(
                    self.class_names,
                    class_counts(s.labels, len(self.class_names)).tolist(),
                    strict=True,
                )
            )
            for name, s in splits.items()
            if s is not None
        }
        return {
            "class_names": self.class_names,
            "validation": "test split" if self.val_is_test else "held out of train",
            "images_per_class": per_class,
            "num_images": {name: len(s) for name, s in splits.items() if s is not None},
            "num_skipped": len(self.skipped),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


# A file's bytes (a scalar string) -> its uint8 image: a logged model's own decoder (its
# SavedModel's `decode`), to give it its inputs as it was trained on them.
Decoder = Callable[[tf.Tensor], tf.Tensor]


def _decode_and_fingerprint_fn(
    image_size: Sequence[int], decoder: Decoder | None = None, max_pixels: int = MAX_IMAGE_PIXELS
):
    """path -> (the decoded image, an 8-byte fingerprint of the file's bytes, the file's
    (width, height)), from one read.

    decoder: the decoding to use instead of this version's (`decode_image` at image_size,
        refusing files of more than max_pixels); the size is then not read (0, 0).
    """

    def decode(path: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        contents = tf.io.read_file(path)
        fingerprint = tf.bitcast(tf.fingerprint(contents[tf.newaxis])[0], tf.uint64)
        if decoder is None:
            image, size = decode_image_and_size(contents, image_size, max_pixels)
        else:
            image, size = decoder(contents), tf.zeros(2, tf.int32)
        return image, fingerprint, size

    return decode


# put(indices, images, fingerprints, sizes): stores a decoded batch.
Put = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]


_DECODE_BATCH = 64


def without_autotuning(ds: tf.data.Dataset) -> tf.data.Dataset:
    """`ds` with tf.data's autotuning off; AUTOTUNE parallelism then means one call per core.

    Deleting an autotuned iterator may wait out its tuning thread's current period, which
    doubles while the iterator lives (up to a minute). Keras deletes the training iterator when
    fit returns, so fit could return that late (the main thread waits in
    ~RootDataset::Iterator, joining a tf.data thread). Each epoch's validation iterator and the
    decoding's could wait the same way, for less. With autotuning off, fit returns at once and
    the epochs take about as long: benchmarks/fit_end.py measures both.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


# A split decoded into memory: its images, fingerprints, and the audit's inputs (or None).
Into = tuple[np.ndarray, np.ndarray, AuditInputs | None]


class Decoding:
    """One split's files decoding in TensorFlow's own threads, batch by batch.

    With `into` (images, fingerprints, and the audit's inputs or None): the split kept in memory.
    Each decoded batch is stored into its rows there by the pipeline itself, and only its indices
    come out, so nothing waits in TensorFlow's buffers as a second copy of the images. Such a
    decoding can be started early (`ahead=True`): it then runs to the end in C++ threads that
    hold no GIL while the Python thread does other work (importing MLflow, opening its store), on
    the cores that leaves idle.

    Without `into`, batches of (indices, images, fingerprints, the files' sizes) come out for the
    reader to store (the disk cache's writer), two batches ahead of it.
    """

    def __init__(
        self,
        files: FileList,
        image_size: Sequence[int],
        workers: int = 0,
        into: Into | None = None,
        ahead: bool = False,
        rows: np.ndarray | None = None,
        decoder: Decoder | None = None,
    ):
        """Args:
        rows: decode only these files (indices into `files`), each dropped alone if it fails;
            by default every file, a whole batch dropped when one of its files fails.
        decoder: a model's own decoding, instead of this version's.
        """
        self.into = into
        self.decoder = decoder
        self._first = None
        index = np.arange(len(files), dtype=np.int64) if rows is None else np.asarray(rows)
        if not len(index):
            self.batches: Iterator = iter(())
            return
        decode = _decode_and_fingerprint_fn(image_size, decoder, files.max_pixels)
        paths = [files.paths[i] for i in index.tolist()]
        ds = tf.data.Dataset.from_tensor_slices((index, paths)).map(
            # Each image travels with its index: any finishing order will do. Plain TensorFlow
            # ops: AutoGraph has nothing to convert, and skipping it traces faster.
            tf.autograph.experimental.do_not_convert(lambda i, p: (i, *decode(p))),
            # Two calls per core by default: a call waits on its file's read, and the reader of
            # the batches (the disk cache's writer) holds the GIL. One per core (tf.data's
            # AUTOTUNE without autotuning) leaves cores idle (benchmarks/ingest.py, first ingest).
            num_parallel_calls=workers or 2 * hardware.cpus(),
            deterministic=False,
        )
        # Failures are dropped, so their indices never arrive (`decode_files` then retries them).
        # Dropping whole batches is the fast way: ignore_errors on each image is a stage every
        # image passes through alone, a cost that shows on many small images.
        if rows is None:
            ds = ds.batch(_DECODE_BATCH).ignore_errors()
        else:
            ds = ds.ignore_errors().batch(_DECODE_BATCH)
        buffered = 2  # decoding goes on while the reader stores a batch
        if into is not None:
            store = weakref.WeakMethod(self._store)  # as in read_images
            ds = ds.map(
                lambda *batch: tf.numpy_function(lambda *a: _alive(store)(*a), batch, tf.int64)
            )
            if ahead:  # only indices wait: let the whole split run ahead
                buffered = -(-len(index) // _DECODE_BATCH)
        self.batches = without_autotuning(ds.prefetch(buffered)).as_numpy_iterator()
        if ahead:  # the first request starts TensorFlow's threads; they go on alone
            self._first = next(self.batches, None)

    def _store(
        self, index: np.ndarray, batch: np.ndarray, prints: np.ndarray, sizes: np.ndarray
    ) -> np.ndarray:
        self.put(index, batch, prints, sizes)
        return index

    def put(
        self, index: np.ndarray, batch: np.ndarray, prints: np.ndarray, sizes: np.ndarray
    ) -> None:
        """Store decoded images at their rows of `into`, with what the audit needs of them."""
        assert self.into is not None  # only a decoding into arrays stores its batches here
        images, fingerprints, inputs = self.into
        images[index] = batch
        fingerprints[index] = prints
        if inputs is not None:  # while the batch is in the processor's cache
            inputs.put(index, batch, sizes)

    def __iter__(self) -> Iterator:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        yield from self.batches


def _alive(ref: weakref.ref[T]) -> T:
    """What a weak reference holds: it lives while the pipeline that reads it runs."""
    held = ref()
    if held is None:
        raise ReferenceError("the arrays or decoding of this pipeline are gone")
    return held


def in_memory(
    files: FileList,
    image_size: Sequence[int],
    workers: int = 0,
    ahead: bool = False,
    decoder: Decoder | None = None,
) -> Decoding:
    """The decoding of a split kept in memory, into arrays made for it (`Decoding.into`), with
    the audit's inputs if `files.audit` and this version's decoding decodes it (no `decoder`)."""
    height, width = (int(v) for v in image_size)
    images = fresh_array((len(files), height, width, 3))
    fingerprints = np.zeros(len(files), dtype=np.uint64)
    inputs = AuditInputs.empty(len(files)) if files.audit and decoder is None else None
    into = (images, fingerprints, inputs)
    return Decoding(files, image_size, workers, into, ahead, decoder=decoder)


def fresh_array(shape: tuple[int, ...]) -> np.ndarray:
    """np.empty(shape, uint8) in memory mapped for it, without NumPy's advice for huge pages.

    NumPy asks the kernel for transparent huge pages for large arrays. Where the kernel compacts
    memory to find them as the array is first written (THP defrag "madvise", a common default),
    as after a folder of images has filled the page cache, that costs more than small pages
    save. The mapping is private and populated when made, rather than faulting in page by page
    beside the decoding threads as the images land. The mapping goes with the array. Kept for
    the first ingest in memory mode: benchmarks/ingest.py (its first-touch line measures both).
    """
    size = int(np.prod(shape))
    if size == 0:
        return np.empty(shape, dtype=np.uint8)
    # MAP_POPULATE (Linux): every page in one call, not one fault per page as the images land.
    populate = getattr(mmap, "MAP_POPULATE", 0)
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | populate)
    return np.frombuffer(mapping, dtype=np.uint8).reshape(shape)


def _decode_into(
    files: FileList,
    image_size: Sequence[int],
    workers: int,
    put: Put | None,
    what: str,
    decoding: Decoding | None = None,
) -> list[tuple[int, str]]:
    """Decode every file, handing each batch to put(indices, images, fingerprints, sizes).

    Args:
        put: None to store them as `decoding` does (into its arrays).
        decoding: these files' decoding, perhaps running already (default: a new one); its
            decoder also decodes the files it dropped.

    Returns:
        (index, reason) of each file that failed to decode.
    """
    if decoding is None:
        decoding = Decoding(files, image_size, workers)
    decoder = decoding.decoder
    decode = _decode_and_fingerprint_fn(image_size, decoder, files.max_pixels)
    ok = np.zeros(len(files), dtype=bool)
    if put is None:
        put = decoding.put
    with Progress(len(files), what) as progress:

        def take(decoding: Decoding) -> None:
            for item in decoding:
                if decoding.into is None:
                    put(*item)
                    index = item[0]
                else:
                    index = item  # stored already
                ok[index] = True
                progress.update(len(index))

        take(decoding)
        missing = np.flatnonzero(~ok)
        if len(missing):  # the batches a failure dropped: their other images, one by one
            take(Decoding(files, image_size, workers, decoding.into, rows=missing, decoder=decoder))
    failures: list[tuple[int, str]] = []
    single = tf.function(decode, input_signature=[tf.TensorSpec([], tf.string)])
    for i in np.flatnonzero(~ok):
        try:
            image, fingerprint, size = single(tf.constant(files.paths[i]))
            one = (image, fingerprint, size)
            put(np.array([i]), *(value.numpy()[np.newaxis] for value in one))
        except tf.errors.OpError as err:  # corrupt, truncated, not an image, gone since the scan
            log.debug("TensorFlow cannot decode %s: %s", files.paths[i], err.message)
            failures.append((int(i), refusal(err) or diagnose(files.paths[i])))
    return failures


def _kept(
    images: np.ndarray | DiskImages,
    fingerprints: np.ndarray,
    inputs: AuditInputs | None,
    files: FileList,
    failed: list[tuple[int, str]],
) -> tuple[ImageSplit, list[tuple[str, str]]]:
    """The split without the files that failed, and (path, reason) for those."""
    labels = files.multi_hot if files.multi_hot is not None else np.asarray(files.labels, np.int32)
    failures = sorted((files.paths[i], reason) for i, reason in failed)
    if not failed:  # the usual case
        return ImageSplit(images, labels, list(files.paths), fingerprints, inputs), failures
    keep = np.setdiff1d(np.arange(len(files)), [i for i, _ in failed])
    if isinstance(images, DiskImages):
        images = images.subset(keep)
    else:
        _take_in_place(images, keep)  # drop the failed rows without a second copy
        images = images[: len(keep)]
    paths = [files.paths[i] for i in keep]
    inputs = None if inputs is None else inputs.subset(keep)
    return ImageSplit(images, labels[keep], paths, fingerprints[keep], inputs), failures


def _decode_again(files: FileList, image_size: Sequence[int]) -> Repair:
    """File i decoded again as the cache decoded it (None if it cannot be): a damaged record's
    repair, called where the record was read (perhaps in tf.data's threads)."""
    decode = _decode_and_fingerprint_fn(image_size, None, files.max_pixels)

    def again(i: int) -> np.ndarray | None:
        try:
            return decode(tf.constant(files.paths[i]))[0].numpy()
        except tf.errors.OpError as err:
            log.debug("cannot decode %s again: %s", files.paths[i], err.message)
            return None

    return again


def decode_files(
    files: FileList,
    image_size: Sequence[int],
    workers: int = 0,
    cache: ImageCache | None = None,
    what: str = "decoding",
    started: Decoding | None = None,
    decoder: Decoder | None = None,
) -> tuple[ImageSplit, list[tuple[str, str]]]:
    """Decode and resize every file in parallel; files TensorFlow cannot decode are returned apart.

    All files go through one tf.data map (parallel, in TensorFlow's own threads, three times faster
    than a Python thread pool); the few that fail there are tried once more alone and, if they fail
    again, examined by `scan.diagnose` (header and last bytes, Pillow) only to learn why.

    Args:
        cache: keep the images in this on-disk cache (reusing its entry for these files if there
            is one) and stream them from there; None keeps them in memory.
        started: the files' decoding, already running (`start_decoding`; memory only).
        decoder: a logged model's own decoding (its SavedModel's `decode`), instead of this
            version's: a model then sees files as it was trained on them (into memory, not with
            `cache` or `started`: those decode this version's way).

    Returns:
        The decoded split, and (path, reason) for each file that failed to decode, the reason short
        and stable (`truncated`, `not an image`, `permission denied`, ...).

    Raises:
        CacheUnavailable: the cache folder cannot be written.
    """
    height, width = (int(v) for v in image_size)
    if decoder is not None and (cache is not None or started is not None):
        raise ValueError("a model's own decoder decodes into a new in-memory split only")
    if cache is not None:
        key = split_key(files.paths, image_size, files.max_pixels)
        inputs = AuditInputs.empty(len(files)) if files.audit else None

        def fill(writer: RecordWriter) -> list[tuple[int, str]]:
            def put(index: np.ndarray, batch: np.ndarray, prints: np.ndarray, sizes: np.ndarray):
                writer.put(index, batch, prints)
                if inputs is not None:
                    inputs.put(index, batch, sizes)

            return _decode_into(files, image_size, workers, put, f"{what} into the cache")

        repair = _decode_again(files, image_size)
        entry, written = cache.get_or_build(key, len(files), (height, width, 3), fill, repair)
        if not written:
            log.info("%s: %d images reused from %s", what, len(files), entry.images.path)
        taken = inputs if written else None  # a reused entry's are kept apart (data/audit.py)
        return _kept(entry.images, entry.fingerprints, taken, files, entry.failures)
    if started is None:
        started = in_memory(files, image_size, workers, decoder=decoder)
    failed = _decode_into(files, image_size, workers, None, what, started)
    assert started.into is not None  # a decoding in memory (in_memory's) decodes into arrays
    return _kept(*started.into, files, failed)


def choose_storage(
    policy: CachePolicy | None, num_images: int, image_size: Sequence[int]
) -> CacheMode:
    """memory or disk for NUM_IMAGES decoded images: auto picks memory while they fit the cap."""
    if policy is None:
        return CacheMode.memory
    if policy.mode is not CacheMode.auto:
        return policy.mode
    size = num_images * int(image_size[0]) * int(image_size[1]) * 3
    return CacheMode.memory if size <= policy.max_memory_bytes else CacheMode.disk


def _decode_split(
    files: FileList,
    image_size: Sequence[int],
    workers: int,
    cache: ImageCache | None,
    policy: CachePolicy | None,
    what: str,
    started: Decoding | None = None,
) -> tuple[ImageSplit, list[tuple[str, str]], ImageCache | None]:
    """Decode one split into the cache, or into memory when the cache cannot be written and the
    images fit the memory cap (else DatasetError). Returns the cache to use for the next split."""
    if cache is None or policy is None:
        return (*decode_files(files, image_size, workers, None, what, started), None)
    try:
        return (*decode_files(files, image_size, workers, cache, what), cache)
    except CacheUnavailable as err:
        needed = len(files) * int(image_size[0]) * int(image_size[1]) * 3
        if needed > policy.max_memory_bytes:
            raise DatasetError(
                f"{err}, and the {needed / 2**20:.0f} MB of decoded images exceed "
                f"dataset.cache_max_memory_mb={policy.max_memory_bytes // 2**20}: free space there "
                "or set dataset.cache_dir to a writable folder"
            ) from None
        log.warning("%s: keeping the decoded images in memory instead", err)
        return (*decode_files(files, image_size, workers, None, what), None)


def _storage(manifest: Manifest, image_size: Sequence[int], cache: CachePolicy | None) -> CacheMode:
    count = len(manifest.train) + (0 if manifest.test is None else len(manifest.test))
    return choose_storage(cache, count, image_size)


def start_decoding(
    manifest: Manifest,
    image_size: Sequence[int],
    workers: int = 0,
    cache: CachePolicy | None = None,
) -> Decoding | None:
    """Start decoding the train split in TensorFlow's threads and return at once (memory only).

    `load(..., started=)` takes it from there. A split going to the disk cache is not started: its
    cache entry may exist already, and building one is done under the cache's lock.
    """
    if _storage(manifest, image_size, cache) is not CacheMode.memory:
        return None
    return in_memory(manifest.train, image_size, workers, ahead=True)


def load(
    manifest: Manifest,
    image_size: Sequence[int],
    val_split: float = 0.0,
    seed: int = 0,
    workers: int = 0,
    cache: CachePolicy | None = None,
    started: Decoding | None = None,
) -> Data:
    """Decode every split once; validate on test, or on a seeded stratified hold-out of train.

    Args:
        cache: where decoded images go (dataset.cache); None keeps them in memory.
        started: the train split's decoding, already running (`start_decoding`).
    """
    store = None
    if _storage(manifest, image_size, cache) is CacheMode.disk:
        assert cache is not None
        store = ImageCache(cache.directory, cache.max_disk_bytes)
        log.info("decoded images go to the disk cache in %s", store.dir)
    train, failed, store = _decode_split(
        manifest.train, image_size, workers, store, cache, "decoding train", started
    )
    skipped = list(manifest.skipped) + failed
    test = None
    if manifest.test is not None:
        test, failed, store = _decode_split(
            manifest.test, image_size, workers, store, cache, "decoding test"
        )
        skipped += failed
    storage = CacheMode.disk if isinstance(train.images, DiskImages) else CacheMode.memory
    # Undecodable files may have emptied a split or a class: say so before training starts.
    check_usable(
        manifest.root,
        manifest.class_names,
        train.labels,
        None if test is None else test.labels,
    )
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    log.info(
        "decoded %d train and %d test images of %d classes; %d files skipped",
        len(train),
        0 if test is None else len(test),
        len(manifest.class_names),
        len(skipped),
    )
    train, val = _validation(manifest, train, test, val_split, seed)
    source = str(manifest.source or manifest.root)
    return Data(manifest.class_names, train, val, test, skipped, source, storage)


def _validation(
    manifest: Manifest, train: ImageSplit, test: ImageSplit | None, val_split: float, seed: int
) -> tuple[ImageSplit, ImageSplit]:
    """(train, val): a seeded hold-out of train (stratified by class), else the test split."""
    if val_split > 0:
        if train.labels.ndim == 2:  # multi-hot rows: no one class to stratify by
            keep, held = multilabel.held_out(len(train), val_split, seed)
        else:
            keep, held = stratified_split(train.labels, val_split, seed)
        return train.partition(keep, held)
    if test is not None:
        return train, test
    raise DatasetError(
        f"{str(manifest.root)!r} has no test/ split: set dataset.val_split (e.g. 0.2) to "
        "hold out part of train for validation"
    )


def read_images(images: np.ndarray | DiskImages, index: tf.Tensor) -> tf.Tensor:
    """images[index] as float32, for a batch of indices inside a tf.data map.

    One reader for both kinds of split: NumPy indexing of the in-memory array (no tf.constant copy
    of it) or reads of the disk cache's records, which run in tf.data's parallel calls.
    """
    # By weak reference: TensorFlow keeps a numpy_function's Python function for the process's
    # life (in its global graph), and with it the images, run after run of an in-process sweep.
    held = weakref.ref(images)
    batch = tf.numpy_function(lambda i: _alive(held)[i], [index], tf.as_dtype(images.dtype))
    batch = tf.ensure_shape(batch, (None, *images.shape[1:]))
    return tf.cast(batch, tf.float32)


def make_dataset(split: ImageSplit, batch_size: int) -> tf.data.Dataset:
    """Batches of (float32 images in 0..255, int32 labels), in order: for predicting and validating.

    Training batches, shuffled epoch by epoch, are `insect_exp.fit.train_batches`.
    """
    labels = tf.constant(split.labels)
    ds = tf.data.Dataset.range(len(split)).batch(batch_size)
    ds = ds.map(
        lambda index: (read_images(split.images, index), tf.gather(labels, index)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return without_autotuning(ds.prefetch(tf.data.AUTOTUNE))
