"""Training a classifier on in-memory splits: optimizer, loss, schedule, early stopping, fit."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
import tf_keras as keras

from insect_exp import ema, notebook_bars, progress, resilience
from insect_exp.callbacks import (
    BatchStats,
    EpochEnd,
    LearningRateLog,
    MetricSink,
    Position,
    Validation,
)
from insect_exp.config import (
    AugmentConfig,
    ClassWeight,
    Config,
    EarlyStoppingConfig,
    EmaConfig,
    OptimizerConfig,
    Schedule,
    Task,
)
from insect_exp.data import mixing, policies
from insect_exp.data.mixing import Mixing
from insect_exp.data.pipeline import ImageSplit, make_dataset, read_images, without_autotuning
from insect_exp.resilience import CheckpointState, TrainingDiverged


@dataclass(frozen=True)
class FitSettings:
    """Everything about training that is not the model: the typed config nodes fit needs."""

    epochs: int
    batch_size: int
    seed: int
    optimizer: OptimizerConfig
    shuffle_buffer: int | None = None
    label_smoothing: float = 0.0
    class_weight: ClassWeight = ClassWeight.none
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    # Where each epoch's checkpoint goes (None: no checkpoints), and the one to resume from.
    checkpoint_dir: str | None = None
    resume_from: CheckpointState | None = None
    # multi_worker: how long the other workers wait for the chief's frozen features.
    worker_timeout_s: float = 600.0
    mixing: Mixing = field(default_factory=Mixing)
    # task=multilabel: the probability threshold of its metrics (None: one label per image).
    multilabel_threshold: float | None = None
    # The augmentation policy and random erasing of the training batches (model.augment).
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        checkpoint_dir: str | None = None,
        resume_from: CheckpointState | None = None,
    ) -> FitSettings:
        return cls(
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            optimizer=cfg.optimizer,
            shuffle_buffer=cfg.dataset.shuffle_buffer,
            label_smoothing=cfg.loss.label_smoothing,
            class_weight=cfg.dataset.class_weight,
            early_stopping=cfg.train.early_stopping,
            ema=cfg.train.ema,
            checkpoint_dir=checkpoint_dir,
            resume_from=resume_from,
            worker_timeout_s=cfg.train.worker_timeout_s,
            mixing=Mixing.from_config(cfg.train),
            multilabel_threshold=cfg.threshold if cfg.task is Task.multilabel else None,
            augment=cfg.model.augment,
        )


@dataclass
class History:
    """Per-epoch metrics (loss, accuracy, val_*, lr) and per-batch training stats."""

    epochs: dict[str, list[float]] = field(default_factory=dict)
    batch_loss: list[float] = field(default_factory=list)
    batch_accuracy: list[float] = field(default_factory=list)
    # Early stopping: the epoch training stopped after (None: ran every epoch) and the best one.
    stopped_epoch: int | None = None
    best_epoch: int | None = None

    def extend(self, other: History) -> None:
        for key, values in other.epochs.items():
            self.epochs.setdefault(key, []).extend(values)
        self.batch_loss += other.batch_loss
        self.batch_accuracy += other.batch_accuracy
        self.stopped_epoch = other.stopped_epoch
        self.best_epoch = other.best_epoch if other.best_epoch is not None else self.best_epoch

    @property
    def num_epochs(self) -> int:
        return len(self.epochs.get("loss", []))


@dataclass
class Fitted:
    """What one call of `fit` leaves: its history, and the final model's validation logits."""

    history: History
    # None when the final weights are not those the last validation saw (best weights restored).
    val_logits: np.ndarray | None


def make_optimizer(
    cfg: OptimizerConfig, learning_rate: float | None = None
) -> keras.optimizers.Optimizer:
    """The Keras optimizer a config node names, with its options (or another learning rate)."""
    optimizer_class = getattr(keras.optimizers, cfg.keras_class)
    rate = cfg.learning_rate if learning_rate is None else learning_rate
    clipping = {} if cfg.clipnorm is None else {"clipnorm": cfg.clipnorm}
    optimizer = optimizer_class(learning_rate=rate, **cfg.options(), **clipping)
    # On the instance: tf_keras's optimizers refuse a gradient_aggregator argument (the legacy
    # ones' only), Model.fit's train step passes no skip_gradients_aggregation, and a subclass
    # per configured class would change the class a saved model's optimizer config names.
    optimizer.aggregate_gradients = functools.partial(_aggregate_gradients, optimizer)
    return optimizer


def _aggregate_gradients(optimizer: keras.optimizers.Optimizer, grads_and_vars: list) -> list:
    """The optimizer's gradient aggregation (Keras's documented override point), none where a
    single replica trains: the sum over one replica is its gradients. Keras's own wraps them in
    a `tf.custom_gradient` (ReplicaContext.all_reduce), which, traced into the train function,
    registers a gradient in TensorFlow's global registry that keeps the whole traced graph alive
    for the life of the process: repeated training in one process (a notebook) grows by it."""
    if tf.distribute.get_strategy().num_replicas_in_sync == 1:
        return list(grads_and_vars)
    return type(optimizer).aggregate_gradients(optimizer, grads_and_vars)


def soft_targets(y_true: tf.Tensor, y_pred: tf.Tensor) -> bool:
    """True for targets of one share per class (mixed batches), False for integer labels."""
    classes = y_pred.shape[-1]
    return y_true.shape.rank == 2 and classes is not None and y_true.shape[-1] == classes > 1


def accuracy(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Per image: 1 if the highest logit is the label's; for soft targets, their largest share's."""
    if soft_targets(y_true, y_pred):
        return keras.metrics.categorical_accuracy(y_true, y_pred)
    return keras.metrics.sparse_categorical_accuracy(y_true, y_pred)


class Crossentropy(keras.losses.Loss):
    """Cross-entropy on logits against integer labels or soft targets, label-smoothed if asked,
    checked finite.

    tf_keras's sparse cross-entropy has no label_smoothing; its categorical one does: targets
    become (1 - s) * targets + s / num_classes (mixed targets: the mix of the smoothed one-hots).
    The finiteness check is an op in the training step itself, so a NaN stops training in the
    very batch it appears in, without the per-batch host sync a callback reading the loss would
    cost.
    """

    def __init__(self, label_smoothing: float = 0.0, name: str = "crossentropy"):
        super().__init__(name=name)
        self.label_smoothing = label_smoothing

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        if soft_targets(y_true, y_pred):
            loss = keras.losses.categorical_crossentropy(
                tf.cast(y_true, y_pred.dtype),
                y_pred,
                from_logits=True,
                label_smoothing=self.label_smoothing,
            )
        elif self.label_smoothing > 0:
            labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
            one_hot = tf.one_hot(labels, tf.shape(y_pred)[-1], dtype=y_pred.dtype)
            loss = keras.losses.categorical_crossentropy(
                one_hot, y_pred, from_logits=True, label_smoothing=self.label_smoothing
            )
        else:
            loss = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        return tf.debugging.check_numerics(loss, "non-finite loss")


def compile_classifier(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    label_smoothing: float = 0.0,
    multilabel_threshold: float | None = None,
) -> None:
    """Cross-entropy on logits (label-smoothed if asked) and accuracy: the training objective.

    Integer labels or soft targets alike (`accuracy`: against a soft target's largest share);
    with a multilabel_threshold, sigmoid cross-entropy and its metrics (multilabel/training.py).
    """
    if multilabel_threshold is not None:
        from insect_exp.multilabel.training import compile_multilabel

        compile_multilabel(model, optimizer, label_smoothing, multilabel_threshold)
        return
    model.compile(
        optimizer=optimizer,
        loss=Crossentropy(label_smoothing),
        metrics=[keras.metrics.MeanMetricWrapper(accuracy, name="accuracy")],
    )
    # A batch's logs are metric results, already the same on every replica: take one. Keras's
    # default sums them across the workers of a MultiWorkerMirroredStrategy (2x on two workers).
    model.distribute_reduction_method = "first"


def class_weights(labels: np.ndarray, num_classes: int, mode: ClassWeight) -> dict[int, float]:
    """Loss weight per class; balanced: n / (n_classes * n_c), so every class weighs the same."""
    if mode is ClassWeight.none:
        return {}
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1))
    return {c: float(w) for c, w in enumerate(weights)}


def epoch_learning_rate(cfg: OptimizerConfig, epochs: int) -> Callable[[int], float] | None:
    """The learning rate of each epoch (0-based) for per-epoch schedules; None otherwise."""
    base, floor = cfg.learning_rate, cfg.min_learning_rate
    if cfg.schedule is Schedule.cosine:
        warmup = min(cfg.warmup_epochs, epochs - 1)

        def cosine(epoch: int) -> float:
            if epoch < warmup:
                return base * (epoch + 1) / (warmup + 1)
            # The last epoch trains at the floor.
            progress = (epoch - warmup) / max(1, epochs - warmup - 1)
            return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * progress))

        return cosine
    if cfg.schedule is Schedule.step:
        return lambda epoch: max(floor, base * cfg.decay_factor ** (epoch // cfg.decay_epochs))
    return None


def _schedule_callbacks(cfg: OptimizerConfig, epochs: int) -> list[keras.callbacks.Callback]:
    if cfg.schedule is Schedule.reduce_on_plateau:
        return [
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss",
                factor=cfg.decay_factor,
                patience=cfg.plateau_patience,
                min_lr=cfg.min_learning_rate,
            )
        ]
    rate = epoch_learning_rate(cfg, epochs)
    if rate is None:
        return []
    return [keras.callbacks.LearningRateScheduler(lambda epoch, _lr: rate(epoch))]


@dataclass(frozen=True)
class BatchEdits:
    """What changes training batches, and only them: model.augment's policy and random erasing,
    and mixup/cutmix (which needs the number of classes for its soft targets)."""

    augment: AugmentConfig | None = None
    mixing: Mixing | None = None
    num_classes: int = 0

    @property
    def augments(self) -> bool:
        return self.augment is not None and self.augment.on_batches

    @property
    def mixes(self) -> bool:
        return self.mixing is not None and self.mixing.enabled

    def apply(
        self, batch: tuple[tf.Tensor, tf.Tensor], seed: int, epoch: tf.Tensor, index: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Batch `index` of `epoch` edited, each edit with its own key of (seed, epoch, index)."""
        images, labels = batch
        if self.augments:
            assert self.augment is not None
            key = policies.batch_key(seed, epoch, index)
            images = policies.augment_images(images, key, self.augment)
        if self.mixes:
            assert self.mixing is not None
            stop = self.mixing.stop_epoch
            active = True if stop is None else epoch < stop
            key = mixing.batch_key(seed, epoch, index)
            return mixing.mix_batch(images, labels, self.num_classes, self.mixing, key, active)
        return images, labels


def train_batches(
    split: ImageSplit,
    batch_size: int,
    seed: int,
    first_epoch: int = 0,
    shuffle_buffer: int | None = None,
    edits: BatchEdits | None = None,
) -> tf.data.Dataset:
    """Endless training batches, epoch after epoch from first_epoch, each epoch in its own order.

    Epoch e's order is a pure function of (seed, e), so a run resumed at epoch e sees the batches
    an uninterrupted run would have. With shuffle_buffer set, a windowed shuffle seeded the same
    way replaces the exact permutation (for splits streamed from disk). `edits` change training
    batches: an augmentation policy and random erasing (data/policies.py), then mixing
    (data/mixing.py; soft targets of num_classes floats an image), drawn from (seed, epoch, batch).
    """
    # Images are read per batch (from memory or the disk cache), never copied into a tf.constant.
    labels = tf.constant(split.labels)
    count = len(split)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
        if shuffle_buffer:
            # fold_in gives int32 halves; the shuffle's seed is an int64.
            shuffle_seed = tf.random.experimental.stateless_fold_in(epoch_seed, 0)[0]
            order = tf.data.Dataset.range(count).shuffle(
                shuffle_buffer, seed=tf.cast(shuffle_seed, tf.int64)
            )
        else:
            permutation = tf.random.experimental.stateless_shuffle(
                tf.range(count, dtype=tf.int64), seed=epoch_seed
            )
            order = tf.data.Dataset.from_tensor_slices(permutation)
        return order.batch(batch_size)

    batches = tf.data.Dataset.range(first_epoch, 2**62).flat_map(one_epoch)
    batches = batches.map(
        lambda index: (read_images(split.images, index), tf.gather(labels, index)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    steps = -(-count // batch_size)
    if edits is not None and (edits.augments or edits.mixes):
        # Step s of the endless stream is batch s % steps of epoch s // steps.
        counted = batches.enumerate(start=first_epoch * steps)
        batches = counted.map(
            lambda step, batch: edits.apply(batch, seed, step // steps, step % steps),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return without_autotuning(batches.prefetch(tf.data.AUTOTUNE))


class CallbackCounters(keras.callbacks.Callback):
    """Carries early stopping's and plateau decay's counters across an interruption.

    Keras resets both when fit starts: a resumed run would wait `patience` epochs anew and forget
    its best epoch. Their counters go into every checkpoint (`snapshot`); on resume they are set
    back in on_train_begin, which runs after theirs (this callback comes after them), and early
    stopping gets the best epoch's weights back from the best checkpoint.
    """

    FIELDS = {
        "early_stopping": ("wait", "best", "best_epoch"),
        "plateau": ("wait", "best", "cooldown_counter"),
    }

    def __init__(
        self,
        callbacks: dict[str, keras.callbacks.Callback],
        saved: dict | None = None,
        best_weights: Callable[[], list[np.ndarray] | None] | None = None,
    ):
        super().__init__()
        self.callbacks = callbacks
        self.saved = saved or {}
        self.best_weights = best_weights

    def snapshot(self) -> dict:
        return {
            name: {key: float(getattr(cb, key)) for key in self.FIELDS[name]}
            for name, cb in self.callbacks.items()
        }

    def on_train_begin(self, logs: dict | None = None) -> None:
        for name, cb in self.callbacks.items():
            for key, value in self.saved.get(name, {}).items():
                setattr(cb, key, int(value) if key != "best" else value)
        stopper = self.callbacks.get("early_stopping")
        if stopper is not None and self.saved and stopper.restore_best_weights:
            stopper.best_weights = self.best_weights() if self.best_weights else None


@dataclass(frozen=True)
class Stage:
    """One stage of a training: what `fit` takes beyond the settings.

    A later stage (fine-tuning) numbers its epochs on from the first stage's, shuffles with a seed
    of its own and trains without the learning-rate schedule and early stopping.
    """

    # Names the stage in its checkpoints: a checkpoint of the same stage is resumed.
    name: str = "main"
    epochs: int | None = None  # epochs of this stage (None: settings.epochs)
    first_epoch: int = 0  # the step the stage's first epoch is logged at
    seed: int | None = None  # the shuffle seed (None: settings.seed)
    schedule: bool = True  # the configured learning-rate schedule and early stopping apply


@dataclass
class _Watched:
    """fit's callbacks, in order, and those whose state fit reads afterwards."""

    callbacks: list[keras.callbacks.Callback]
    position: Position
    validation: Validation
    stats: BatchStats
    stopper: keras.callbacks.EarlyStopping | None


def fit(
    model: keras.Model,
    train_split: ImageSplit,
    val_split: ImageSplit,
    settings: FitSettings,
    sink: MetricSink | None = None,
    stage: Stage = Stage(),
    verbose: int | str = "auto",
) -> Fitted:
    """Train a compiled classifier on decoded splits; each epoch's metrics go to `sink` at once.

    `verbose` is Keras's; auto: its bar on a terminal, one line per epoch in a file or pipe.

    Raises:
        TrainingDiverged: the loss became NaN or infinite (training stops in that batch).
    """
    epochs = settings.epochs if stage.epochs is None else stage.epochs
    first = stage.first_epoch
    resume = settings.resume_from
    done = 0  # epochs of this stage a checkpoint already holds
    if resume is not None and resume.stage == stage.name:
        resilience.restore(model, model.optimizer, resume)
        done = min(epochs, resume.epoch + 1 - first)
    seed = settings.seed if stage.seed is None else stage.seed
    num_classes = int(model.output_shape[-1])
    train_ds = _training_data(train_split, settings, seed, first + done, num_classes)
    watched = _callbacks(model, len(train_split), val_split, settings, sink, stage, epochs)
    weights = class_weights(train_split.labels, num_classes, settings.class_weight)
    steps = -(-len(train_split) // settings.batch_size)
    # In a notebook: tqdm's bars instead of Keras's, whose redraws stay there as text.
    bars = notebook_bars.bars(epochs, steps, done) if verbose == "auto" else []
    try:
        fitted = model.fit(
            train_ds,
            epochs=epochs,
            initial_epoch=done,
            steps_per_epoch=steps,
            callbacks=[*watched.callbacks, *bars],
            class_weight=weights or None,
            verbose=0 if bars else progress.keras_verbosity() if verbose == "auto" else verbose,
        )
    except tf.errors.InvalidArgumentError as err:
        if "non-finite loss" not in str(err):
            raise
        watched.stats.flush()  # the batches of this epoch before the NaN one
        # Counted as Keras prints them (`Epoch 1/5`), as every message of a run counts epochs.
        position = watched.position
        raise TrainingDiverged(
            f"loss became NaN or infinite at epoch {position.epoch + 1} of {first + epochs}, "
            f"batch {position.batch + 1}"
        ) from None
    except KeyboardInterrupt:
        watched.stats.flush()  # keep the batches seen in the interrupted epoch
        raise
    return _fitted(fitted.history, watched, settings, first, done)


def _training_data(
    split: ImageSplit, settings: FitSettings, seed: int, first_epoch: int, num_classes: int
) -> tf.data.Dataset:
    """train_batches as fit trains on them: every worker builds the same batches, and each takes
    its share of every batch, not of files."""
    batches = train_batches(
        split,
        settings.batch_size,
        seed,
        first_epoch,
        settings.shuffle_buffer,
        BatchEdits(settings.augment, settings.mixing, num_classes),
    )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return batches.with_options(options)


def _callbacks(
    model: keras.Model,
    train_size: int,
    val_split: ImageSplit,
    settings: FitSettings,
    sink: MetricSink | None,
    stage: Stage,
    epochs: int,
) -> _Watched:
    """fit's callbacks. Order matters: validation adds val_* to the epoch logs before anything
    reads them, and the learning rate is read after the schedule set it."""
    first = stage.first_epoch
    position = Position(first)
    scorer = None
    if settings.multilabel_threshold is not None:
        from insect_exp.multilabel import scores

        scorer = functools.partial(
            scores.scores,
            threshold=settings.multilabel_threshold,
            smoothing=settings.label_smoothing,
        )
    validation = Validation(
        make_dataset(val_split, settings.batch_size),
        val_split.labels,
        settings.label_smoothing,
        scorer,
    )
    stats = BatchStats(settings.batch_size, train_size, sink, first)
    callbacks = [position, validation, stats, resilience.interrupt_callback()]
    counted: dict[str, keras.callbacks.Callback] = {}
    stopper = None
    if stage.schedule:
        scheduling = _schedule_callbacks(settings.optimizer, epochs)
        for cb in scheduling:
            if isinstance(cb, keras.callbacks.ReduceLROnPlateau):
                counted["plateau"] = cb
        callbacks += scheduling
        stopper = _early_stopping(settings.early_stopping)
        if stopper is not None:
            callbacks.append(stopper)
            counted["early_stopping"] = stopper
    resume = settings.resume_from
    saved = resume.callbacks if resume is not None and resume.stage == stage.name else None
    counters = CallbackCounters(counted, saved, lambda: _best_weights(model, settings, stage.name))
    checkpoint = _checkpointer(settings, stage, epochs, stopper is not None, counters.snapshot)
    callbacks += [LearningRateLog(), counters, EpochEnd(sink, first, checkpoint)]
    average = _weight_average(model, settings, stage, epochs * stats.steps_per_epoch)
    if average is not None:
        # Before validation and early stopping; out again once the epoch is checkpointed.
        raw = Validation(validation.images, validation.labels, validation.label_smoothing)
        callbacks.insert(1, ema.AverageIn(average, raw))
        callbacks.append(ema.AverageOut(average))
        if checkpoint is not None:
            checkpoint.objects[ema.CHECKPOINT_KEY] = average.state
    return _Watched(callbacks, position, validation, stats, stopper)


def _weight_average(
    model: keras.Model, settings: FitSettings, stage: Stage, steps: int
) -> ema.WeightAverage | None:
    """With train.ema, the average of the weights over the stage's `steps` (gone on from a
    checkpoint of this stage)."""
    if not settings.ema.enabled:
        return None
    ema.warn_if_short(settings.ema.decay, steps)
    average = ema.WeightAverage(model, settings.ema.decay)
    resume = settings.resume_from
    if resume is not None and resume.stage == stage.name:
        average.restore(resume.path)
    return average


def _early_stopping(es: EarlyStoppingConfig) -> keras.callbacks.EarlyStopping | None:
    if not es.enabled:
        return None
    return keras.callbacks.EarlyStopping(
        monitor=es.monitor.value,
        mode=es.monitor.mode,
        patience=es.patience,
        restore_best_weights=es.restore_best,
    )


def _checkpointer(
    settings: FitSettings,
    stage: Stage,
    epochs: int,
    stopping: bool,
    snapshot: Callable[[], dict],
) -> resilience.Checkpointer | None:
    """Each epoch's checkpoint, and the best one by early stopping's measure (else val_loss)."""
    if not settings.checkpoint_dir:
        return None
    es = settings.early_stopping
    monitor, mode = (es.monitor.value, es.monitor.mode) if stopping else ("val_loss", "min")
    first = stage.first_epoch
    return resilience.Checkpointer(
        settings.checkpoint_dir, stage.name, first, monitor, mode, snapshot, epochs=first + epochs
    )


def _fitted(
    logged: dict[str, list], watched: _Watched, settings: FitSettings, first: int, done: int
) -> Fitted:
    """What the training left: its history, early stopping's epochs, the last validation logits."""
    stats = watched.stats
    history = History(
        {k: [float(v) for v in vs] for k, vs in logged.items()}, stats.losses, stats.accuracies
    )
    val_logits = watched.validation.logits
    stopper = watched.stopper
    if stopper is not None:
        # Keras numbers epochs from 0 in this call, resumed ones included.
        history.best_epoch = first + stopper.best_epoch
        if stopper.stopped_epoch > 0:
            history.stopped_epoch = first + stopper.stopped_epoch
        last = done + history.num_epochs - 1
        if settings.early_stopping.restore_best and stopper.best_epoch != last:
            val_logits = None  # the model now holds an earlier epoch's weights
    return Fitted(history, val_logits)


def _best_weights(model: keras.Model, settings: FitSettings, stage: str) -> list[np.ndarray] | None:
    """The weights of the best checkpoint of this stage (None if there is none), model unchanged."""
    if not settings.checkpoint_dir:
        return None
    best = resilience.read_state(settings.checkpoint_dir, "best")
    if best is None or best.stage != stage:
        return None
    current = model.get_weights()
    tf.train.Checkpoint(model=model).read(best.path).expect_partial()
    weights = model.get_weights()
    model.set_weights(current)
    return weights


def predict_logits(model: keras.Model, split: ImageSplit, batch_size: int) -> np.ndarray:
    """Logits for every image of a split, in order."""
    return model.predict(make_dataset(split, batch_size), verbose=0)
