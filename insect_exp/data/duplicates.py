"""The data audit: exact and near-duplicate images within and across splits, and original sizes.

Exact duplicates are files with the same bytes: the content fingerprints taken while decoding
(pipeline.ImageSplit.fingerprints, no extra read) find the candidates, and a SHA-256 of each
candidate's bytes (hashlib) confirms them. Near duplicates are images whose perceptual hashes
differ in at most `dataset.duplicate_distance` of their 64 bits: a resized, recompressed or
slightly shifted copy. The hash is imagehash's `phash` (a 32x32 gray image, the 8x8 lowest
frequencies of its DCT against their median) of the decoded arrays, with an area average for
its resize to 32x32 (`gray_thumbnails`) where imagehash uses PIL's Lanczos filter: a few times
cheaper, and the hashes differ in a few of their 64 bits at most (tests/data/test_duplicates.py
compares them). Decoding hashes each batch as it is decoded (data/audit_inputs.py), while its
pixels are at hand; benchmarks/ingest.py --audit-only measures what the audit costs against
decoding. Pairs are found by comparing the packed hashes in blocks (XOR
and popcount), never one pair at a time in Python. A pair the hashes find is kept only if the
images' 16x16 gray thumbnails are alike too (`alike`): phash alone pairs distinct images whose
plain backgrounds leave their low frequencies alike.

With a disk cache the hashes, thumbnails and sizes are kept beside its entries (data/audit.py),
so a run that reuses its decoded images reuses its audit too.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft
from PIL import Image

from insect_exp import hardware

HASH_SIZE = 8  # imagehash's phash default: 8x8 = 64 bits
_SMALL = HASH_SIZE * 4  # the side it resizes to before the DCT (highfreq_factor 4)
# PIL's luma (convert("L"), ITU-R 601-2), the gray image imagehash hashes.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_BATCH = 64  # images hashed at a time
# The 8 lowest rows of the DCT-II matrix (SciPy's, unnormalised, as imagehash uses it): phash
# keeps only those frequencies, and two products with it compute them alone.
_LOW_DCT = scipy.fft.dct(np.eye(_SMALL), axis=0)[:HASH_SIZE]
_THUMB = _SMALL // 2  # the side of the thumbnails compared to confirm a near pair
THUMB_SHAPE = (_THUMB, _THUMB)
THUMB_BYTES = _THUMB * _THUMB
# The mean absolute difference (gray levels, 0-255) of two thumbnails of a near pair.
MAX_DIFFERENCE = 8.0
_BLOCK_CELLS = 2**22  # hash comparisons held at a time while searching for pairs
TSV_NAME = "dataset/duplicates.tsv"


def gray_thumbnails(images: np.ndarray) -> np.ndarray:
    """The 32x32 gray images (N x 32 x 32 uint8) phash takes the DCT of, of uint8 RGB IMAGES
    (N x H x W x 3): each image's luma (PIL's `convert("L")` weights), area-averaged to 32x32.

    Averaged in two steps, both exact area averages: boxes of the largest whole size that leaves
    at least 32 of them on each side (a sum of rows, then of columns with the luma weights: the
    only pass over every pixel, in NumPy's vectorised loops), then an area resize of those few
    boxes to 32x32 by two small matrix products. A side that is not a whole number of boxes
    leaves out its few edge pixels that do not fill one (centred). imagehash instead resizes
    the gray image with a Lanczos filter; the hashes differ in a few of their 64 bits at most.
    """
    count, height, width = (int(v) for v in images.shape[:3])
    k_h, k_w = max(1, height // _SMALL), max(1, width // _SMALL)
    rows, cols = height // k_h, width // k_w
    top, left = (height - rows * k_h) // 2, (width - cols * k_w) // 2
    pixels = np.asarray(images)[:, top : top + rows * k_h, left : left + cols * k_w]
    # Row sums first: the reduced axis lies outside the contiguous one, so NumPy adds whole rows.
    wide = np.uint16 if k_h * 255 < 2**16 else np.uint32
    summed = pixels.reshape(count, rows, k_h, cols * k_w * 3).sum(axis=2, dtype=wide)
    weights = np.tile(_LUMA, k_w) / np.float32(k_h * k_w)
    boxes = summed.reshape(count, rows, cols, k_w * 3).astype(np.float32) @ weights
    small = _area(rows) @ boxes @ _area(cols).T
    return np.round(np.clip(small, 0, 255)).astype(np.uint8)


@functools.cache
def _area(size: int) -> np.ndarray:
    """The (32 x SIZE) matrix of an area resize of SIZE pixels to 32: each output pixel the
    mean of the input span it covers, pixels cut by its ends counted by the part inside."""
    edges = np.arange(_SMALL + 1) * (size / _SMALL)
    starts, ends = edges[:-1, None], edges[1:, None]
    pixel = np.arange(size)[None, :]
    overlap = np.clip(np.minimum(ends, pixel + 1) - np.maximum(starts, pixel), 0, None)
    return (overlap / (size / _SMALL)).astype(np.float32)


def hash_thumbnails(small: np.ndarray) -> np.ndarray:
    """imagehash.phash of each 32x32 gray image (N x 32 x 32), packed as uint64 (first bit high):
    the 8x8 lowest frequencies of its DCT, each above their median or not."""
    low = (_LOW_DCT @ small.astype(np.float64) @ _LOW_DCT.T).reshape(len(small), -1)
    bits = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8")[:, 0].astype(np.uint64)


def hash_batch(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The perceptual hash of each uint8 RGB image (N x H x W x 3), packed as uint64, and its
    16x16 gray thumbnail (N x 16 x 16 uint8), which confirms a pair the hashes find."""
    small = gray_thumbnails(images)
    # The mean of each 2x2 block, rounded: integer sums of row pairs, then of column pairs.
    rows = small.reshape(len(small), _THUMB, 2, _SMALL).sum(axis=2, dtype=np.uint16)
    halved = (rows[..., 0::2] + rows[..., 1::2] + 2) >> 2
    return hash_thumbnails(small), halved.astype(np.uint8)


def perceptual_hashes(images: Any) -> tuple[np.ndarray, np.ndarray]:
    """`hash_batch` of all IMAGES, any object indexed by slices the way a NumPy array is (the
    disk cache's records), a batch at a time, one thread per core (NumPy's loops release the
    GIL)."""
    count = len(images)
    hashes = np.zeros(count, dtype=np.uint64)
    thumbs = np.zeros((count, *THUMB_SHAPE), dtype=np.uint8)

    def hash_one_batch(start: int) -> None:
        end = min(start + _BATCH, count)
        hashes[start:end], thumbs[start:end] = hash_batch(np.asarray(images[start:end]))

    with ThreadPoolExecutor(hardware.cpus(), "insect_exp-audit") as pool:
        list(pool.map(hash_one_batch, range(0, count, _BATCH)))
    return hashes, thumbs


def alike(thumbs: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Whether the thumbnails of each pair (i, j) differ by at most MAX_DIFFERENCE on average.

    A copy, resized, recompressed or shifted by a pixel or two, stays within a few gray levels;
    distinct images whose hashes happen to be close (plain backgrounds make phash's low
    frequencies alike) differ by tens.
    """
    difference = np.abs(thumbs[i].astype(np.int16) - thumbs[j].astype(np.int16))
    return difference.mean(axis=(1, 2)) <= MAX_DIFFERENCE


def close_pairs(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair i < j of HASHES (uint64) at most THRESHOLD bits apart: (i, j, distance).

    Compared a block of rows against all later hashes at a time, XOR and popcount in NumPy.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    count = len(hashes)
    block = max(1, _BLOCK_CELLS // max(count, 1))
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start in range(0, count, block):
        rows = hashes[start : start + block]
        distance = np.bitwise_count(rows[:, None] ^ hashes[None, start:])
        i, j = np.nonzero(distance <= threshold)
        later = j > i  # the upper triangle: each pair once, no image with itself
        i, j = i[later], j[later]
        found.append((i + start, j + start, distance[i, j]))
    if not found:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    first, second, distances = (
        np.concatenate([part[k] for part in found]).astype(np.int64) for k in range(3)
    )
    return first, second, distances


def same_bytes(paths: Sequence[str]) -> list[str]:
    """A SHA-256 of each file's bytes ('' where it cannot be read)."""
    digests = []
    for path in paths:
        try:
            digests.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
        except OSError:
            digests.append("")
    return digests


def original_sizes(paths: Sequence[str]) -> np.ndarray:
    """(width, height) of each file, from its header alone (PIL reads no pixels); 0, 0 where
    it cannot be read."""
    sizes = np.zeros((len(paths), 2), dtype=np.int32)
    for k, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                sizes[k] = image.size
        except (OSError, ValueError, Image.DecompressionBombError):
            pass
    return sizes


@dataclass(frozen=True)
class SplitHashes:
    """What the audit needs of one split: its files, their fingerprints and perceptual hashes."""

    paths: list[str]
    fingerprints: np.ndarray | None
    hashes: np.ndarray
    sizes: np.ndarray  # N x (width, height) of the original files
    thumbs: np.ndarray  # N x 16 x 16 gray thumbnails (perceptual_hashes)


@dataclass(frozen=True)
class Audit:
    """The duplicate pairs found, and the counts logged as metrics.

    rows: (file a, split a, file b, split b, kind, distance), kind `exact` or `near`.
    counts: duplicates_within_<split> (images of the split with a twin in it) and
        duplicates_<a>_<b> (images of b with a twin in a), for the splits audited.
    test_twins: the rows of the test split that have a twin in train.
    sizes: by split, the (width, height) of its original files, in the split's order.
    """

    rows: list[tuple[str, str, str, str, str, int]]
    counts: dict[str, int]
    test_twins: np.ndarray
    sizes: dict[str, np.ndarray]
    dropped: int = 0

    def stats(self) -> dict[str, Any]:
        """The audit's part of dataset/stats.json: duplicate counts and original sizes."""
        return {
            "duplicates": dict(self.counts),
            "dedupe_dropped_test": self.dropped,
            "original_sizes": self.size_summary(),
        }

    def size_summary(self) -> dict[str, dict[str, float]]:
        """Per split, the number of images and the min, median and max original width and height."""
        summary = {}
        for name, sizes in self.sizes.items():
            known = sizes[(sizes > 0).all(axis=1)]
            entry: dict[str, float] = {"images": len(sizes), "unreadable": len(sizes) - len(known)}
            for axis, side in enumerate(("width", "height")):
                if len(known):
                    values = known[:, axis]
                    entry[f"{side}_min"] = int(values.min())
                    entry[f"{side}_median"] = float(np.median(values))
                    entry[f"{side}_max"] = int(values.max())
            summary[name] = entry
        return summary


def find_duplicates(splits: dict[str, SplitHashes], threshold: int) -> Audit:
    """Exact and near-duplicate pairs within and across SPLITS (named train, val, test)."""
    names = list(splits)
    owner = np.concatenate([np.full(len(s.paths), k) for k, s in enumerate(splits.values())])
    row = np.concatenate([np.arange(len(s.paths)) for s in splits.values()])
    paths = [p for s in splits.values() for p in s.paths]
    i, j, distance = close_pairs(np.concatenate([s.hashes for s in splits.values()]), threshold)
    confirmed = alike(np.concatenate([s.thumbs for s in splits.values()]), i, j)
    i, j, distance = i[confirmed], j[confirmed], distance[confirmed]
    kinds = _kinds(splits, paths, i, j)
    rows = [
        (paths[a], names[owner[a]], paths[b], names[owner[b]], kind, int(d))
        for a, b, d, kind in zip(i.tolist(), j.tolist(), distance.tolist(), kinds, strict=True)
    ]
    counts: dict[str, int] = {}
    for x, first in enumerate(names):
        for second in names[x:]:
            pair = _between(owner, i, j, names.index(first), names.index(second))
            key = (
                f"duplicates_within_{first}" if first == second else f"duplicates_{first}_{second}"
            )
            if first == second:
                counts[key] = len(np.unique(np.concatenate([i[pair], j[pair]])))
            else:
                _, b = _oriented(owner, i[pair], j[pair], names.index(second))
                counts[key] = len(np.unique(b))
    twins = np.zeros(0, dtype=np.int64)
    if "train" in names and "test" in names:
        pair = _between(owner, i, j, names.index("train"), names.index("test"))
        _, test_side = _oriented(owner, i[pair], j[pair], names.index("test"))
        twins = np.unique(row[test_side])
    return Audit(rows, counts, twins, {n: s.sizes for n, s in splits.items()})


def _between(owner: np.ndarray, i: np.ndarray, j: np.ndarray, s: int, t: int) -> np.ndarray:
    """Which pairs join split s and split t (either way round)."""
    return ((owner[i] == s) & (owner[j] == t)) | ((owner[i] == t) & (owner[j] == s))


def _oriented(
    owner: np.ndarray, i: np.ndarray, j: np.ndarray, second: int
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs' members (first split's, second split's)."""
    swap = owner[i] == second
    return np.where(swap, j, i), np.where(swap, i, j)


def _kinds(
    splits: dict[str, SplitHashes], paths: list[str], i: np.ndarray, j: np.ndarray
) -> list[str]:
    """`exact` for pairs of files with the same bytes, else `near`."""
    prints = [s.fingerprints for s in splits.values() if s.fingerprints is not None]
    if len(prints) < len(splits) or not len(i):
        return ["near"] * len(i)
    fingerprints: np.ndarray = np.concatenate(prints)
    candidates = fingerprints[i] == fingerprints[j]
    members = np.unique(np.concatenate([i[candidates], j[candidates]]))
    digest = dict(zip(members.tolist(), same_bytes([paths[k] for k in members]), strict=True))
    return [
        "exact" if same and digest[a] and digest[a] == digest[b] else "near"
        for a, b, same in zip(i.tolist(), j.tolist(), candidates.tolist(), strict=True)
    ]


def without_test_twins(audit: Audit, test_count: int) -> tuple[np.ndarray, Audit]:
    """The test rows to keep (those without a twin in train), and the audit saying what went."""
    keep = np.setdiff1d(np.arange(test_count), audit.test_twins)
    sizes = dict(audit.sizes)
    if "test" in sizes:
        sizes["test"] = sizes["test"][keep]
    return keep, dataclasses.replace(audit, sizes=sizes, dropped=len(audit.test_twins))
