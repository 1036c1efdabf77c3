"""Tiny sweeps for tests: launched as a user launches them, read back from their MLflow store.

    result = run_sweep(tmp_path, "optimizer=adam,sgd")
    assert result.returncode == 0 and len(result.children) == 2

Each call runs `python -m insect_exp -m TINY... OVERRIDES` in `root` (so Hydra's outputs/ land
there) on a 3-class folder of 6+3 images per class, with a SQLite store at root/mlruns/mlflow.db.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from insect_exp.config import register_configs
from tests.conftest import CONF_DIR, make_image_folder

EXPERIMENT = "insect_exp"
# One epoch on 32x32 images, no model export, one decode thread: seconds per job.
TINY = (
    "dataset=insects",
    "epochs=1",
    "batch_size=4",
    "model.image_size=[32,32]",
    "mlflow.log_model=false",
    "dataset.decode_workers=1",
)


@dataclass
class SweepResult:
    """A finished sweep command and the runs it left in its store."""

    process: subprocess.CompletedProcess
    tracking_uri: str
    folder: Path
    experiment_id: str | None = None
    parent: Run | None = None
    children: list[Run] = field(default_factory=list)
    # Runs of the experiment that are neither the parent nor its children (should be none).
    strays: list[Run] = field(default_factory=list)

    @property
    def returncode(self) -> int:
        return self.process.returncode

    @property
    def output(self) -> str:
        """The command's stdout and stderr tails, for assertion messages."""
        return self.process.stdout[-2000:] + "\n--- stderr ---\n" + self.process.stderr[-6000:]

    def child(self, name: str) -> Run:
        """The child run of that name."""
        (run,) = [c for c in self.children if c.info.run_name == name]
        return run

    def download(self, run_id: str, path: str, dest: Path) -> Path:
        """One artifact of a run, copied under dest."""
        dest.mkdir(parents=True, exist_ok=True)
        local = MlflowClient(self.tracking_uri).download_artifacts(run_id, path, str(dest))
        return Path(local)


def run_sweep(
    root: Path,
    *overrides: str,
    env: Mapping[str, str] | None = None,
    tiny: Sequence[str] = TINY,
    timeout: float = 600,
    flags: Sequence[str] = ("-m",),
) -> SweepResult:
    """Run a tiny multirun in root with the given overrides and read its runs back.

    Args:
        overrides: the sweep itself, e.g. "optimizer=adam,sgd", "hydra/launcher=joblib".
            `{folder}` in an override stands for the tiny image folder (the default root).
        env: extra environment variables (e.g. INSECT_EXP_HUB_HANDLE).
        tiny: the shrinking overrides; drop one that a sweeper must search (a value given on the
            command line is fixed for Optuna).
        flags: Hydra's flags before the overrides; () for a command that is a multirun by its
            config (replicates=N, hparams_search=optuna).
    """
    root.mkdir(parents=True, exist_ok=True)
    folder = root / "insects"
    if not folder.is_dir():
        make_image_folder(folder)
    (root / "mlruns").mkdir(exist_ok=True)
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    full_env = {
        **os.environ,
        "INSECT_EXP_CACHE_DIR": str(root / "data"),  # demo set and feature caches stay in root
        "DO_NOT_TRACK": "true",
        **(env or {}),
    }
    full_env.pop("MLFLOW_TRACKING_URI", None)
    given = [o.replace("{folder}", str(folder)) for o in overrides]
    root_given = any(o.startswith("dataset.root=") for o in given)
    command = [
        *(sys.executable, "-m", "insect_exp", *flags, *tiny),
        *([] if root_given else [f"dataset.root={folder}"]),
        f"mlflow.tracking_uri={uri}",
        *given,
    ]
    process = subprocess.run(
        command, cwd=root, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    result = SweepResult(process, uri, folder)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return result
    result.experiment_id = experiment.experiment_id
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "sweep.dir" in r.data.tags]
    if len(parents) == 1:
        result.parent = parents[0]
        pid = result.parent.info.run_id
        result.children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid]
    known = {r.info.run_id for r in [*parents, *result.children]}
    result.strays = [r for r in runs if r.info.run_id not in known]
    return result


def launcher_target(choice: str) -> str:
    """The class Hydra names for `hydra/launcher=<choice>`, as its compose API builds the config."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={choice}"], return_hydra_config=True)
    return str(cfg.hydra.launcher._target_)
