"""python -m insect_exp.predict: label files with a logged model, as training decoded them."""

from __future__ import annotations

import csv
import io
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest

from insect_exp import UserError, progress
from insect_exp.config import PredictConfig, StoreConfig
from insect_exp.predict import (
    find_model,
    list_inputs,
    load_classifier,
    progress_for,
    run,
    stream_predictions,
)
from tests.conftest import make_image_folder, pixel_bomb
from tests.lifecycle import Trained, classifier_with_its_own_decoder, cli, train_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """One run, its model registered as `insects`."""
    root = tmp_path_factory.mktemp("predict")
    return train_run(root, "mlflow.registered_model_name=insects")


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_predict_cli_labels_a_folder_like_the_runs_predictions_and_skips_bad_files(trained):
    # Given the run's test images, plus a file that is not an image and a corrupt "JPEG"
    inputs = trained.root / "to_label"
    shutil.copytree(trained.folder / "test", inputs)
    (inputs / "notes.txt").write_text("not an image")
    (inputs / "beetles" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 nothing more")
    (inputs / ".DS_Store").write_bytes(b"hidden")

    # When predict runs from the training directory, printing the CSV
    done = cli(
        "insect_exp.predict", f"model_uri=runs:/{trained.run_id}/model", f"inputs={inputs}",
        cwd=trained.root,
    )  # fmt: skip

    # Then each image has one row with the label the run's predictions.tsv gave it,
    # the top-3 labels and probabilities, and the bad files are reported, not fatal
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(done.stdout)
    assert list(rows[0]) == [
        "path", "label", "probability", "label_2", "probability_2", "label_3", "probability_3",
    ]  # fmt: skip
    expected = {
        str(inputs / Path(p).relative_to(trained.folder / "test")): label
        for p, label in trained.predictions_tsv().items()
    }
    assert {r["path"]: r["label"] for r in rows} == expected
    for r in rows:
        probs = [float(r[k]) for k in ("probability", "probability_2", "probability_3")]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)
        assert {r["label"], r["label_2"], r["label_3"]} == set(trained.class_names)
    assert f"skipped {inputs / 'notes.txt'}: not an image file" in done.stderr
    assert f"skipped {inputs / 'beetles' / 'broken.jpg'}: " in done.stderr
    assert ".DS_Store" not in done.stderr
    assert "labelled 9 images, skipped 2" in done.stderr
    assert "Traceback" not in done.stderr


def test_predict_skips_an_image_over_the_models_pixel_limit_without_decoding_it(trained, tmp_path):
    # Given a good image and a 48 KB PNG of 20000x20000 pixels (1.2 GB decoded)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = inputs / "good.jpg"
    shutil.copy(next((trained.folder / "test").rglob("*.jpg")), good)
    (inputs / "bomb.png").write_bytes(pixel_bomb())

    # When predict labels the folder
    done = cli(
        "insect_exp.predict", f"model_uri=runs:/{trained.run_id}/model", f"inputs={inputs}",
        cwd=trained.root,
    )  # fmt: skip

    # Then the good image is labelled and the bomb is skipped with its size as the reason
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["path"] for r in _rows(done.stdout)] == [str(good)]
    assert f"skipped {inputs / 'bomb.png'}: too many pixels (20000x20000)" in done.stderr
    assert "labelled 1 images, skipped 1" in done.stderr


def test_predict_writes_the_csv_file_for_a_registered_model_and_one_file(trained, tmp_path):
    # Given the model by its registry name, one image and top_k=1
    image = next((trained.folder / "test" / "cockroach").iterdir())
    out = tmp_path / "preds.csv"
    cfg = PredictConfig(
        model_uri="models:/insects/latest", inputs=str(image), output=str(out), top_k=1,
        mlflow=StoreConfig(trained.tracking_uri),
    )  # fmt: skip

    # When it runs
    assert run(cfg) == 1

    # Then the file holds one row: path, label, probability
    rows = _rows(out.read_text())
    assert len(rows) == 1 and list(rows[0]) == ["path", "label", "probability"]
    assert rows[0]["path"] == str(image)
    assert rows[0]["label"] == trained.predictions_tsv()[str(image)]


def test_streaming_keeps_the_order_across_batches_with_failures_inside_them(trained, tmp_path):
    # Given 9 images with broken files between and inside batches of 2
    good = sorted((trained.folder / "test").rglob("*.jpg"))
    paths = []
    for i, path in enumerate(good):
        paths.append(str(path))
        if i % 3 == 0:
            bad = tmp_path / f"bad{i}.png"
            bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 40)
            paths.append(str(bad))
    ref = find_model(f"models:/{trained.model_id}", trained.tracking_uri)
    classifier = load_classifier(ref)
    skipped = []

    # When they stream through in batches of 2
    found = list(
        stream_predictions(classifier, paths, batch_size=2, on_skip=lambda p, r: skipped.append(p))
    )

    # Then every good file comes out once, in order, with the probabilities the model gives
    # its decoded image; every broken one is reported
    assert [p.path for p in found] == [str(p) for p in good]
    assert sorted(skipped) == sorted(p for p in paths if "bad" in p)
    from insect_exp.data.pipeline import decode_files
    from insect_exp.data.scan import FileList

    split, _ = decode_files(FileList([str(p) for p in good], [0] * len(good)), ref.image_size)
    logits = classifier.logits(split.images)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.stack([p.probabilities for p in found]), expected, atol=1e-5)


def test_files_are_decoded_by_the_models_own_decoder_not_this_versions(tmp_path, monkeypatch):
    import tensorflow as tf

    from insect_exp.data.decode import decode_image
    from insect_exp.serving import softmax

    # Given a model whose SavedModel decodes files otherwise than this version does
    classifier, model = classifier_with_its_own_decoder(tmp_path, monkeypatch)
    folder = make_image_folder(tmp_path / "images", train_per_class=2, test_per_class=0)
    paths = sorted(str(p) for p in (folder / "train").glob("*/*"))

    # When it labels files
    got = np.stack([p.probabilities for p in stream_predictions(classifier, paths, 4)])

    # Then each file was decoded as the model's decoder does it, not as this version does
    def probabilities(decoded):
        images = np.stack([decoded(tf.io.read_file(p)).numpy() for p in paths]).astype(np.float32)
        return softmax(model(images).numpy())

    np.testing.assert_allclose(got, probabilities(classifier.decode), atol=1e-5)
    theirs = probabilities(lambda contents: decode_image(contents, (8, 8)))
    assert not np.allclose(got, theirs, atol=1e-3)


def test_bad_input_gives_one_line_errors_before_tensorflow_loads(trained, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    text = tmp_path / "readme.txt"
    text.write_text("hello")
    image = str(next((trained.folder / "test").rglob("*.jpg")))
    cases = {
        # wrong scheme: named
        ("model_uri=run:/abc/model", f"inputs={image}"): "unknown scheme 'run:'",
        (f"model_uri=runs:/{'0' * 32}/model", f"inputs={image}"): "not found",
        ("model_uri=models:/no-such-model/1", f"inputs={image}"): "no-such-model",
        ("model_uri=/no/such/folder", f"inputs={image}"): "no such folder",
        (f"model_uri=runs:/{trained.run_id}/model", f"inputs={empty}"): "no files",
        (f"model_uri=runs:/{trained.run_id}/model", f"inputs={text}"): "not an image file",
        (f"model_uri=runs:/{trained.run_id}/model", "inputs=/no/such/dir"): "file not found",
        (f"inputs={image}",): "no value for model_uri",
        (f"model_uri=runs:/{trained.run_id}/model", f"inputs={image}", "top_k=0"): "top_k=0",
    }
    for args, message in cases.items():
        done = cli("insect_exp.predict", *args, cwd=trained.root)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert lines[-1].startswith("insect_exp.predict: error: "), (args, lines)
        assert message in lines[-1], (args, lines[-1])
        assert "Traceback" not in done.stderr and done.stdout == ""
        assert "tensorflow" not in done.stderr.lower(), (args, done.stderr[-2000:])


def test_no_store_where_the_uri_needs_one_is_named_and_not_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UserError, match="no MLflow store at"):
        run(PredictConfig(model_uri="runs:/abc/model", inputs=str(tmp_path)))
    assert not (tmp_path / "mlruns").exists()


def test_list_inputs_uses_trainings_rules(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.JPG").write_bytes(b"\xff\xd8 data")
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"\xff\xd8")
    (tmp_path / "b.tiff").write_bytes(b"II*\x00")
    paths, skipped = list_inputs(str(tmp_path))
    assert paths == [str(tmp_path / "a" / "x.JPG")]
    assert dict(skipped) == {
        str(tmp_path / "a" / "empty.png"): "empty file",
        str(tmp_path / "b.tiff"): "unsupported format (tiff)",
    }


def test_progress_reports_on_long_inputs_only(monkeypatch):
    # Given a clock that moves 3 s at each reading (past the quiet first seconds), and no terminal
    ticks = itertools.count(100.0, 3.0)
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(ticks))
    out, quiet = io.StringIO(), io.StringIO()

    # When 5000 images and 10 images are labelled, one of each skipped
    for total, stream in ((5000, out), (10, quiet)):
        shown = progress_for(total, None, stream=stream)
        shown.update(0, skipped=1)
        shown.update(99 if total > 10 else 9)
        shown.close()

    # Then the long input reports on stderr, counting the skipped image, and the short one does not
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("predict: 1/5000 images, 1 skipped")
    assert lines[-1].startswith("predict: 100/5000 images, 1 skipped") and "took" in lines[-1]
    assert quiet.getvalue() == ""
