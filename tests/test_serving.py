"""The logged model: encoded files in, class names and probabilities out; `mlflow models serve`."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import pixel_bomb
from tests.lifecycle import Trained, train_run
from tests.mlflow_server import OPENER, free_port, group_members, wait_until_answers


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("serve")
    return train_run(root, "mlflow.registered_model_name=insects")


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def test_the_models_decoding_is_trainings_bit_for_bit(tmp_path):
    # Given one picture in every format training reads, and odd modes (grey, RGBA, palette)
    import tensorflow as tf

    from insect_exp.data.decode import decode_image
    from insect_exp.data.pipeline import decode_files
    from insect_exp.data.scan import FileList

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8))
    files = {
        "a.jpg": _encoded(rgb, "JPEG", quality=90),
        "b.png": _encoded(rgb, "PNG"),
        "c.gif": _encoded(rgb.convert("P"), "GIF"),
        "d.bmp": _encoded(rgb, "BMP"),
        "e.webp": _encoded(rgb, "WEBP"),
        "f.png": _encoded(rgb.convert("L"), "PNG"),
        "g.png": _encoded(rgb.convert("RGBA"), "PNG"),
        "h.jpg": _encoded(rgb.convert("L"), "JPEG"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)

    paths = [str(tmp_path / name) for name in files]
    for size in ((32, 32), (180, 180), (20, 64)):
        # When training decodes the files (as its splits are decoded) and the logged model's
        # decoder reads each of them
        split, failed = decode_files(FileList(paths, [0] * len(paths)), size)
        assert not failed
        training = dict(zip(split.paths, split.images, strict=True))
        for name, data in files.items():
            ours = decode_image(tf.constant(data), size).numpy()
            theirs = training[str(tmp_path / name)]
            # Then the pixels are identical
            assert ours.dtype == np.uint8 and ours.shape == (*size, 3)
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{name} at {size}")


def test_the_logged_model_loads_with_mlflow_and_tensorflow_only(trained, tmp_path):
    # Given the model in a fresh process where insect_exp cannot be imported and no Keras flag
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.save(tmp_path / "x.npy", images)
    files = sorted(str(p) for p in (trained.folder / "test").rglob("*.jpg"))
    code = f"""
import sys, json, numpy as np, pandas as pd
sys.modules["insect_exp"] = None   # any import of it fails
import mlflow
mlflow.set_tracking_uri({trained.tracking_uri!r})
model = mlflow.pyfunc.load_model("runs:/{trained.run_id}/model")
logits = model.predict(np.load({str(tmp_path / "x.npy")!r}))
table = model.predict(pd.DataFrame({{"image": [open(f, "rb").read() for f in {files!r}]}}))
print(json.dumps({{
    "logits": np.asarray(logits).shape,
    "labels": table["label"].tolist(),
    "sums": [sum(p.values()) for p in table["probabilities"]],
    "keras": "tf_keras" in sys.modules,  # Keras 2, which training needs; TF loads Keras 3
    "metadata": model.metadata.metadata,
    "example": model.input_example is not None,
}}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_USE_LEGACY_KERAS", "PYTHONPATH")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
        cwd=tmp_path,
    )  # fmt: skip

    # Then float images give logits as before, encoded files give the run's labels
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["logits"] == [2, 3]
    predictions = trained.predictions_tsv()
    assert found["labels"] == [predictions[f] for f in files]
    assert found["sums"] == pytest.approx([1.0] * len(files))
    assert not found["keras"]
    assert found["metadata"]["class_names"] == trained.class_names
    assert found["example"]


def test_bad_input_is_a_400_error_naming_the_row(trained):
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(trained.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{trained.model_id}")
    good = next((trained.folder / "test").rglob("*.jpg")).read_bytes()
    cases = {
        "row 1: cannot decode the image (Unknown image file format": [good, b"text"],
        "row 0: empty file": [b"", good],
        "not base64": ["%%%"],
    }
    for message, cells in cases.items():
        with pytest.raises(MlflowException, match=message.replace("(", r"\(")) as err:
            model.predict(pd.DataFrame({"image": cells}))
        assert err.value.get_http_status_code() == 400
    for wrong in (pd.DataFrame({"img": [good]}), np.zeros((1, 8, 8, 3), np.float32)):
        with pytest.raises(MlflowException) as err:
            model.predict(wrong)
        assert err.value.get_http_status_code() == 400


class ModelServer:
    """`mlflow models serve` on 127.0.0.1, in its own process group, stopped by its pid."""

    def __init__(self, model_uri: str, tracking_uri: str, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
        env.pop("TF_USE_LEGACY_KERAS", None)
        command = [
            sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
            "--env-manager", "local", "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )  # fmt: skip

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        wait_until_answers(self.process, f"{self.url}/ping", self.log_tail, timeout_s)

    def post(self, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{self.url}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with OPENER.open(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(20)
        # Workers left in its group (the group id is its pid): end them too.
        deadline = time.monotonic() + 20
        while group_members(self.process.pid) and time.monotonic() < deadline:
            os.killpg(self.process.pid, 9)
            time.sleep(0.2)


def _request(*files: bytes) -> dict:
    rows = [[base64.b64encode(data).decode()] for data in files]
    return {"dataframe_split": {"columns": ["image"], "data": rows}}


def test_mlflow_models_serve_labels_jpeg_and_png_files_and_survives_a_corrupt_one(
    trained, tmp_path
):
    # Given the registered model served by name, the way the README says
    server = ModelServer("models:/insects/latest", trained.tracking_uri, tmp_path / "serve.log")
    try:
        server.wait_ready()
        jpeg = sorted((trained.folder / "test").rglob("*.jpg"))
        png = _encoded(Image.open(jpeg[-1]), "PNG")  # another format, another size
        png_big = _encoded(Image.open(jpeg[0]).resize((97, 61)), "PNG")

        # When a client posts JPEG and PNG files
        status, body = server.post(_request(*(p.read_bytes() for p in jpeg), png, png_big))

        # Then every row has a readable class name and every class's probability, the same
        # labels as the run's predictions for its own files
        assert status == 200, body
        rows = body["predictions"]
        assert len(rows) == len(jpeg) + 2
        predictions = trained.predictions_tsv()
        assert [r["label"] for r in rows[: len(jpeg)]] == [predictions[str(p)] for p in jpeg]
        import mlflow

        mlflow.set_tracking_uri(trained.tracking_uri)
        local = mlflow.pyfunc.load_model(f"models:/{trained.model_id}")
        expected = local.predict(pd.DataFrame({"image": [png, png_big]}))
        assert [r["label"] for r in rows[-2:]] == expected["label"].tolist()
        for r in rows:
            assert set(r["probabilities"]) == set(trained.class_names)
            assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
            assert r["probability"] == pytest.approx(max(r["probabilities"].values()))

        # And a corrupt file is a 400 naming it, after which the server still answers
        status, body = server.post(_request(jpeg[0].read_bytes(), b"\xff\xd8\xff\xe0garbage"))
        assert status == 400
        assert "row 1: cannot decode the image" in body["message"]
        status, body = server.post(_request(jpeg[0].read_bytes()))
        assert status == 200 and body["predictions"][0]["label"] == predictions[str(jpeg[0])]

        # And the model's own serving example is a valid request
        from mlflow.artifacts import download_artifacts

        model_dir = download_artifacts(
            f"models:/{trained.model_id}", dst_path=str(tmp_path / "model"),
            tracking_uri=trained.tracking_uri,
        )  # fmt: skip
        example = Path(model_dir) / "serving_input_example.json"
        status, body = server.post(json.loads(example.read_text()))
        assert status == 200 and body["predictions"][0]["label"] in trained.class_names
    finally:
        server.stop()
    assert not group_members(server.process.pid)


def _rss_bytes(pgid: int) -> int:
    """The resident memory of every live process in a process group, together."""
    total = 0
    for pid in group_members(pgid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # gone meanwhile
            continue
        kb = next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        total += int(kb) * 1024
    return total


def test_a_pixel_bomb_is_a_400_naming_its_row_and_size_and_the_server_stays_flat(trained, tmp_path):
    # Given the served model, warmed up with a real image
    server = ModelServer(f"models:/{trained.model_id}", trained.tracking_uri, tmp_path / "s.log")
    try:
        server.wait_ready()
        good = next((trained.folder / "test").rglob("*.jpg")).read_bytes()
        assert server.post(_request(good))[0] == 200
        before = _rss_bytes(server.process.pid)

        # When clients post a 48 KB PNG of 20000x20000 pixels (1.2 GB decoded), again and again
        for _ in range(3):
            status, body = server.post(_request(good, pixel_bomb()))

            # Then each request is a 400 naming the row and the size, the limit beside it
            assert status == 400, body
            assert "row 1: too many pixels (20000x20000)" in body["message"]
            assert "at most 89478485 pixels" in body["message"]

        # And the server has not grown (generous: one decoded bomb alone would be 1.2 GB)
        grown = _rss_bytes(server.process.pid) - before
        assert grown < 200 * 2**20, f"the server grew by {grown / 2**20:.0f} MB"
        status, body = server.post(_request(good))
        assert status == 200 and body["predictions"][0]["label"] in trained.class_names
    finally:
        server.stop()


def test_each_run_registers_a_new_version_that_latest_follows(tmp_path):
    import mlflow

    # Given two runs with mlflow.registered_model_name=insects in one store
    first = train_run(tmp_path, "mlflow.registered_model_name=insects")
    second = train_run(tmp_path, "mlflow.registered_model_name=insects", "seed=7")

    # Then each registered its model as a new version, and latest is the second one
    client = second.client
    versions = sorted(client.search_model_versions("name='insects'"), key=lambda v: int(v.version))
    assert [(int(v.version), v.run_id) for v in versions] == [
        (1, first.run_id), (2, second.run_id),
    ]  # fmt: skip
    assert client.get_run(second.run_id).data.tags["registered_model"] == "insects/2"
    mlflow.set_tracking_uri(second.tracking_uri)
    assert mlflow.models.get_model_info("models:/insects/latest").run_id == second.run_id
    assert mlflow.models.get_model_info("models:/insects/1").model_id == first.model_id


def test_registering_through_a_tracking_server_and_predicting_by_name(tmp_path, monkeypatch):
    from insect_exp.config import PredictConfig, StoreConfig
    from insect_exp.predict import run
    from tests.mlflow_server import MlflowServer

    # Given a team server on a SQLite store, and a run that logs and registers through it
    server = MlflowServer(
        f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts", tmp_path / "server.log"
    )
    try:
        server.wait_ready()
        trained = train_run(
            tmp_path, "mlflow.registered_model_name=insects", tracking_uri=server.url
        )

        # When predict names the model by its registry name through the server
        image = next((trained.folder / "test" / "dragonflies").iterdir())
        out = tmp_path / "preds.csv"
        cfg = PredictConfig(
            model_uri="models:/insects/latest", inputs=str(image), output=str(out),
            mlflow=StoreConfig(server.url),
        )  # fmt: skip
        assert run(cfg) == 1

        # Then the label is the run's own for that image
        label = out.read_text().splitlines()[1].split(",")[1]
        assert label == trained.predictions_tsv()[str(image)]
        (version,) = trained.client.search_model_versions("name='insects'")
        assert version.run_id == trained.run_id
    finally:
        server.stop()
