"""Datasets: find files (scan), generate the demo set (demo), decode and batch them (pipeline)."""

from collections.abc import Sequence

from omegaconf import DictConfig

from insect_exp.data.scan import DatasetError, scan

__all__ = ["DatasetError", "load_data"]


def load_data(cfg: DictConfig, image_size: Sequence[int], seed: int):
    """Decode the `dataset` config's folder (generating the demo set first if needed).

    Returns:
        insect_exp.data.pipeline.Data with train, validation and test splits.
    """
    from insect_exp.data.pipeline import load

    root = cfg.root
    if cfg.name == "demo":
        from insect_exp.data.demo import ensure_demo_dataset

        root = ensure_demo_dataset(
            cfg.root,
            train_per_class=cfg.train_per_class,
            test_per_class=cfg.test_per_class,
            seed=cfg.generator_seed,
        )
    manifest = scan(root, cfg.max_per_class)
    return load(manifest, image_size, cfg.val_split, seed, cfg.decode_workers)
