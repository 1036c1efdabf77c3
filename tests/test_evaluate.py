"""python -m insect_exp.evaluate: a logged model on a labelled folder, as a new, linked run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from insect_exp import UserError, evaluate
from insect_exp.config import EvaluateConfig, EvaluateMlflowConfig, FolderDatasetConfig
from insect_exp.evaluate import per_class
from tests.conftest import artifact_paths, make_image_folder
from tests.lifecycle import Trained, classifier_with_its_own_decoder, cli, train_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("evaluate")
    return train_run(root, "mlflow.registered_model_name=insects", test_per_class=5)


def _config(trained: Trained, model_uri: str, root, **kwargs) -> EvaluateConfig:
    return EvaluateConfig(
        model_uri=model_uri,
        dataset=FolderDatasetConfig(root=str(root)),
        mlflow=EvaluateMlflowConfig(tracking_uri=trained.tracking_uri),
        **kwargs,
    )


def test_evaluating_a_runs_model_on_its_test_split_reproduces_its_test_accuracy(trained):
    # When the run's model is evaluated on the run's own test split
    accuracy = evaluate.run(_config(trained, f"runs:/{trained.run_id}/model", trained.folder))

    # Then a new FINISHED run holds the same test accuracy (and loss), the per-class scores,
    # the tables and plots, and the two runs point at each other
    client = trained.client
    source = client.get_run(trained.run_id)
    (tag,) = [k for k in source.data.tags if k.startswith("evaluation.")]
    run = client.get_run(tag.removeprefix("evaluation."))
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == source.info.experiment_id
    assert run.data.tags["source_run_id"] == trained.run_id
    assert run.data.tags["source_model_id"] == trained.model_id
    metrics = run.data.metrics
    assert metrics["test_accuracy"] == pytest.approx(source.data.metrics["test_accuracy"], abs=2e-3)
    assert metrics["test_loss"] == pytest.approx(source.data.metrics["test_loss"], rel=1e-3)
    assert accuracy == pytest.approx(metrics["test_accuracy"])
    for name in trained.class_names:
        for key in ("precision", "recall", "f1"):
            assert 0 <= metrics[f"{key}_{name}"] <= 1
    f1 = [metrics[f"f1_{name}"] for name in trained.class_names]
    assert metrics["macro_f1"] == pytest.approx(np.mean(f1))
    artifacts = artifact_paths(client, run.info.run_id)
    assert {"predictions.tsv", "per_class.tsv", "confusion_matrix.json"} <= artifacts
    assert "plots/confusion_matrix.png" in artifacts
    assert ("plots/misclassified.png" in artifacts) == (metrics["test_accuracy"] < 1)
    local = client.download_artifacts(run.info.run_id, "predictions.tsv", str(trained.root))
    rows = [line.split("\t") for line in Path(local).read_text().splitlines()[1:]]
    assert {r[0]: r[2] for r in rows} == trained.predictions_tsv()
    # the logged model lists the evaluation's metrics
    model = client.get_logged_model(trained.model_id)
    assert {m.key for m in model.metrics or []} >= {"test_accuracy", "macro_f1"}


def test_a_registered_model_on_a_bare_class_folder(trained, tmp_path):
    # Given a folder of <class>/* without train/ or test/, and the model by registry name
    bare = tmp_path / "bare"
    shutil.copytree(trained.folder / "test", bare)
    (bare / "beetles" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")

    # When it is evaluated
    evaluate.run(_config(trained, "models:/insects/latest", bare))

    # Then the broken file is skipped and reported, the rest scored
    client = trained.client
    runs = client.search_runs(
        [client.get_run(trained.run_id).info.experiment_id],
        filter_string="tags.`insect_exp.job` = 'evaluate'",
        order_by=["attributes.start_time DESC"],
    )
    run = runs[0]
    assert run.data.params["folder"] == str(bare)
    assert run.data.metrics["images"] == 15 and run.data.metrics["skipped_files"] == 1
    assert "dataset/skipped.tsv" in artifact_paths(client, run.info.run_id)


def test_classes_that_differ_stop_it_before_any_decoding(trained, tmp_path, monkeypatch):
    # Given a test split with one class folder renamed
    root = tmp_path / "other"
    shutil.copytree(trained.folder, root)
    (root / "test" / "beetles").rename(root / "test" / "ants")
    import insect_exp.data.pipeline as pipeline

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded")

    monkeypatch.setattr(pipeline, "decode_files", no_decoding)
    experiment = trained.client.get_run(trained.run_id).info.experiment_id
    before = len(trained.client.search_runs([experiment]))

    # Then it stops with one line naming both class lists, and opens no run
    message = r"\(ants, cockroach, dragonflies\) differ from the model's"
    with pytest.raises(UserError, match=message):
        evaluate.run(_config(trained, f"models:/{trained.model_id}", root))
    assert len(trained.client.search_runs([experiment])) == before


def test_files_are_decoded_by_the_models_own_decoder_not_this_versions(tmp_path, monkeypatch):
    import tensorflow as tf

    from insect_exp.data.decode import decode_image
    from insect_exp.data.scan import FileList
    from insect_exp.predict import ModelRef

    # Given a model whose SavedModel decodes files otherwise than this version does
    classifier, _ = classifier_with_its_own_decoder(tmp_path, monkeypatch)
    monkeypatch.setattr(evaluate, "load_classifier", lambda ref: classifier)
    folder = make_image_folder(tmp_path / "images", train_per_class=2, test_per_class=0)
    paths = sorted(str(p) for p in (folder / "train").glob("*/*"))
    files = FileList(paths, [i % 3 for i in range(len(paths))])
    ref = ModelRef("unused", ["a", "b", "c"], (8, 8), None, None)

    # When it is evaluated on them
    cfg = EvaluateConfig(model_uri="unused", dataset=FolderDatasetConfig(root=str(folder)))
    split = evaluate.evaluate_files(cfg, ref, files, []).split

    # Then it saw each file as its own decoder gives it, not as this version's does
    for path, image in zip(split.paths, split.images, strict=True):
        contents = tf.io.read_file(path)
        np.testing.assert_array_equal(image, classifier.decode(contents).numpy())
        assert not np.array_equal(image, decode_image(contents, (8, 8)).numpy())


def test_evaluate_cli(trained):
    done = cli(
        "insect_exp.evaluate", f"model_uri=runs:/{trained.run_id}/model", "dataset=insects",
        f"dataset.root={trained.folder}", cwd=trained.root,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test_accuracy" in done.stdout and "MLflow run id: " in done.stdout
    wrong = cli(
        "insect_exp.evaluate", f"model_uri=runs:/{trained.run_id}/model", "dataset=insects",
        f"dataset.root={trained.folder}", "split=val", cwd=trained.root,
    )  # fmt: skip
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines()[-1] == (
        f"insect_exp.evaluate: error: '{trained.folder}' has no val/ folder (it has train/, test/)"
    )


def test_per_class_scores():
    true = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 0, 2])
    found = per_class(true, predicted, 3)
    np.testing.assert_allclose(found["precision"], [0.5, 2 / 3, 1.0])
    np.testing.assert_allclose(found["recall"], [0.5, 1.0, 0.5])
    np.testing.assert_allclose(found["f1"], [0.5, 0.8, 2 / 3])
    assert found["support"].tolist() == [2, 2, 2]
    # a class never predicted nor present scores 0, not NaN
    assert per_class(np.array([0]), np.array([0]), 2)["f1"].tolist() == [1.0, 0.0]
