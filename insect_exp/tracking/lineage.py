"""Dataset lineage: a run's train, val and test splits as MLflow dataset inputs (mlflow.data).

Each input names its source (the folder, or the CSV listing the files), a content digest (the same
for the same files, whatever the folder is called; another one once any file changes) and a
profile with the image and class counts. The MLflow UI shows them in the runs table's Dataset
column, so runs trained on the same data show the same digest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source import DatasetSource
from mlflow.entities import DatasetInput, InputTag

CONTEXT_TAG = "mlflow.data.context"  # the tag MLflow's UI reads a dataset input's role from


class FolderSource(DatasetSource):
    """A local folder or file the images were read from (MLflow's "local" source type)."""

    def __init__(self, uri: str):
        self._uri = uri

    @property
    def uri(self) -> str:
        return self._uri

    @staticmethod
    def _get_source_type() -> str:
        return "local"

    def load(self, dst_path: str | None = None) -> str:
        return self._uri

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False  # built explicitly, never resolved from a string by MLflow

    @classmethod
    def _resolve(cls, raw_source: Any) -> FolderSource:
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self._uri}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> FolderSource:
        return cls(source_dict["uri"])


class ImageDataset(Dataset):
    """An image split as MLflow sees it: source, digest and profile (the pixels stay put)."""

    def __init__(self, source: FolderSource, name: str, digest: str, profile: dict[str, Any]):
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest)

    def _compute_digest(self) -> str:
        return self._digest  # always given: the content digest of the split's files

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    @property
    def schema(self) -> None:
        return None

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


@dataclass(frozen=True)
class SplitRecord:
    """One split to log as an input: its role (train, val, test), where from, digest, counts."""

    context: str
    name: str
    source: str
    digest: str
    profile: dict[str, Any] = field(default_factory=dict)

    def to_input(self) -> DatasetInput:
        dataset = ImageDataset(FolderSource(self.source), self.name, self.digest, self.profile)
        # mlflow.log_input does this conversion for the active run; runs here are written by id
        # through MlflowClient.log_inputs, and MLflow has no public name for the conversion.
        return DatasetInput(dataset._to_mlflow_entity(), [InputTag(CONTEXT_TAG, self.context)])
