"""Datasets: find files (scan), generate the demo set (demo), decode and batch them (pipeline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from insect_exp.config import CsvDatasetConfig, DatasetConfig, DemoDatasetConfig
from insect_exp.data.csv_list import scan_csv
from insect_exp.data.demo import ensure_demo_dataset
from insect_exp.data.scan import DatasetError, Manifest, scan

if TYPE_CHECKING:
    from insect_exp.data.pipeline import Data

__all__ = ["DatasetError", "Loading", "load_data", "manifest", "resolve_root"]


def resolve_root(cfg: DatasetConfig) -> str:
    """The dataset's folder; the demo set is generated there first, unless it was before."""
    if isinstance(cfg, DemoDatasetConfig):
        root = ensure_demo_dataset(
            cfg.root,
            train_per_class=cfg.train_per_class,
            test_per_class=cfg.test_per_class,
            seed=cfg.generator_seed,
        )
        return str(root)
    return str(cfg.root)


def manifest(cfg: DatasetConfig, multilabel: bool = False) -> Manifest:
    """The dataset's files, classes and skipped files (data/scan.py, data/csv_list.py; with
    `multilabel`, a CSV's label sets: data/multilabel.py), to be decoded with the audit's inputs
    only if dataset.audit or dataset.dedupe is on."""
    if isinstance(cfg, CsvDatasetConfig) and multilabel:
        from insect_exp.data.multilabel import scan_csv as scan_label_sets

        found = scan_label_sets(cfg.path, cfg.max_per_class, cfg.max_image_pixels)
    elif isinstance(cfg, CsvDatasetConfig):
        found = scan_csv(cfg.path, cfg.max_per_class, cfg.max_image_pixels)
    else:
        found = scan(resolve_root(cfg), cfg.max_per_class, cfg.max_image_pixels)
    for files in (found.train, found.test):
        if files is not None:
            files.audit = cfg.audit or cfg.dedupe
    return found


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

    def __init__(
        self, cfg: DatasetConfig, image_size: Sequence[int], seed: int, multilabel: bool = False
    ):
        from insect_exp.data.cache import CachePolicy
        from insect_exp.data.pipeline import start_decoding

        self.cfg, self.image_size, self.seed = cfg, image_size, seed
        self._error: Exception | None = None
        self._started = None
        try:
            self._manifest = manifest(cfg, multilabel)
            self._policy = CachePolicy.from_config(cfg)
            self._started = start_decoding(
                self._manifest, image_size, cfg.decode_workers, self._policy
            )
        except Exception as err:  # raised by result(), inside the caller's run
            self._error = err

    def result(self) -> Data:
        from insect_exp.data.audit import audit_data
        from insect_exp.data.pipeline import load

        if self._error is not None:
            error, self._error = self._error, None
            raise error
        started, self._started = self._started, None
        data = load(
            self._manifest,
            self.image_size,
            self.cfg.val_split,
            self.seed,
            self.cfg.decode_workers,
            self._policy,
            started,
        )
        return audit_data(data, self.cfg, self._policy)
