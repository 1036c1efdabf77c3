"""The offline spool: a run saved on local disk while its MLflow store is gone.

When the store stops answering in the middle of a run, training goes on and everything the run
still logs (metrics, params, tags, artifacts, the model, its final status) lands in a spool
directory under the run's output dir instead (tracking/run.py); `python -m insect_exp.upload`
replays it into the same run later.

Layout: run.json (ids, URI, the registered model name and the model's epoch if any),
metrics.jsonl, params.json, tags.json, artifacts/, model/ (an MLflow model directory), status
(written last).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SPOOL_DIR = "mlflow-spool"  # in a run's output dir
INPUTS_FILE = "dataset/inputs.json"  # a spooled run's dataset inputs, replayed as MLflow inputs


class Spool:
    """The local copy of what a run could not send to its store."""

    def __init__(self, directory: str | Path, run_id: str, tracking_uri: str, experiment_id: str):
        self.dir = Path(directory)
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id

    def open(self) -> None:
        (self.dir / "artifacts").mkdir(parents=True, exist_ok=True)
        info = {"run_id": self.run_id, "tracking_uri": self.tracking_uri}
        info["experiment_id"] = self.experiment_id
        (self.dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")

    def metrics(self, metrics: Iterable[Any]) -> None:
        """Append mlflow.entities.Metric values."""
        with (self.dir / "metrics.jsonl").open("a") as out:
            for m in metrics:
                record = {"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                out.write(json.dumps(record) + "\n")

    def _merge(self, name: str, values: Mapping[str, str]) -> None:
        path = self.dir / name
        merged = json.loads(path.read_text()) if path.is_file() else {}
        merged.update({k: str(v) for k, v in values.items()})
        path.write_text(json.dumps(merged, indent=2) + "\n")

    def params(self, params: Mapping[str, str]) -> None:
        self._merge("params.json", params)

    def tags(self, tags: Mapping[str, str]) -> None:
        self._merge("tags.json", tags)

    def artifact(self, artifact_file: str) -> Path:
        """Where an artifact file goes (its folders made)."""
        path = self.dir / "artifacts" / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def artifacts(self, local_dir: str | Path, artifact_path: str | None) -> None:
        target = self.dir / "artifacts" / (artifact_path or "")
        shutil.copytree(local_dir, target, dirs_exist_ok=True)

    def register_as(self, name: str) -> None:
        """Register the spooled model under `name` when it is uploaded."""
        self._note({"registered_model_name": name})

    def model_step(self, step: int | None) -> None:
        """The epoch whose weights the spooled model holds (None: the last)."""
        self._note({"model_step": step})

    def _note(self, values: Mapping[str, Any]) -> None:
        path = self.dir / "run.json"
        info = json.loads(path.read_text())
        path.write_text(json.dumps({**info, **values}, indent=2) + "\n")

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    def finish(self, status: str) -> None:
        (self.dir / "status").write_text(status + "\n")


# The start of the error a sweep gives a child whose record is in a spool.
OFFLINE_NOTE = "the store failed this run mid-way; the rest of its record is in "


def offline_note(spool: Path) -> str:
    """The error a sweep gives a child whose record is in a spool (upload clears it)."""
    return f"{OFFLINE_NOTE}{spool}: upload it with python -m insect_exp.upload {spool}"


def spools_under(directory: str | Path) -> dict[str, Path]:
    """The spools below a directory (a sweep's jobs), by run id."""
    found = {}
    for info in Path(directory).glob(f"**/{SPOOL_DIR}/run.json"):
        try:
            found[json.loads(info.read_text())["run_id"]] = info.parent
        except (OSError, ValueError, KeyError):
            continue  # not a spool
    return found
