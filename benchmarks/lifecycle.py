"""Using a trained model: predict throughput against the bare model, and serving latency.

Usage: python benchmarks/lifecycle.py [--images 900] [--batch-size 64] [--repeats 3]
                                      [--requests 30] [--hub-handle DIR]

It trains one model (1 epoch; the reference CNN at 180x180, or model=hub_mobilenet at 224x224
with --hub-handle, e.g. an export of python -m insect_exp.models.export_untrained) on a generated
demo folder, then measures, on this machine's CPUs:

- bare forward: the logged model's SavedModel on images already decoded and resized, in memory,
  in batches of --batch-size (images/s; best of --repeats);
- predict: insect_exp.predict's streaming path on the same files (listing excluded; reading,
  decoding and resizing overlapped with the model by tf.data), images/s, best of --repeats
  (alternating with the bare forward), and its ratio to the bare forward (0.8 at least wanted);
- the `python -m insect_exp.predict` command end to end (start-up, model download and load);
- serving: `mlflow models serve --env-manager local` on 127.0.0.1; the latency of one POST with
  one JPEG (base64 in dataframe_split), median and 90th percentile over --requests, after 3
  warm-up requests.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def train(root: Path, work: Path, uri: str, model_args: list[str]) -> str:
    """One training run; its run id."""
    from mlflow.tracking import MlflowClient

    command = [
        sys.executable, "-m", "insect_exp", "dataset=insects", f"dataset.root={root}", "epochs=1",
        f"mlflow.tracking_uri={uri}", "mlflow.experiment_name=lifecycle",
        f"hydra.run.dir={work / 'outputs'}", *model_args,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=work, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"training failed:\n{done.stderr[-3000:]}")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("lifecycle")
    return client.search_runs([experiment.experiment_id], max_results=1)[0].info.run_id


def best_rates(count: int, works: list, repeats: int) -> list[float]:
    """Images per second of each of `works`, the fastest of `repeats` calls each; the calls
    alternate, so that a noisy neighbour on a shared machine slows both alike."""
    times: list[list[float]] = [[] for _ in works]
    for _ in range(repeats):
        for i, work in enumerate(works):
            started = time.perf_counter()
            work()
            times[i].append(time.perf_counter() - started)
    return [count / min(t) for t in times]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serving_latency(model_uri: str, uri: str, jpeg: bytes, requests: int, work: Path):
    """Latencies (s) of single-JPEG requests to `mlflow models serve`, and its start-up time."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    command = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
        "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = open(work / "serve.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    try:
        while True:
            if server.poll() is not None or time.perf_counter() - started > 300:
                sys.exit(f"server did not start:\n{(work / 'serve.log').read_text()[-3000:]}")
            try:
                with _OPENER.open(f"{url}/ping", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        startup = time.perf_counter() - started
        body = json.dumps(
            {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(jpeg).decode()]]}}
        ).encode()
        latencies = []
        for i in range(3 + requests):
            request = urllib.request.Request(
                f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
            )
            t = time.perf_counter()
            with _OPENER.open(request, timeout=60) as response:
                answer = json.loads(response.read())
            if i >= 3:
                latencies.append(time.perf_counter() - t)
        return latencies, startup, answer["predictions"][0]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=900, help="images to predict on")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--hub-handle", help="a TF Hub feature-vector SavedModel: model=hub")
    args = parser.parse_args()

    import insect_exp  # noqa: F401  (environment before TensorFlow)
    from insect_exp.data.demo import ensure_demo_dataset
    from insect_exp.data.pipeline import decode_files
    from insect_exp.data.scan import FileList
    from insect_exp.predict import find_model, list_inputs, load_classifier, stream_predictions

    work = Path(tempfile.mkdtemp(prefix="insect_lifecycle_"))
    per_class = -(-args.images // 3)
    root = ensure_demo_dataset(work / "data", train_per_class=60, test_per_class=per_class)
    (work / "mlruns").mkdir()
    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    model_args = (
        ["model=hub_mobilenet", f"model.handle={args.hub_handle}"] if args.hub_handle else []
    )
    run_id = train(root, work, uri, model_args)
    model_uri = f"runs:/{run_id}/model"
    ref = find_model(model_uri, uri)
    classifier = load_classifier(ref)
    paths, _ = list_inputs(str(root / "test"))
    paths = paths[: args.images]
    sizes = [os.path.getsize(p) for p in paths]
    print(
        f"{len(paths)} JPEG files ({np.mean(sizes) / 1e3:.0f} kB on average) -> "
        f"{ref.image_size[0]}x{ref.image_size[1]}, batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs, model {'hub_mobilenet' if args.hub_handle else 'cnn'}"
    )

    split, _ = decode_files(FileList(paths, [0] * len(paths)), ref.image_size)
    images = split.images.astype(np.float32)
    step = args.batch_size

    def forward() -> None:
        for i in range(0, len(images), step):
            classifier.logits(images[i : i + step])

    def predict() -> None:
        for _ in stream_predictions(classifier, paths, step):
            pass

    forward()  # warm-up: tracing, thread pools
    predict()
    bare, streamed = best_rates(len(paths), [forward, predict], args.repeats)
    print(f"bare forward (decoded arrays):   {bare:8.1f} images/s")
    print(f"predict (files, streamed):       {streamed:8.1f} images/s")
    print(f"predict / bare forward:          {streamed / bare:8.2f}")

    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "insect_exp.predict", f"model_uri={model_uri}",
         f"inputs={root / 'test'}", f"output={work / 'preds.csv'}", f"mlflow.tracking_uri={uri}",
         f"batch_size={step}"],
        cwd=work, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        sys.exit(f"predict failed:\n{done.stderr[-3000:]}")
    print(f"python -m insect_exp.predict:    {time.perf_counter() - started:8.1f} s end to end")

    jpeg = Path(paths[0]).read_bytes()
    latencies, startup, answer = serving_latency(model_uri, uri, jpeg, args.requests, work)
    ms = sorted(1000 * t for t in latencies)
    print(f"mlflow models serve start-up:    {startup:8.1f} s")
    print(
        f"one JPEG ({len(jpeg) / 1e3:.0f} kB) per request:  median {statistics.median(ms):.1f} ms, "
        f"p90 {ms[int(0.9 * (len(ms) - 1))]:.1f} ms, min {ms[0]:.1f} ms over {len(ms)} requests"
    )
    print(f"answer: {answer['label']} {answer['probability']:.3f}")
    print(f"work dir: {work}")


if __name__ == "__main__":
    main()
