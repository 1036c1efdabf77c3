"""Makes the docs' pictures in docs/img/: the MLflow UI on a tiny demo sweep, and sample plots.

Run from the checkout, in its virtualenv, with Debian's Chromium installed
(`bash .ci/install-browser.sh`):

    python docs/make_screenshots.py

It trains a two-job sweep on the built-in demo data in a temporary directory, opens `mlflow ui`
on it, screenshots the runs table and its charts in headless Chromium and copies two of a run's
plots.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

IMG = Path(__file__).resolve().parent / "img"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MAX_BYTES = 300_000  # each picture is committed to the repository
EXPERIMENT_ID = "1"  # insect_exp's experiment in a fresh store
SWEEP = (
    "-m",
    "optimizer=adam,sgd",
    "epochs=4",
    "batch_size=16",
    "model.image_size=[64,64]",
    "dataset.train_per_class=24",
    "dataset.test_per_class=8",
    "mlflow.log_model=false",
)
PLOTS = {
    "training_curves.png": "plot-curves.png",
    "test_predictions.png": "plot-predictions.png",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_sweep(workdir: Path) -> str:
    """Runs the sweep in `workdir`; returns its store's tracking URI."""
    env = {**os.environ, "INSECT_EXP_CACHE_DIR": str(workdir / "data")}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "insect_exp", *SWEEP]
    subprocess.run(command, cwd=workdir, env=env, check=True, timeout=1200)
    return f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"


def screenshot(url: str, out: Path, workdir: Path) -> None:
    """A PNG of `url` once headless Chromium has run its JavaScript for a while."""
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={workdir / 'chromium'}",
            # Loopback only: nothing of the page is fetched from elsewhere.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--window-size=1900,560",
            "--virtual-time-budget=20000",
            f"--screenshot={out}",
            url,
        ],
        check=True,
        timeout=180,
        capture_output=True,
    )


def serve_and_shoot(uri: str, workdir: Path) -> None:
    """Opens `mlflow ui` on the store and screenshots the runs table, best run first."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen(
        ["mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or ui.poll() is not None:
                    raise RuntimeError("mlflow ui did not come up") from None
                time.sleep(0.5)
        runs = f"{base}/#/experiments/{EXPERIMENT_ID}/runs?workflowType=machine_learning"
        sort = "&orderByKey=metrics.%60val_accuracy%60&orderByAsc=false"
        screenshot(runs + sort, IMG / "mlflow-runs.png", workdir)
        screenshot(runs + sort + "&compareRunsMode=CHART", IMG / "mlflow-charts.png", workdir)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def copy_plots(uri: str, workdir: Path) -> None:
    """Copies the plots of the sweep's best job (by val_accuracy) into docs/img/."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([EXPERIMENT_ID], order_by=["metrics.val_accuracy DESC"])
    jobs = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    run_id = jobs[0].info.run_id
    for artifact, name in PLOTS.items():
        local = client.download_artifacts(run_id, f"plots/{artifact}", str(workdir))
        shutil.copyfile(local, IMG / name)


def shrink(png: Path) -> None:
    """Rewrites a PNG with a 256-colour palette when it is over the docs' size limit."""
    from PIL import Image

    if png.stat().st_size > MAX_BYTES:
        with Image.open(png) as image:
            palette = image.convert("RGB").quantize(colors=256)
        palette.save(png, optimize=True)


def main() -> None:
    IMG.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="insect_exp-docs-") as tmp:
        workdir = Path(tmp)
        uri = train_sweep(workdir)
        copy_plots(uri, workdir)
        serve_and_shoot(uri, workdir)
    for png in sorted(IMG.glob("*.png")):
        shrink(png)
        print(f"{png}: {png.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
