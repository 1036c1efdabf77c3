"""Comparing runs in the MLflow UI: a real `mlflow server` on a temporary store holding a small
sweep, checked through its REST API and in headless Chromium; and a train job logging to it."""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from insect_exp import tracking, train
from tests.mlflow_server import MlflowServer
from tests.sweeps import EXPERIMENT, run_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@dataclass
class UiStore:
    server: MlflowServer
    experiment_id: str
    parent_id: str
    artifacts_destination: Path


@pytest.fixture(scope="module")
def ui_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiStore]:
    """A store under <tmp>/mlruns holding a two-job sweep, served by a real `mlflow server`."""
    root = tmp_path_factory.mktemp("ui")
    (root / "mlruns").mkdir()
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"  # where run_sweep keeps its store
    # Create the schema (and the experiment, artifacts under mlruns/artifacts as file URIs)
    # before the server opens the database, so the two never migrate it at the same time.
    experiment_id = tracking.ensure_experiment(uri, EXPERIMENT)
    destination = root / "mlartifacts"
    server = MlflowServer(uri, destination, root / "server.log")
    try:
        # The server boots (several seconds) while the sweep trains.
        sweep = run_sweep(root, "optimizer=adam,sgd")
        assert sweep.returncode == 0 and sweep.parent is not None, sweep.output
        assert sweep.tracking_uri == uri and sweep.experiment_id == experiment_id
        server.wait_ready()
        yield UiStore(server, experiment_id, sweep.parent.info.run_id, destination)
    finally:
        server.stop()


def _runs(server: MlflowServer, experiment_id: str) -> dict[str, dict]:
    """run id -> run (as the REST API returns it) for every run of the experiment."""
    found = server.api("runs/search", {"experiment_ids": [experiment_id], "max_results": 100})
    return {run["info"]["run_id"]: run for run in found.get("runs", [])}


def _as_dict(entries: list[dict]) -> dict[str, object]:
    return {entry["key"]: entry["value"] for entry in entries}


def test_server_lists_the_sweep_parent_and_its_children_with_params_and_metrics(ui_store):
    # Given a server on a store holding a sweep
    server = ui_store.server

    # When a client looks the experiment and its runs up through the REST API
    experiment = server.api("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    runs = _runs(server, experiment["experiment_id"])

    # Then the parent and its two children are listed, the children tagged with the parent's id
    assert experiment["experiment_id"] == ui_store.experiment_id
    assert ui_store.parent_id in runs
    children = [
        run
        for run in runs.values()
        if _as_dict(run["data"].get("tags", [])).get("mlflow.parentRunId") == ui_store.parent_id
    ]
    assert len(children) == 2, {r["info"]["run_name"]: r["data"].get("tags") for r in runs.values()}
    assert len(runs) == 3
    # And each child carries its params and final metrics
    optimizers = set()
    for child in children:
        assert child["info"]["status"] == "FINISHED"
        params = _as_dict(child["data"]["params"])
        metrics = _as_dict(child["data"]["metrics"])
        optimizers.add(params["optimizer.name"])
        assert params["epochs"] == "1"
        assert params["model.name"] == "cnn"
        assert {"loss", "accuracy", "val_loss", "val_accuracy", "test_accuracy"} <= set(metrics)
        assert 0.0 <= metrics["val_accuracy"] <= 1.0
    assert optimizers == {"adam", "sgd"}
    # And a metric's history comes back per epoch
    history = server.api(
        "metrics/get-history", run_id=children[0]["info"]["run_id"], metric_key="val_accuracy"
    )["metrics"]
    assert [m["step"] for m in history] == [0]


def _artifact_paths(server: MlflowServer, run_id: str, path: str = "") -> list[str]:
    """Every artifact file of a run, as the server lists them."""
    listing = server.api("artifacts/list", run_id=run_id, path=path)
    found = []
    for item in listing.get("files", []):
        is_dir = item.get("is_dir", False)
        found += _artifact_paths(server, run_id, item["path"]) if is_dir else [item["path"]]
    return found


def test_server_serves_the_plots_of_the_sweep_and_its_children_as_png(ui_store):
    # Given a sweep whose plots lie in the store's mlruns/artifacts (file URIs)
    server = ui_store.server
    runs = _runs(server, ui_store.experiment_id)
    child_id = next(run_id for run_id in runs if run_id != ui_store.parent_id)
    assert runs[child_id]["info"]["artifact_uri"].startswith("file://")

    # When the UI fetches a child's confusion matrix and the parent's summary plot
    child_plot = server.get("/get-artifact", path="plots/confusion_matrix.png", run_uuid=child_id)
    parent_pngs = [p for p in _artifact_paths(server, ui_store.parent_id) if p.endswith(".png")]
    assert parent_pngs, "the sweep's parent run has no plot"
    parent_plot = server.get("/get-artifact", path=parent_pngs[0], run_uuid=ui_store.parent_id)

    # Then both come back as PNG images
    for body in (child_plot, parent_plot):
        assert body[:8] == PNG_MAGIC, body[:200]
        assert len(body) > 1000


def _chromium_or_skip() -> str:
    """Debian's Chromium; a missing browser skips locally but fails on CI (CI=true)."""
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    reason = "no Chromium at /usr/bin/chromium: `sudo bash .ci/install-browser.sh` installs it"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the UI check in a browser, but there is {reason}")
    pytest.skip(reason)


def _render(url: str, out_dir: Path, budget_ms: int = 10_000) -> str:
    """The DOM of `url` after headless Chromium has run its JavaScript for `budget_ms`."""
    profile = tempfile.mkdtemp(prefix="chromium-", dir=out_dir)
    command = [
        _chromium_or_skip(),
        "--headless",
        "--no-sandbox",  # we run as root in CI
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        # Loopback only: no name resolution, and every non-loopback request goes to a dead proxy.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",
        "--window-size=1600,1000",
        f"--virtual-time-budget={budget_ms}",
        "--dump-dom",
        url,
    ]
    browser = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        dom, errors = browser.communicate(timeout=120)
    finally:
        if browser.poll() is None:
            os.killpg(browser.pid, signal.SIGKILL)
            browser.communicate()
    # A page that fails to load still exits 0, with an empty DOM and the reason on stderr.
    assert browser.returncode == 0 and dom.strip(), errors[-3000:]
    return dom


def _run_links(dom: str, experiment_id: str) -> dict[str, str]:
    """run id -> text of each link to a run page in the rendered runs table."""
    pattern = rf'href="#/experiments/{experiment_id}/runs/([0-9a-f]{{32}})"[^>]*>(.*?)</a>'
    return {
        run_id: html.unescape(re.sub(r"<[^>]+>", "", inner)).strip()
        for run_id, inner in re.findall(pattern, dom, flags=re.S)
    }


def _names(ui_store: UiStore) -> dict[str, str]:
    runs = _runs(ui_store.server, ui_store.experiment_id)
    return {run_id: run["info"]["run_name"] for run_id, run in runs.items()}


def test_runs_page_sorted_by_val_accuracy_shows_every_run_name_in_chromium(ui_store, tmp_path):
    # Given the runs table sorted by a metric (a sorted table lists children flat, for comparing)
    names = _names(ui_store)
    url = (
        f"{ui_store.server.url}/#/experiments/{ui_store.experiment_id}/runs"
        "?orderByKey=metrics.%60val_accuracy%60&orderByAsc=false"
    )

    # When headless Chromium renders it
    dom = _render(url, tmp_path)
    (tmp_path / "runs.html").write_text(dom)

    # Then every run of the sweep appears by name, linked to its run page
    links = _run_links(dom, ui_store.experiment_id)
    assert links == names, f"rendered DOM saved in {tmp_path / 'runs.html'}"


def test_runs_page_nests_the_children_under_the_parent_in_chromium(ui_store, tmp_path):
    # Given the experiment's runs table as it first opens
    names = _names(ui_store)
    url = f"{ui_store.server.url}/#/experiments/{ui_store.experiment_id}/runs"

    # When headless Chromium renders it
    dom = _render(url, tmp_path)
    (tmp_path / "runs.html").write_text(dom)

    # Then only the parent is a top-level row (its children fold under its expander)
    links = _run_links(dom, ui_store.experiment_id)
    assert links == {ui_store.parent_id: names[ui_store.parent_id]}, (
        f"rendered DOM saved in {tmp_path / 'runs.html'}"
    )
    assert "3 matching runs" in re.sub(r"<[^>]+>", "", dom)


def test_the_printed_ui_address_opens_on_the_training_runs_not_genai(ui_store, tmp_path):
    # Given the address a training run prints for its experiment (a fresh browser profile, in
    # which MLflow 3's UI would open in its GenAI mode)
    from insect_exp import tracking

    url = tracking.ui_url(ui_store.server.url, ui_store.experiment_id)

    # When headless Chromium renders it
    dom = _render(url, tmp_path)
    (tmp_path / "landing.html").write_text(dom)

    # Then it is the runs table in model-training mode, with the sweep's parent run listed,
    # not the GenAI overview of traces
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
    assert ui_store.parent_id in _run_links(dom, ui_store.experiment_id), tmp_path / "landing.html"
    assert "matching runs" in text and "Usage" not in text
    # And the experiment says what kind it is, as MLflow's UI reads it
    experiment = ui_store.server.api("experiments/get", experiment_id=ui_store.experiment_id)[
        "experiment"
    ]
    tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
    assert tags.get("mlflow.experimentKind") == "custom_model_development"


def test_train_job_logs_to_the_server_and_uploads_artifacts_through_it(
    ui_store, compose_cfg, image_folder
):
    # Given a team server and a job pointed at it (a new experiment: artifacts go via the server)
    server = ui_store.server
    cfg = compose_cfg(
        "dataset=insects",
        f"dataset.root={image_folder}",
        f"mlflow.tracking_uri={server.url}",
        "mlflow.experiment_name=insect_exp_team",
        "mlflow.log_model=false",
    )

    # When the train job runs
    val_accuracy = train.run(cfg)

    # Then the server holds the FINISHED run with its params and metrics
    experiment = server.api("experiments/get-by-name", experiment_name="insect_exp_team")
    experiment = experiment["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:/"), experiment
    (run,) = _runs(server, experiment["experiment_id"]).values()
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED"
    assert _as_dict(run["data"]["params"])["dataset.name"] == "insects"
    assert _as_dict(run["data"]["metrics"])["val_accuracy"] == pytest.approx(val_accuracy)
    batches = server.api("metrics/get-history", run_id=run_id, metric_key="batch_loss")["metrics"]
    assert len(batches) == 5  # 18 images in batches of 4, one epoch
    # And its plots were uploaded through the server into --artifacts-destination
    body = server.get("/get-artifact", path="plots/confusion_matrix.png", run_uuid=run_id)
    assert body[:8] == PNG_MAGIC
    stored = (
        ui_store.artifacts_destination
        / experiment["experiment_id"]
        / run_id
        / "artifacts"
        / "plots"
        / "confusion_matrix.png"
    )
    assert stored.read_bytes() == body
