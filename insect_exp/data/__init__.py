"""Datasets: find files (scan), generate the demo set (demo), decode and batch them (pipeline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from insect_exp.data.scan import DatasetError, scan

if TYPE_CHECKING:
    from insect_exp.config import DatasetConfig
    from insect_exp.data.pipeline import Data

__all__ = ["DatasetError", "load_data"]


def load_data(cfg: DatasetConfig, image_size: Sequence[int], seed: int) -> Data:
    """Decode the dataset's folder (the demo config generates its folder first if needed)."""
    from insect_exp.data.pipeline import load

    manifest = scan(cfg.resolve_root(), cfg.max_per_class)
    return load(manifest, image_size, cfg.val_split, seed, cfg.decode_workers)
