"""Checks made before a run opens: a path that is not there fails without leaving a FAILED run.

Only what is cheap: an estimate of the model's memory from its config, a stat of the dataset's
folder or CSV file, and of a TF Hub handle (a local SavedModel, or one in TF Hub's cache). A handle
to download is probed here too (one HTTP HEAD, only until it is cached), so that offline it fails
before the store holds a run that never started.
"""

from __future__ import annotations

from insect_exp.config import Config, CsvDatasetConfig, DemoDatasetConfig, HubModelConfig


def check(cfg: Config) -> None:
    """Raise a UserError (one line) if the run's data or weights are plainly not there, or its
    model cannot fit the machine's memory."""
    from insect_exp.models.memory import check_memory

    check_memory(cfg.model, cfg.batch_size)  # before a byte is allocated
    _check_dataset(cfg)
    if isinstance(cfg.model, HubModelConfig):
        _check_hub(cfg.model)


def _check_dataset(cfg: Config) -> None:
    """The checks the scan starts with (data/scan.py, data/csv_list.py), made before a run opens."""
    from insect_exp.data.csv_list import existing_csv
    from insect_exp.data.scan import existing_root

    dataset = cfg.dataset
    if isinstance(dataset, DemoDatasetConfig):
        return  # made on first use
    if isinstance(dataset, CsvDatasetConfig):
        existing_csv(dataset.path)
    else:
        existing_root(dataset.root)


def _check_hub(model: HubModelConfig) -> None:
    from insect_exp.models.handles import CLASSIFIER_SETTING, check_reachable

    check_reachable(model.handle, model.load_timeout_s)
    if model.preview.enabled:
        check_reachable(model.preview.handle, model.load_timeout_s, CLASSIFIER_SETTING)
