"""Checkpoints, interrupts and what resume reads, in process (tests/faults runs real processes)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import tf_keras as keras

from insect_exp import UserError, fit, resilience
from insect_exp.config import AdamConfig
from insect_exp.data.pipeline import ImageSplit
from insect_exp.tracking.interface import unlogged_steps_only


def _split(n: int = 24, seed: int = 0) -> ImageSplit:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 3).astype(np.int32)
    images = rng.integers(0, 60, (n, 4, 4, 3)).astype(np.uint8)
    images[np.arange(n), :, :, labels] += 150  # learnable: one bright channel per class
    return ImageSplit(images, labels, [str(i) for i in range(n)])


def _model() -> keras.Model:
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
         keras.layers.Dense(3, dtype="float32")]
    )  # fmt: skip
    fit.compile_classifier(model, fit.make_optimizer(AdamConfig(learning_rate=0.05)))
    return model


def _settings(epochs: int, directory=None, resume=None) -> fit.FitSettings:
    return fit.FitSettings(
        epochs, 5, 11, AdamConfig(learning_rate=0.05), checkpoint_dir=directory, resume_from=resume
    )


def test_fit_checkpoints_every_epoch_keeping_the_latest_and_the_best(tmp_path):
    # When a model trains 3 epochs with a checkpoint dir
    fit.fit(_model(), _split(), _split(9, seed=1), _settings(3, tmp_path), verbose=0)

    # Then the latest checkpoint is of epoch 2, the best of the epoch with the lowest val_loss
    latest = resilience.read_state(tmp_path)
    best = resilience.read_state(tmp_path, "best")
    assert (latest.epoch, latest.stage, latest.stage_start) == (2, "main", 0)
    assert best is not None and best.val_loss <= latest.val_loss
    # And only those two are kept, each complete (variables and state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "latest"]


def test_a_half_written_checkpoint_is_never_read(tmp_path):
    # Given a complete checkpoint and the leftovers of a write that was cut short
    fit.fit(_model(), _split(), _split(9, seed=1), _settings(1, tmp_path), verbose=0)
    (tmp_path / ".latest-deadbeef").mkdir()
    (tmp_path / ".latest-deadbeef" / "ckpt.index").write_bytes(b"partial")

    # Then the complete one is what resume reads
    assert resilience.read_state(tmp_path).epoch == 0


def test_resuming_from_a_checkpoint_trains_as_if_never_interrupted(tmp_path):
    # Given one model trained 4 epochs straight, and another trained 2 then resumed to 4
    train, val = _split(), _split(9, seed=1)
    whole = _model()
    straight = fit.fit(whole, train, val, _settings(4), verbose=0)
    fit.fit(_model(), train, val, _settings(2, tmp_path), verbose=0)
    state = resilience.read_state(tmp_path)
    resumed_model = _model()
    resumed = fit.fit(resumed_model, train, val, _settings(4, tmp_path, state), verbose=0)

    # Then the resumed one trained only epochs 2 and 3, on the same batches, to the same weights
    assert resumed.history.num_epochs == 2
    assert resumed.history.epochs["val_loss"] == pytest.approx(
        straight.history.epochs["val_loss"][2:], abs=1e-6
    )
    for a, b in zip(whole.get_weights(), resumed_model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_each_checkpoint_holds_every_epochs_metrics_and_a_resume_sends_what_the_store_lacks(
    tmp_path,
):
    # Given a model trained 2 epochs, then resumed to 3 from its checkpoint
    train, val = _split(), _split(9, seed=1)
    sent: dict[int, dict] = {}

    def sink(metrics, step):
        if not any(k.startswith("batch_") for k in metrics):
            sent[step] = dict(metrics)

    fit.fit(_model(), train, val, _settings(2, tmp_path), sink, verbose=0)
    state = resilience.read_state(tmp_path)
    fit.fit(_model(), train, val, _settings(3, tmp_path, state), sink, verbose=0)

    # Then the last checkpoint holds each epoch's metrics as the sink got them, resumed or not
    final = resilience.read_state(tmp_path)
    assert {int(step): m for step, m in final.metrics.items()} == sent
    assert {"loss", "val_loss", "lr"} <= resilience.keys_of(final.metrics)

    # When a resumed run whose store holds epoch 0 only (its logging process died before it
    # stored epochs 1 and 2) replays the checkpoint
    stored = []
    last = {key: 0 for key in resilience.keys_of(final.metrics)}
    resilience.replay(final.metrics, unlogged_steps_only(lambda m, s: stored.append(s), last))

    # Then epochs 1 and 2 go to the store, in order, and epoch 0 not again
    assert stored == [1, 2]


def test_each_epoch_has_its_own_batch_order_fixed_by_seed_and_epoch():
    split = _split(12)
    first = [b[1].numpy().tolist() for b in fit.train_batches(split, 4, seed=1).take(6)]
    again = [b[1].numpy().tolist() for b in fit.train_batches(split, 4, seed=1).take(6)]
    from_epoch_1 = [b[1].numpy().tolist() for b in fit.train_batches(split, 4, 1, 1).take(3)]
    assert first == again  # the seed fixes it
    assert first[3:] == from_epoch_1  # epoch 1 is the same whether or not epoch 0 ran here
    assert first[:3] != first[3:]  # and it differs from epoch 0


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_raise_interrupted_with_the_shells_exit_code(signum, code):
    with pytest.raises(resilience.Interrupted) as raised, resilience.interrupts():
        os.kill(os.getpid(), signum)
        for _ in range(1000):  # the handler runs at the next bytecode
            pass
    assert raised.value.exit_code == code
    assert isinstance(raised.value, KeyboardInterrupt)  # unwinds like Ctrl-C through libraries


def test_a_signal_during_an_epochs_end_waits_until_metrics_and_checkpoint_are_done():
    with pytest.raises(resilience.Interrupted), resilience.interrupts():
        finished = []
        try:
            with resilience.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):
                    pass
                finished.append(True)  # the block completes despite the signal
        finally:
            assert finished == [True]


class _Swallowing:
    """An object whose finalizer gets the signal: Python prints and drops what a __del__ raises."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            pass


def test_an_interrupt_dropped_by_a_finalizer_stops_training_at_the_next_batch():
    # Given a SIGINT whose Interrupted was raised inside a finalizer, and so dropped by Python
    model = _model()
    batches: list[int] = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: batches.append(b))
    with pytest.raises(resilience.Interrupted), resilience.interrupts():
        _Swallowing()  # its refcount drops to 0 here: __del__ runs and its exception is dropped
        # When training starts with the interrupt check among its callbacks
        split = _split()
        model.fit(
            split.images, split.labels, batch_size=4, epochs=2, verbose=0,
            callbacks=[record, resilience.interrupt_callback()],
        )  # fmt: skip
    # Then the interrupt stops it at the end of the first batch
    assert batches == [0]


def test_a_resume_keeps_the_logged_overrides_and_only_lets_epochs_change():
    logged = ["dataset=insects", "dataset.root=/data", "epochs=2"]
    given = ["resume=abc", "epochs=5", "dataset=insects"]  # the same dataset: no change
    assert resilience.resume_overrides(logged, given) == ["dataset.root=/data", *given]
    with pytest.raises(UserError, match="only epochs may change, not optimizer=sgd"):
        resilience.resume_overrides(logged, ["resume=abc", "optimizer=sgd"])


def test_a_config_that_changed_since_the_run_is_refused():
    logged = {"epochs": "2", "model.dropout": "0.0", "data.num_train": "18"}
    resilience.check_same_config(logged, {"epochs": "4", "model.dropout": "0.0"})
    with pytest.raises(UserError, match=r"model.dropout \(was 0.0, now 0.5\)"):
        resilience.check_same_config(logged, {"epochs": "4", "model.dropout": "0.5"})


@pytest.mark.parametrize("schedule", ["early_stopping", "reduce_on_plateau"])
def test_a_resumed_run_keeps_early_stopping_and_plateau_counting_where_it_stopped(
    tmp_path, schedule
):
    # Given a validation split whose loss is best after epoch 0 and worse from then on (its
    # labels disagree with train's), watched by early stopping or plateau decay
    from insect_exp.config import EarlyStoppingConfig, Schedule

    train = _split()
    val = _split(9, seed=1)
    val.labels = (val.labels + 1) % 3
    optimizer = AdamConfig(learning_rate=0.05)
    stopping = EarlyStoppingConfig()
    if schedule == "early_stopping":
        stopping = EarlyStoppingConfig(enabled=True, patience=3, restore_best=True)
    else:
        optimizer = AdamConfig(
            learning_rate=0.05, schedule=Schedule.reduce_on_plateau, plateau_patience=2,
            decay_factor=0.5,
        )  # fmt: skip

    def settings(epochs, directory, resume=None):
        return fit.FitSettings(
            epochs, 5, 11, optimizer, early_stopping=stopping, checkpoint_dir=directory,
            resume_from=resume,
        )  # fmt: skip

    # When one model trains 6 epochs straight, and another 2 epochs then resumes to 6
    whole = _model()
    straight = fit.fit(whole, train, val, settings(6, tmp_path / "a"), verbose=0)
    fit.fit(_model(), train, val, settings(2, tmp_path / "b"), verbose=0)
    resumed_model = _model()
    state = resilience.read_state(tmp_path / "b")
    resumed = fit.fit(resumed_model, train, val, settings(6, tmp_path / "b", state), verbose=0)

    # Then the resumed one stops, decays and ends with the weights the straight one does
    assert resumed.history.stopped_epoch == straight.history.stopped_epoch
    assert resumed.history.best_epoch == straight.history.best_epoch
    assert resumed.history.epochs["lr"] == straight.history.epochs["lr"][2:]
    assert (
        resilience.read_state(tmp_path / "b").callbacks
        == resilience.read_state(tmp_path / "a").callbacks
    )
    for a, b in zip(whole.get_weights(), resumed_model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
