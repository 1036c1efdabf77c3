"""`python -m insect_exp.compare`: two tiny configurations, one clearly better, compared through
the command line; the report run, the verdict, the gate's exit codes, promotion by alias."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import make_image_folder
from tests.lifecycle import cli

TRAIN = ("dataset=insects", "model.image_size=[16,16]", "batch_size=8")


@dataclass
class Store:
    root: Path
    folder: Path
    uri: str
    good_sweep: str  # a sweep parent: three replicates of a model that learns the colours
    bad_run: str  # a model trained at a learning rate of 1e-9: its initial weights

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    def compare(self, *args: str):
        return cli("insect_exp.compare", *args, f"mlflow.tracking_uri={self.uri}", cwd=self.root)

    def children(self) -> list[str]:
        parent = self.client.get_run(self.good_sweep)
        query = f"tags.mlflow.parentRunId = '{self.good_sweep}'"
        return [r.info.run_id for r in self.client.search_runs([parent.info.experiment_id], query)]


def _run_id(stdout: str, what: str = "MLflow run id") -> str:
    return re.findall(rf"{what}: (\w+)", stdout)[-1]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Given: one folder, 3 replicates of a model that learns it (a sweep over seeds), and a run
    that learned nothing (registered as `insects`); both logged their test predictions on the
    same split."""
    root = tmp_path_factory.mktemp("compare")
    folder = make_image_folder(
        root / "insects", train_per_class=20, test_per_class=10, size=(16, 16)
    )
    (root / "mlruns").mkdir()
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    common = (*TRAIN, f"dataset.root={folder}", f"mlflow.tracking_uri={uri}")
    good = cli("insect_exp", "replicates=3", "epochs=3", *common, cwd=root, timeout=900)
    assert good.returncode == 0, good.stderr[-3000:]
    bad = cli(
        "insect_exp", "epochs=1", "optimizer.learning_rate=1e-9",
        "mlflow.registered_model_name=insects", *common, cwd=root,
    )  # fmt: skip
    assert bad.returncode == 0, bad.stderr[-3000:]
    return Store(
        root, folder, uri, _run_id(good.stdout, "MLflow sweep run id"), _run_id(bad.stdout)
    )


def test_a_better_candidate_passes_the_gate_and_the_comparison_is_logged(store: Store):
    # When: the sweep group (B) is compared with the untrained run (A) on their logged predictions.
    out = store.compare(store.bad_run, f"runs:/{store.good_sweep}", "max_drop=0.01")

    # Then: a significant win on the 30 test images, the gate passes, and a run holds the report.
    assert out.returncode == 0, out.stderr[-3000:]
    verdict = next(line for line in out.stdout.splitlines() if line.startswith("B better"))
    assert re.fullmatch(
        r"B better than A: \+\d+\.\d points \[\+.*\], McNemar p=.*, 30 images", verdict
    )
    assert "(n=3)" in out.stdout  # B's accuracy over its three replicates, with an interval
    client, run_id = store.client, _run_id(out.stdout)
    run = client.get_run(run_id)
    assert run.data.tags["insect_exp.compare.baseline"] == store.bad_run
    assert run.data.tags["insect_exp.compare.candidate"] == f"runs:/{store.good_sweep}"
    assert run.data.metrics["mcnemar_p"] < 0.05
    assert run.data.metrics["accuracy_difference_low"] > 0
    files = {a.path for a in client.list_artifacts(run_id)}
    assert {"comparison.md", "comparison.html"} <= files
    page = Path(client.download_artifacts(run_id, "comparison.html", str(store.root))).read_text()
    assert "data:image/png;base64," in page and verdict in page
    for source in [store.bad_run, *store.children()]:
        assert client.get_run(source).data.tags[f"comparison.{run_id}"] == verdict


def test_a_worse_candidate_fails_the_gate_on_a_given_folder(store: Store):
    # When: the untrained model is the candidate, both scored on the folder given.
    out = store.compare(
        f"baseline=runs:/{store.good_sweep}", f"candidate=runs:/{store.bad_run}/model",
        f"dataset.root={store.folder}", "max_drop=0.01", "max_class_drop=0.05",
    )  # fmt: skip

    # Then: exit 1, saying why.
    assert out.returncode == 1, out.stderr[-3000:]
    assert "B worse than A: -" in out.stdout
    assert "gate: FAILED: accuracy -" in out.stdout


def test_promote_moves_the_baselines_alias_to_a_passing_candidate(store: Store):
    # Given: the untrained model's registered version is the champion.
    client = store.client
    client.set_registered_model_alias("insects", "champion", "1")
    child = store.children()[0]

    # When: a trained model is compared with models:/insects@champion, promote=true.
    out = store.compare(
        "baseline=models:/insects@champion", f"candidate=runs:/{child}/model", "max_drop=0.01",
        "promote=true",
    )  # fmt: skip

    # Then: it passes and becomes the champion, which predict then uses.
    assert out.returncode == 0, out.stderr[-3000:]
    champion = client.get_model_version_by_alias("insects", "champion")
    assert champion.run_id == child
    assert f"promoted: models:/insects@champion is version {champion.version}" in out.stdout
    image = next((store.folder / "test" / "cockroach").iterdir())
    labelled = cli(
        "insect_exp.predict", "model_uri=models:/insects@champion", f"inputs={image}",
        f"mlflow.tracking_uri={store.uri}", cwd=store.root,
    )  # fmt: skip
    assert labelled.stdout.splitlines()[1].split(",")[1] == "cockroach", labelled.stderr[-2000:]


def test_a_sweep_of_several_groups_needs_one_picked(store: Store):
    # Given: the sweep's children in two groups.
    client, children = store.client, store.children()
    before = {child: client.get_run(child).data.tags["insect_exp.group"] for child in children}
    for child, group in zip(children, ("lr=0.1", "lr=0.2", "lr=0.2"), strict=True):
        client.set_tag(child, "insect_exp.group", group)
    try:
        # When: the bare parent is compared.
        out = store.compare(f"runs:/{store.good_sweep}", store.bad_run)
    finally:
        for child, group in before.items():
            client.set_tag(child, "insect_exp.group", group)

    # Then: one line naming both groups, exit 2.
    assert out.returncode == 2
    assert "several groups" in out.stderr and "'lr=0.1', 'lr=0.2'" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_input_exits_2_so_that_1_always_means_a_failed_gate(store: Store):
    unknown = store.compare("0123456789abcdef0123456789abcdef", store.bad_run)
    typo = store.compare(store.bad_run, store.bad_run, "max_dorp=0.01")
    out_of_range = store.compare(store.bad_run, store.bad_run, "max_drop=2")

    assert unknown.returncode == 2
    assert "insect_exp.compare: error: '0123456789abcdef0123456789abcdef': no such run" in (
        unknown.stderr
    )
    assert typo.returncode == 2
    assert "max_dorp" in typo.stderr
    assert out_of_range.returncode == 2
    assert "error: max_drop=2.0 is out of range: must be null or in [0, 1]" in out_of_range.stderr


def test_a_and_b_on_the_command_line_are_baseline_and_candidate_as_written(tmp_path: Path):
    # A group's name holds `=` and `,`; an alias `@`: none of them is Hydra syntax here.
    out = cli(
        "insect_exp.compare", "runs:/abc#optimizer=sgd,model.width=2", "models:/insects@champion",
        "--cfg", "job", cwd=tmp_path,
    )  # fmt: skip

    assert out.returncode == 0, out.stderr[-2000:]
    assert "baseline: runs:/abc#optimizer=sgd,model.width=2\n" in out.stdout
    assert "candidate: models:/insects@champion\n" in out.stdout
