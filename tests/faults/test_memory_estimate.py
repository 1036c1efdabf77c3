"""A model whose training cannot fit the machine's memory is refused before a run opens."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tests.faults.conftest import run


@pytest.mark.parametrize("model", ["hub_mobilenet", "keras_app"])
def test_a_pretrained_backbone_too_big_for_the_memory_is_refused_before_its_weights(
    tmp_path, folder, store, model
):
    # Given a pretrained backbone asked for 200000x200000 images (a float32 batch of 4 of them
    # alone is 1.9 TB)
    size = "model.image_size=[200000,200000]"

    # When it is run
    code, stderr, _ = run(f"dataset.root={folder}", f"model={model}", size, cwd=tmp_path)

    # Then it stops at once with one line naming the size and the key to change, before its
    # weights are looked for (keras_app's imagenet weights would be a download)
    assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"insect_exp: error: model {model} at model.image_size=[200000, 200000] needs at least "
    ), line
    assert "GB to train (batches of 4)" in line and "lower model.image_size" in line, line
    # And no run was opened for it
    experiment = MlflowClient(store).get_experiment_by_name("insect_exp")
    assert experiment is None or MlflowClient(store).search_runs([experiment.experiment_id]) == []
