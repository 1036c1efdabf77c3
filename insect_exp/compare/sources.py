"""What a comparison's A and B name (runs, sweep groups, models) and their predictions on the
same test images: reused from what the runs logged, or made by running the models."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from insect_exp import UserError
from insect_exp.config import CompareConfig, EvaluateConfig
from insect_exp.predict import ModelRef, find_model

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

GROUP_TAG = "insect_exp.group"  # set on a sweep's children: one value per group of overrides


@dataclass
class Member:
    """One model of a side: a run's logged model, or a model from the registry."""

    name: str
    ref: ModelRef


@dataclass
class Side:
    """A or B: one model, or a sweep group's replicates (their mean probabilities: an ensemble)."""

    spec: str
    members: list[Member]
    # (name, version) when `spec` names a registered model version (models:/<name>/<v>, @alias).
    registered: tuple[str, str] | None = None
    alias: str | None = None

    @property
    def run_ids(self) -> list[str]:
        return [m.ref.run_id for m in self.members if m.ref.run_id]


@dataclass
class Scores:
    """Every member's class probabilities on the same images, in the same order."""

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    probabilities: dict[str, list[np.ndarray]] = field(default_factory=dict)  # by side spec


def resolve(spec: str, client: MlflowClient, tracking_uri: str) -> Side:
    """The side `spec` names.

    Raises:
        UserError: no such run or model; a sweep parent whose children hold several groups and
            no `#<group>` picks one (the groups named); an unknown group.
    """
    if spec.startswith("models:/"):
        ref = find_model(spec, tracking_uri)
        return Side(spec, [Member(spec, ref)], *_registered(spec, ref, client))
    run_id, _, group = spec.removeprefix("runs:/").partition("#")
    run_id, _, path = run_id.partition("/")
    if path:
        return Side(spec, [Member(spec, find_model(f"runs:/{run_id}/{path}", tracking_uri))])
    try:
        run = client.get_run(run_id)
    except Exception as err:  # noqa: BLE001  (MLflow's not-found, or a malformed id)
        raise UserError(f"{spec!r}: no such run in the MLflow store {tracking_uri}") from err
    children = _children(client, run.info.experiment_id, run_id)
    if not children:
        uri = f"runs:/{run_id}/model"
        return Side(spec, [Member(run.info.run_name or run_id, find_model(uri, tracking_uri))])
    picked = _group(spec, children, group)
    members = [
        Member(child.info.run_name or child.info.run_id,
               find_model(f"runs:/{child.info.run_id}/model", tracking_uri))
        for child in picked
    ]  # fmt: skip
    return Side(spec, members)


def _children(client: MlflowClient, experiment_id: str, parent_id: str) -> list:
    query = f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'"
    return list(client.search_runs([experiment_id], query, max_results=1000))


def _group(spec: str, children: Sequence, group: str) -> list:
    """The children of the group `group` names ('' : the only one)."""
    groups: dict[str, list] = {}
    for child in children:
        groups.setdefault(child.data.tags.get(GROUP_TAG, ""), []).append(child)
    if group:
        if group not in groups:
            raise UserError(f"{spec!r}: no group {group!r}; the sweep has {_names(groups)}")
        return groups[group]
    if len(groups) > 1:
        raise UserError(
            f"{spec!r}: the sweep has several groups; pick one as runs:/<id>#<group>: "
            f"{_names(groups)}"
        )
    return next(iter(groups.values()))


def _names(groups: dict[str, list]) -> str:
    return ", ".join(repr(name) for name in sorted(groups))


def _registered(
    spec: str, ref: ModelRef, client: MlflowClient
) -> tuple[tuple[str, str] | None, str | None]:
    """(registered name, version) and the alias of a models:/<name>/<version> or @alias URI."""
    name, _, rest = spec.removeprefix("models:/").partition("/")
    name, _, alias = name.partition("@")
    try:
        if alias:
            return (name, client.get_model_version_by_alias(name, alias).version), alias
        if rest.isdigit():
            return (name, rest), None
    except Exception:  # noqa: BLE001  (a models:/<model id>: not a registered version)
        return None, None
    return None, None


# -- predictions -----------------------------------------------------------------------------


def score(cfg: CompareConfig, sides: Sequence[Side], client: MlflowClient) -> Scores:
    """Both sides' probabilities on the same images: the dataset given, else the runs' test split.

    Raises:
        UserError: the models' classes differ; no dataset given and the runs were tested on
            different images, or did not log their test predictions.
    """
    names = sides[0].members[0].ref.class_names
    for side in sides:
        for member in side.members:
            if member.ref.class_names != names:
                raise UserError(
                    f"{side.spec!r} has the classes {', '.join(member.ref.class_names)}, not "
                    f"{', '.join(names)}: a comparison needs the same classes"
                )
    if cfg.dataset.root is None:
        return _logged(cfg, sides, client, names)
    return _evaluated(cfg, sides, names)


def _logged(
    cfg: CompareConfig, sides: Sequence[Side], client: MlflowClient, names: list[str]
) -> Scores:
    """The runs' logged test predictions, which all of them must have logged on one test split."""
    from insect_exp.report import PROBABILITIES_TSV

    tests: dict[str, tuple[str, str] | None] = {}
    for side in sides:
        for member in side.members:
            if member.ref.run_id is None:
                raise UserError(f"{side.spec!r} has no run to take a test split from: {_GIVE}")
            tests[member.ref.run_id] = _test_input(client, member.ref.run_id)
    logged = {found[0]: found[1] for found in tests.values() if found is not None}  # by digest
    if None in tests.values() or len(logged) > 1:
        listed = ", ".join(f"{r}: {found and found[0]}" for r, found in tests.items())
        raise UserError(f"the runs were not tested on the same images ({listed}): {_GIVE}")
    tables = {run_id: _read_probabilities(client, run_id, PROBABILITIES_TSV, names)
              for run_id in tests}  # fmt: skip
    if None in tables.values():
        # Not the folder the runs logged as their source: it may hold other files by now (the
        # demo set is redrawn in place for other counts), and the report would name the wrong
        # images. The user names the images; the report says which.
        missing = ", ".join(r for r, table in tables.items() if table is None)
        raise UserError(f"the runs {missing} logged no test predictions: {_GIVE}")
    first = next(iter(tables.values()))
    assert first is not None
    scores = Scores(list(first), np.array([first[p][0] for p in first]), names)
    for side in sides:
        scores.probabilities[side.spec] = [
            np.stack([tables[m.ref.run_id][p][1] for p in scores.paths])  # type: ignore[index]
            for m in side.members
            if m.ref.run_id
        ]
    return scores


_GIVE = "give the images to compare on as dataset.root=..."


def _test_input(client: MlflowClient, run_id: str) -> tuple[str, str] | None:
    """The digest and the source folder of the test split the run logged as a dataset input."""
    from insect_exp.tracking.lineage import CONTEXT_TAG

    inputs = client.get_run(run_id).inputs
    for item in inputs.dataset_inputs if inputs else []:
        if any(t.key == CONTEXT_TAG and t.value == "test" for t in item.tags):
            source = json.loads(item.dataset.source or "{}").get("uri", "")
            return item.dataset.digest, source
    return None


def _read_probabilities(
    client: MlflowClient, run_id: str, artifact: str, names: list[str]
) -> dict[str, tuple[int, np.ndarray]] | None:
    """path -> (label, probabilities) from a training run's logged test predictions (None: the
    run logged none, as runs from before the file was logged)."""
    if not any(
        a.path == artifact for a in client.list_artifacts(run_id, Path(artifact).parent.name)
    ):
        return None
    with tempfile.TemporaryDirectory(prefix="insect_exp-compare-") as tmp:
        text = Path(client.download_artifacts(run_id, artifact, tmp)).read_text()
    rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
    index = {name: i for i, name in enumerate(names)}
    return {
        row[0]: (index[row[1]], np.array([float(x) for x in row[2:]])) for row in rows[1:] if row
    }


def _evaluated(cfg: CompareConfig, sides: Sequence[Side], names: list[str]) -> Scores:
    from insect_exp.data import resolve_root
    from insect_exp.evaluate import evaluate_files, labelled_files

    root = Path(resolve_root(cfg.dataset)).expanduser().resolve()
    _, files, skipped = labelled_files(root, cfg.split, names, cfg.dataset.max_per_class)
    scores: Scores | None = None
    for side in sides:
        found = []
        for member in side.members:
            settings = EvaluateConfig(
                model_uri=member.ref.uri, dataset=cfg.dataset, batch_size=cfg.batch_size
            )
            evaluation = evaluate_files(settings, member.ref, files, list(skipped))
            if scores is None:
                scores = Scores(list(evaluation.split.paths), evaluation.split.labels, names)
            elif list(evaluation.split.paths) != scores.paths:
                raise UserError(f"{member.ref.uri!r} could not decode the images the others did")
            assert evaluation.probabilities is not None
            found.append(evaluation.probabilities)
        assert scores is not None
        scores.probabilities[side.spec] = found
    assert scores is not None
    return scores
