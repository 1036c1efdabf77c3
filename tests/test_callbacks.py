"""Per-batch statistics match what each batch on its own would report."""

import numpy as np
import tensorflow as tf
import tf_keras as keras

from insect_exp.callbacks import BatchStats, EpochEnd, Validation, scores
from insect_exp.fit import compile_classifier


def test_scores_give_top3_accuracy_only_beyond_three_classes():
    # Given the logits of 4 images over 5 classes: the true class ranks 1st, 3rd, 4th, and
    # tied 3rd with 4th (a tie at the boundary counts as in, as in Keras's top-k metric)
    logits = np.array(
        [[5, 1, 2, 3, 4], [5, 4, 3, 2, 1], [5, 4, 3, 2, 1], [5, 4, 3, 3, 0]], dtype=np.float64
    )
    labels = np.array([0, 2, 3, 3])

    # Then top-3 accuracy is 3/4, as Keras computes it; with 3 classes there is none
    found = scores(logits, labels)
    assert found["top3_accuracy"] == 0.75
    keras_top3 = keras.metrics.SparseTopKCategoricalAccuracy(k=3)
    keras_top3.update_state(labels, logits)
    assert found["top3_accuracy"] == float(keras_top3.result())
    assert "top3_accuracy" not in scores(logits[:, :3], np.array([0, 2, 1, 1]))


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
        callbacks=[stats, EpochEnd(lambda m, step: epochs.append((step, m)))],
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


def test_validation_reports_what_keras_validation_data_would_and_keeps_the_logits():
    # Given the same seeded model and data fitted with Keras's validation_data and with ours
    rng = np.random.default_rng(1)
    x = rng.normal(size=(24, 6)).astype("float32")
    y = rng.integers(0, 3, 24).astype("int32")
    val_x, val_y = x[:10] + 0.1, y[:10]

    def fitted(**fit_kwargs) -> tuple[keras.Model, dict]:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
        compile_classifier(model, keras.optimizers.Adam(0.05))
        train_ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        return model, model.fit(train_ds, epochs=3, verbose=0, **fit_kwargs).history

    val_ds = tf.data.Dataset.from_tensor_slices((val_x, val_y)).batch(4)
    _, expected = fitted(validation_data=val_ds)
    validation = Validation(val_ds.map(lambda images, _: images), val_y)
    model, got = fitted(callbacks=[validation])

    # Then every epoch's val_loss and val_accuracy match, and the final logits are kept
    for key in ("val_loss", "val_accuracy"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(validation.logits, model.predict(val_x, verbose=0), rtol=1e-6)
