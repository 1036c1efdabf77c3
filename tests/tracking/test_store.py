"""A team store on a real server database: `mlflow server` on a throwaway PostgreSQL cluster,
with a joblib sweep of 8 jobs and two independent runs logging to it at the same time."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from tests.conftest import artifact_paths, make_image_folder
from tests.mlflow_server import MlflowServer
from tests.postgres import PostgresCluster, start_or_skip
from tests.sweeps import EXPERIMENT, TINY

pytestmark = pytest.mark.slow

SEEDS = range(1, 9)
SINGLES = ("alice", "bob")  # run names of the two independent runs; bob logs his model
MODEL_RUN = "bob"
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
BATCHES = 5  # 18 training images (tests.conftest.make_image_folder) in batches of 4, one epoch
TEST_IMAGES = 9
RUN_ARTIFACTS = {
    "plots/training_curves.png",
    "plots/confusion_matrix.png",
    "predictions.tsv",
    "config/config.yaml",
    "dataset/stats.json",
}
TIMEOUT_S = 900


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    """A running PostgreSQL cluster with an empty `mlflow` database, stopped and removed after."""
    cluster = start_or_skip(
        {"psycopg2": 'psycopg2 for `mlflow server`: `pip install -e ".[postgres]"` installs it'},
        "PostgreSQL check",
        "mlflow",
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@dataclass
class TeamStore:
    """What the concurrent jobs left on the server, read back through it."""

    server: MlflowServer
    cluster: PostgresCluster
    client: MlflowClient
    root: Path
    artifacts_destination: Path
    experiment_id: str
    runs: list[Run]
    parent: Run
    children: list[Run]
    singles: dict[str, Run]
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def trained(self) -> list[Run]:
        """The runs that trained a model: the sweep's children and the independent runs."""
        return [*self.children, *self.singles.values()]


def _env(root: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "INSECT_EXP_CACHE_DIR": str(root / "data"),
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # Loopback traffic never goes through a proxy from the environment.
        "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1,localhost"])),
    }
    env.pop("MLFLOW_TRACKING_URI", None)  # the command line says where to log
    return env


def _launch(command: list[str], cwd: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a job in its own process group (so joblib's workers can be stopped with it)."""
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop_group(process: subprocess.Popen) -> None:
    """Kill a job and its process group (our pid is the group id) if anything of it is left."""
    if process.poll() is None:
        process.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)


@pytest.fixture(scope="module")
def team_store(
    postgres: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TeamStore]:
    """A server on PostgreSQL; a joblib sweep and two single runs started at once against it."""
    root = tmp_path_factory.mktemp("pg_team")
    folder = make_image_folder(root / "insects")
    destination = root / "artifacts"
    server = MlflowServer(postgres.sqlalchemy_uri("mlflow"), destination, root / "server.log")
    jobs: dict[str, subprocess.Popen] = {}
    try:
        server.wait_ready()
        env = _env(root)
        tiny = [o for o in TINY if not o.startswith("mlflow.log_model=")]
        common = [*tiny, f"dataset.root={folder}", f"mlflow.tracking_uri={server.url}"]
        python = [sys.executable, "-m", "insect_exp"]
        seeds = ",".join(map(str, SEEDS))
        sweep = ["-m", *common, "mlflow.log_model=false", "hydra/launcher=joblib"]
        sweep += ["hydra.launcher.n_jobs=2", f"seed={seeds}"]
        commands = {"sweep": [*python, *sweep]}
        for i, name in enumerate(SINGLES):
            log_model = str(name == MODEL_RUN).lower()
            single = [*common, f"mlflow.log_model={log_model}", f"mlflow.run_name={name}"]
            commands[name] = [*python, *single, "threads=1", f"seed={11 + i}"]
        # Everyone at once, each from its own directory as separate users would.
        for name, command in commands.items():
            jobs[name] = _launch(command, root / name, root / f"{name}.log", env)
        deadline = time.monotonic() + TIMEOUT_S
        for name, job in jobs.items():
            try:
                job.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} still running after {TIMEOUT_S}s:\n{_tail(root, name)}")
        outputs = {name: _tail(root, name) for name in jobs}
        for name, job in jobs.items():
            assert job.returncode == 0, f"{name} exited {job.returncode}:\n{outputs[name]}"

        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        assert experiment is not None, outputs
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        parents = [r for r in runs if "sweep.dir" in r.data.tags]
        assert len(parents) == 1, [r.info.run_name for r in runs]
        (parent,) = parents
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        singles = {r.info.run_name: r for r in runs if r.info.run_name in SINGLES}
        yield TeamStore(
            server=server,
            cluster=postgres,
            client=client,
            root=root,
            artifacts_destination=destination,
            experiment_id=experiment.experiment_id,
            runs=runs,
            parent=parent,
            children=children,
            singles=singles,
            outputs=outputs,
        )
    finally:
        for job in jobs.values():
            _stop_group(job)
        server.stop()


def _tail(root: Path, name: str, chars: int = 4000) -> str:
    return (root / f"{name}.log").read_text(errors="replace")[-chars:]


def test_every_run_of_the_sweep_and_the_single_runs_finished_in_one_experiment(team_store):
    # Given a sweep of 8 jobs (2 at a time) and 2 single runs that logged to the server at once
    store = team_store
    client = store.client

    # Then the experiment holds exactly the parent, its 8 children and the 2 single runs
    assert len(store.children) == len(SEEDS)
    assert sorted(int(c.data.params["seed"]) for c in store.children) == list(SEEDS)
    assert sorted(store.singles) == sorted(SINGLES)
    assert len(store.runs) == 1 + len(SEEDS) + len(SINGLES), [r.info.run_name for r in store.runs]
    # And every one of them ended FINISHED
    statuses = {r.info.run_name: r.info.status for r in store.runs}
    assert set(statuses.values()) == {"FINISHED"}, statuses
    # And no run was filed under the Default experiment
    default = client.get_experiment_by_name("Default")
    strays = client.search_runs([default.experiment_id]) if default else []
    assert not strays, [r.info.run_name for r in strays]
    # And the experiment keeps its artifacts behind the server, not on a client's disk
    experiment = client.get_experiment(store.experiment_id)
    assert experiment.artifact_location.startswith("mlflow-artifacts:/"), experiment
    # And the server answered every request without an error of its own
    log = store.server.log_path.read_text(errors="replace")
    assert not re.search(r'HTTP/1\.1" 5\d\d', log), store.server.log_tail()
    assert "Traceback" not in log, store.server.log_tail()


def test_every_epoch_and_batch_metric_arrived(team_store):
    # Given the runs that trained (8 children and 2 single runs)
    client = team_store.client
    assert len(team_store.trained) == len(SEEDS) + len(SINGLES)

    for run in team_store.trained:
        run_id = run.info.run_id
        # Then each has one value per epoch of each epoch metric, at step 0 (1 epoch)
        for key in EPOCH_METRICS:
            history = client.get_metric_history(run_id, key)
            assert [m.step for m in history] == [0], (run.info.run_name, key, history)
        assert run.data.metrics["val_accuracy"] == pytest.approx(
            client.get_metric_history(run_id, "val_accuracy")[0].value
        )
        # And one batch_loss per training batch, steps 0..4
        batches = client.get_metric_history(run_id, "batch_loss")
        assert sorted(m.step for m in batches) == list(range(BATCHES)), run.info.run_name
        assert {"test_loss", "test_accuracy"} <= set(run.data.metrics)


def test_every_run_uploaded_its_artifacts_through_the_server(team_store):
    # Given the runs that trained
    store = team_store
    client = store.client

    for run in store.trained:
        # Then the server lists its plots, predictions and config
        found = artifact_paths(client, run.info.run_id)
        assert found >= RUN_ARTIFACTS, (run.info.run_name, RUN_ARTIFACTS - found)
        # And they lie in --artifacts-destination, where the server put them
        stored = store.artifacts_destination / store.experiment_id / run.info.run_id / "artifacts"
        assert (stored / "plots" / "training_curves.png").stat().st_size > 1000
    # And a run's predictions come back whole: one row per test image
    bob = store.singles[MODEL_RUN].info.run_id
    local = client.download_artifacts(bob, "predictions.tsv", str(store.root / "download"))
    rows = Path(local).read_text().splitlines()
    assert rows[0].split("\t") == ["path", "true", "predicted"]
    assert len(rows) == 1 + TEST_IMAGES


def test_the_sweep_parent_summarises_all_eight_children(team_store):
    # Given the sweep's parent run
    store = team_store
    parent = store.client.get_run(store.parent.info.run_id)

    # Then its summary table lists every child, FINISHED, by run id
    local = store.client.download_artifacts(
        parent.info.run_id, "summary/children.csv", str(store.root / "summary")
    )
    rows = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    assert {row["run_id"] for row in rows} == {c.info.run_id for c in store.children}
    assert {row["status"] for row in rows} == {"FINISHED"}
    assert {"summary/children.md", "summary/val_accuracy.png"} <= artifact_paths(
        store.client, parent.info.run_id, "summary"
    )
    # And its counts and best child agree
    assert parent.data.metrics["jobs_finished"] == len(SEEDS)
    assert parent.data.metrics["jobs_failed"] == 0
    best = max(store.children, key=lambda c: c.data.metrics["val_accuracy"])
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(
        best.data.metrics["val_accuracy"]
    )


def test_the_runs_are_rows_of_the_postgres_database(team_store):
    # Given the database behind the server
    import psycopg2

    connection = psycopg2.connect(team_store.cluster.dsn("mlflow"))
    try:
        with connection.cursor() as cursor:
            # When it is queried directly
            cursor.execute(
                "SELECT status, count(*) FROM runs WHERE experiment_id = %s GROUP BY status",
                (int(team_store.experiment_id),),
            )
            statuses = dict(cursor.fetchall())
            cursor.execute("SELECT count(*) FROM metrics WHERE key = 'batch_loss'")
            (batch_losses,) = cursor.fetchone()
    finally:
        connection.close()

    # Then every run and every batch loss is a row there
    assert statuses == {"FINISHED": 1 + len(SEEDS) + len(SINGLES)}
    assert batch_losses == BATCHES * (len(SEEDS) + len(SINGLES))


def test_the_logged_model_reloads_through_the_server_and_predicts(team_store, tmp_path):
    # Given the one run that logged its model (every other run had mlflow.log_model=false)
    store = team_store
    models = store.client.search_logged_models([store.experiment_id])
    assert [m.source_run_id for m in models] == [store.singles[MODEL_RUN].info.run_id]
    (model,) = models

    # When a fresh process loads it by id from the server with MLflow's pyfunc loader
    code = (
        "import numpy as np, mlflow\n"
        f"mlflow.set_tracking_uri({store.server.url!r})\n"
        f"m = mlflow.pyfunc.load_model('models:/{model.model_id}')\n"
        "x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype('float32')\n"
        "y = np.asarray(m.predict(x))\n"
        "print('SHAPE', y.shape, 'FINITE', bool(np.isfinite(y).all()))\n"
    )
    env = {k: v for k, v in _env(tmp_path).items() if k != "TF_USE_LEGACY_KERAS"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )

    # Then it predicts logits for the 3 classes
    assert "SHAPE (2, 3) FINITE True" in out.stdout, out.stderr[-3000:]
