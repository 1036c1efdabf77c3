"""Per-batch statistics match what each batch on its own would report."""

import numpy as np
import tensorflow as tf
import tf_keras as keras

from insect_exp.callbacks import BatchStats, EpochMetrics
from insect_exp.models.common import compile_classifier


def test_batch_stats_recover_each_batchs_own_loss_and_accuracy():
    # Given a model that does not change while fitting (learning rate 0) and 10 samples in
    # batches of 4, so the last batch is short
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 5)).astype("float32")
    y = rng.integers(0, 3, 10).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    compile_classifier(model, keras.optimizers.SGD(learning_rate=0.0))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    stats = BatchStats(batch_size=4, num_samples=10)
    epochs = []

    # When it fits for two epochs
    model.fit(
        ds,
        epochs=2,
        verbose=0,
        callbacks=[stats, EpochMetrics(lambda m, step: epochs.append((step, m)))],
    )

    # Then every batch's value equals that batch evaluated on its own
    expected_loss, expected_acc = [], []
    for bx, by in ds:
        loss, acc = model.evaluate(bx, by, verbose=0)
        expected_loss.append(loss)
        expected_acc.append(acc)
    np.testing.assert_allclose(stats.losses, expected_loss * 2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats.accuracies, expected_acc * 2, atol=1e-5)
    # And each epoch's metrics reach the sink once, at step = epoch index
    assert [step for step, _ in epochs] == [0, 1]
    assert set(epochs[0][1]) == {"loss", "accuracy"}
