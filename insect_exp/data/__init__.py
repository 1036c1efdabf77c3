"""Datasets: find files (scan), generate the demo set (demo), decode and batch them (pipeline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from insect_exp.data.scan import DatasetError

if TYPE_CHECKING:
    from insect_exp.config import DatasetConfig
    from insect_exp.data.pipeline import Data

__all__ = ["DatasetError", "load_data"]


def load_data(cfg: DatasetConfig, image_size: Sequence[int], seed: int) -> Data:
    """Decode the dataset's files, into memory or the disk cache as dataset.cache says (the demo
    config generates its folder first if needed)."""
    from insect_exp.data.cache import CachePolicy
    from insect_exp.data.pipeline import load

    manifest = cfg.manifest()
    policy = CachePolicy.from_config(cfg)
    return load(manifest, image_size, cfg.val_split, seed, cfg.decode_workers, policy)
