"""What the data audit needs of each image, taken as the image is decoded (data/pipeline.py),
while its pixels are at hand: its perceptual hash and the 16x16 gray thumbnail that confirms a
pair (data/duplicates.py), and its file's original size, which the decoding reads from the header
anyway. The audit then reads no file and no decoded image again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from insect_exp.data import duplicates


@dataclass
class AuditInputs:
    """Per image of a split: perceptual hash, confirming thumbnail and original size."""

    hashes: np.ndarray  # N, uint64
    thumbs: np.ndarray  # N x 16 x 16, uint8
    sizes: np.ndarray  # N x (width, height), int32; 0, 0 where unknown

    @classmethod
    def empty(cls, count: int) -> AuditInputs:
        """Room for COUNT images, filled by `put` as their batches are decoded."""
        return cls(
            np.zeros(count, np.uint64),
            np.zeros((count, *duplicates.THUMB_SHAPE), np.uint8),
            np.zeros((count, 2), np.int32),
        )

    @classmethod
    def of_images(cls, images: Any, paths: Sequence[str]) -> AuditInputs:
        """Computed afterwards, from decoded IMAGES (an array, or the disk cache's records) and
        the headers of the files at PATHS: for a split whose decoding did not take them (a disk
        cache entry written before)."""
        hashes, thumbs = duplicates.perceptual_hashes(images)
        return cls(hashes, thumbs, duplicates.original_sizes(paths))

    def put(self, index: np.ndarray, images: np.ndarray, sizes: np.ndarray) -> None:
        """Take the inputs of the decoded IMAGES of rows INDEX, and their files' SIZES."""
        self.hashes[index], self.thumbs[index] = duplicates.hash_batch(images)
        self.sizes[index] = sizes

    def subset(self, index: np.ndarray) -> AuditInputs:
        return AuditInputs(self.hashes[index], self.thumbs[index], self.sizes[index])
