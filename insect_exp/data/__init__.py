"""Datasets: find files (scan), generate the demo set (demo), decode and batch them (pipeline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from insect_exp.data.scan import DatasetError

if TYPE_CHECKING:
    from insect_exp.config import DatasetConfig
    from insect_exp.data.pipeline import Data

__all__ = ["DatasetError", "Loading", "load_data"]


def load_data(cfg: DatasetConfig, image_size: Sequence[int], seed: int) -> Data:
    """Decode the dataset's files, into memory or the disk cache as dataset.cache says (the demo
    config generates its folder first if needed)."""
    return Loading(cfg, image_size, seed).result()


class Loading:
    """`load_data` in two steps: started here, the train split decodes in TensorFlow's threads
    while the caller does other work; `result()` finishes it.

    The files are found (and the demo folder generated) at once; an error doing so is raised by
    `result()`, where load_data would have raised it.
    """

    def __init__(self, cfg: DatasetConfig, image_size: Sequence[int], seed: int):
        from insect_exp.data.cache import CachePolicy
        from insect_exp.data.pipeline import start_decoding

        self.cfg, self.image_size, self.seed = cfg, image_size, seed
        self._error: Exception | None = None
        self._started = None
        try:
            self._manifest = cfg.manifest()
            self._policy = CachePolicy.from_config(cfg)
            self._started = start_decoding(
                self._manifest, image_size, cfg.decode_workers, self._policy
            )
        except Exception as err:  # raised by result(), inside the caller's run
            self._error = err

    def result(self) -> Data:
        from insect_exp.data.pipeline import load

        if self._error is not None:
            error, self._error = self._error, None
            raise error
        started, self._started = self._started, None
        return load(
            self._manifest,
            self.image_size,
            self.cfg.val_split,
            self.seed,
            self.cfg.decode_workers,
            self._policy,
            started,
        )
