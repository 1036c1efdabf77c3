"""Config schema: dataclasses registered in Hydra's ConfigStore that the YAML files in conf/ extend.

The composed config becomes these typed objects once, at the entrypoint (`to_object`); every module
below takes them, never a DictConfig. A typo in a key or a value of the wrong type fails in Hydra;
a value out of its range fails in `__post_init__` with one line naming the key and the range. Both
happen before TensorFlow is imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, TypeVar, cast, overload

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from insect_exp import UserError

# Published TF Hub handles used by the reference post; an environment variable can point them at a
# local SavedModel, which also works in sweeps that mix in models without these keys.
MOBILENET_V2_FEATURES = "https://tfhub.dev/google/tf2-preview/mobilenet_v2/feature_vector/4"
MOBILENET_V2_CLASSIFIER = "https://tfhub.dev/google/tf2-preview/mobilenet_v2/classification/4"
IMAGENET_LABELS = "https://storage.googleapis.com/download.tensorflow.org/data/ImageNetLabels.txt"


class ConfigError(UserError, ValueError):
    """A config value outside its allowed range."""


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: must be {allowed}")


E = TypeVar("E", bound=Enum)
S = TypeVar("S")


def _enum(key: str, value: Any, kind: type[E]) -> E:
    """The enum member for value (a member or its name), as Hydra converts it from YAML."""
    if isinstance(value, kind):
        return value
    try:
        return kind[str(value)]
    except KeyError:
        allowed = ", ".join(m.name for m in kind)
        raise ConfigError(f"{key}={value!r} is not one of {allowed}") from None


def _positive_size(key: str, size: list[int]) -> None:
    valid = len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
    _require(valid, key, list(size), "two positive integers [height, width]")


class Precision(Enum):
    """Keras mixed-precision policies (https://keras.io/api/mixed_precision/policy/), or auto:
    mixed_bfloat16 where the device computes bf16 natively and a short check agrees with float32,
    else float32 (insect_exp/precision.py)."""

    auto = "auto"
    float32 = "float32"
    mixed_bfloat16 = "mixed_bfloat16"
    mixed_float16 = "mixed_float16"


class TTA(Enum):
    """Test-time augmentation: none, or flip (the mean of the probabilities of each image and its
    horizontal mirror image)."""

    none = "none"
    flip = "flip"


class AugmentPolicy(Enum):
    """Per-image augmentation of the training batches (insect_exp/data/policies.py): none,
    RandAugment (num_ops ops at one magnitude) or TrivialAugment (one op, random magnitude)."""

    none = "none"
    randaugment = "randaugment"
    trivialaugment = "trivialaugment"


class FeatureCache(Enum):
    """Where a frozen backbone's features are kept: auto picks memory or disk by size."""

    auto = "auto"
    memory = "memory"
    disk = "disk"
    off = "off"


class CacheMode(str, Enum):
    """Where decoded images are kept: auto picks memory or disk by their decoded size.

    Also the storage a run chose (memory or disk), which its params and logs give by name.
    """

    auto = "auto"
    memory = "memory"
    disk = "disk"

    def __str__(self) -> str:
        return self.value


class Schedule(Enum):
    """Learning-rate schedules, applied per epoch."""

    constant = "constant"
    cosine = "cosine"  # linear warm-up for warmup_epochs, then cosine decay to min_learning_rate
    step = "step"  # times decay_factor every decay_epochs
    reduce_on_plateau = "reduce_on_plateau"  # times decay_factor after plateau_patience flat epochs


class Monitor(Enum):
    """Epoch metrics that early stopping can watch."""

    val_loss = "val_loss"
    val_accuracy = "val_accuracy"
    loss = "loss"
    accuracy = "accuracy"

    @property
    def mode(self) -> str:
        return "min" if self.value.endswith("loss") else "max"


class Strategy(Enum):
    """How training spreads over devices (insect_exp/distribute.py); batch_size stays global."""

    default = "default"  # one device: GPU:0 if there is one, else the CPU
    mirrored = "mirrored"  # every local GPU, or train.logical_cpus CPU devices
    multi_worker = "multi_worker"  # several processes: the cluster in TF_CONFIG or SLURM


class Task(Enum):
    """What an image's label is: single (one class, softmax cross-entropy) or multilabel (any set
    of classes, sigmoid binary cross-entropy; dataset=csv rows list them as `a;b`,
    docs/multilabel.md)."""

    single = "single"
    multilabel = "multilabel"


class ClassWeight(Enum):
    """Loss weight per class: none, or balanced (n_images / (n_classes * n_images_of_class))."""

    none = "none"
    balanced = "balanced"


# Datasets

# The most pixels (width x height, from the file's header) an image may have to be decoded:
# Pillow's own decompression-bomb threshold (PIL.Image.MAX_IMAGE_PIXELS), so a file Pillow opens
# without warning is decoded here too. It admits the largest camera sensors in common use (61 MP)
# and a 9,459 px square scan, yet holds one decoded RGB image to 268 MB, where a 1 MB PNG can
# claim 20000x20000 pixels (1.2 GB).
MAX_IMAGE_PIXELS = 89_478_485


@dataclass
class DatasetConfig:
    """An image folder laid out as ROOT/train/<class>/* and optionally ROOT/test/<class>/*."""

    name: str = MISSING
    root: str | None = MISSING
    # Fraction of train held out (stratified, seeded) for validation; 0 validates on test.
    val_split: float = 0.0
    # Cap on images per class and split, for smoke runs on big folders.
    max_per_class: int | None = None
    # Images decoded in parallel; 0: two per core.
    decode_workers: int = 0
    # Shuffle buffer in images; null shuffles the whole (in-memory) train split.
    shuffle_buffer: int | None = None
    class_weight: ClassWeight = ClassWeight.none
    # Decoded images: in memory, or streamed from a shared on-disk cache of uint8 records;
    # auto: memory up to cache_max_memory_mb of decoded pixels, disk above (data/cache.py).
    cache: CacheMode = CacheMode.auto
    # null: $INSECT_EXP_CACHE_DIR, else ($XDG_CACHE_HOME or ~/.cache)/insect_exp.
    cache_dir: str | None = None
    cache_max_memory_mb: int = 2048
    # Disk cache cap; the least recently used entries go first (the ones in use never do).
    cache_max_disk_gb: float = 50.0
    # Images whose header gives more pixels are skipped (`too many pixels (WxH)`), never decoded;
    # the logged model refuses them in serving and predict too.
    max_image_pixels: int = MAX_IMAGE_PIXELS
    # The data audit (data/duplicates.py): exact and near-duplicate images within and across
    # splits, and original image sizes, logged with every run.
    audit: bool = True
    # Drop the test images that have a twin in train (exact or near) before training.
    dedupe: bool = False
    # Near duplicates: perceptual hashes (64 bits) at most this many bits apart (and alike
    # thumbnails: data/duplicates.py).
    duplicate_distance: int = 10

    def __post_init__(self) -> None:
        self.class_weight = _enum("dataset.class_weight", self.class_weight, ClassWeight)
        self.cache = _enum("dataset.cache", self.cache, CacheMode)
        mb = self.cache_max_memory_mb
        _require(mb >= 0, "dataset.cache_max_memory_mb", mb, ">= 0")
        gb = self.cache_max_disk_gb
        _require(gb > 0, "dataset.cache_max_disk_gb", gb, "> 0")
        _require(0 <= self.val_split < 1, "dataset.val_split", self.val_split, "in [0, 1)")
        n = self.max_per_class
        _require(n is None or n >= 1, "dataset.max_per_class", n, ">= 1 (or null for all)")
        _require(self.decode_workers >= 0, "dataset.decode_workers", self.decode_workers, ">= 0")
        b = self.shuffle_buffer
        _require(b is None or b >= 1, "dataset.shuffle_buffer", b, ">= 1 (or null for all)")
        p = self.max_image_pixels
        _require(p >= 1, "dataset.max_image_pixels", p, ">= 1")
        d = self.duplicate_distance
        _require(0 <= d <= 64, "dataset.duplicate_distance", d, "in [0, 64]")


@dataclass
class DemoDatasetConfig(DatasetConfig):
    """The built-in demo set, generated once and cached (root null: the user cache directory)."""

    name: str = "demo"
    root: str | None = None
    train_per_class: int = 120
    test_per_class: int = 30
    generator_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("train_per_class", "test_per_class"):
            value = getattr(self, key)
            _require(value >= 1, f"dataset.{key}", value, ">= 1")


@dataclass
class FolderDatasetConfig(DatasetConfig):
    name: str = "insects"
    root: str | None = MISSING


@dataclass
class CsvDatasetConfig(DatasetConfig):
    """Images listed in a CSV file of `path,label[,split]` rows (paths relative to the file)."""

    name: str = "csv"
    root: str | None = None  # unused: the CSV names the files
    path: str = MISSING


# Models


@dataclass
class AugmentConfig:
    """Random augmentation, active only while training: layers at the front of the model, and a
    policy with random erasing applied to the training batches before the model.

    Factors are fractions: rotation of a full turn, zoom and translation of the image size,
    contrast and brightness of the pixel range.
    """

    LAYERS: ClassVar[tuple[str, ...]] = (
        "flip", "vertical_flip", "rotation", "zoom", "translation", "contrast", "brightness"
    )  # fmt: skip

    flip: bool = False  # horizontal
    vertical_flip: bool = False
    rotation: float = 0.0
    zoom: float = 0.0
    translation: float = 0.0
    contrast: float = 0.0
    brightness: float = 0.0
    # randaugment: num_ops ops an image at magnitude 0..10 (timm's rand-m9-n2-mstd0.5 is
    # magnitude=9 num_ops=2 magnitude_std=0.5); trivialaugment draws its own op and magnitude.
    policy: AugmentPolicy = AugmentPolicy.none
    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.0
    # The probability that an image gets a rectangle of random pixels (random erasing).
    erasing: float = 0.0

    def __post_init__(self) -> None:
        for key in ("rotation", "zoom", "translation", "contrast", "brightness"):
            value = getattr(self, key)
            _require(0 <= value < 1, f"model.augment.{key}", value, "in [0, 1)")
        self.policy = _enum("model.augment.policy", self.policy, AugmentPolicy)
        _require(1 <= self.num_ops <= 10, "model.augment.num_ops", self.num_ops, "in [1, 10]")
        m, std = self.magnitude, self.magnitude_std
        _require(0 <= m <= 10, "model.augment.magnitude", m, "in [0, 10]")
        _require(0 <= std <= 10, "model.augment.magnitude_std", std, "in [0, 10]")
        _require(0 <= self.erasing <= 1, "model.augment.erasing", self.erasing, "in [0, 1]")

    @property
    def on_batches(self) -> bool:
        """True when the policy or random erasing changes the training batches."""
        return self.policy is not AugmentPolicy.none or self.erasing > 0

    @property
    def enabled(self) -> bool:
        """True when training sees augmented images (so frozen features are not fixed)."""
        return any(getattr(self, key) for key in self.LAYERS) or self.on_batches


@dataclass
class FineTuneConfig:
    """Second training stage with the backbone unfrozen."""

    enabled: bool = False
    epochs: int = 5
    learning_rate: float = 1e-5
    # Unfreeze only the backbone's top N layers; null unfreezes the whole backbone.
    top_layers: int | None = None

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "model.fine_tune.epochs", self.epochs, ">= 1")
        lr = self.learning_rate
        _require(lr > 0 and math.isfinite(lr), "model.fine_tune.learning_rate", lr, "> 0")
        n = self.top_layers
        _require(n is None or n >= 1, "model.fine_tune.top_layers", n, ">= 1 (or null for all)")


@dataclass
class ModelConfig:
    """What every model has. `_target_` names the recipe class that builds and trains it."""

    _target_: str = MISSING
    name: str = MISSING
    image_size: list[int] = field(default_factory=lambda: [180, 180])
    # Dropout before the classification head; 0 disables it.
    dropout: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        _positive_size("model.image_size", self.image_size)
        _require(0 <= self.dropout < 1, "model.dropout", self.dropout, "in [0, 1)")


@dataclass
class CNNConfig(ModelConfig):
    """The reference CNN: three conv/pool blocks, a dense layer, a logits head."""

    _target_: str = "insect_exp.models.cnn.CNNRecipe"
    name: str = "cnn"
    filters: list[int] = field(default_factory=lambda: [16, 32, 64])
    dense_units: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = len(self.filters) >= 1 and all(f >= 1 for f in self.filters)
        _require(ok, "model.filters", list(self.filters), "one or more positive integers")
        _require(self.dense_units >= 1, "model.dense_units", self.dense_units, ">= 1")


@dataclass
class BackboneConfig(ModelConfig):
    """A pretrained backbone with a logits head: frozen-feature caching and fine-tuning."""

    trainable: bool = False
    # Frozen backbone and no augmentation: compute features once ("auto" picks memory or disk).
    feature_cache: FeatureCache = FeatureCache.auto
    feature_cache_dir: str | None = None
    feature_cache_max_memory_mb: int = 2048
    # Disk cap of the feature cache, least recently used shards evicted first (as dataset.cache).
    feature_cache_max_disk_gb: float = 50.0
    # Seconds a remote download may take to start before we call it offline.
    load_timeout_s: float = 20.0
    fine_tune: FineTuneConfig = field(default_factory=FineTuneConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.feature_cache = _enum("model.feature_cache", self.feature_cache, FeatureCache)
        mb = self.feature_cache_max_memory_mb
        _require(mb >= 0, "model.feature_cache_max_memory_mb", mb, ">= 0")
        gb = self.feature_cache_max_disk_gb
        _require(gb > 0, "model.feature_cache_max_disk_gb", gb, "> 0")
        _require(self.load_timeout_s > 0, "model.load_timeout_s", self.load_timeout_s, "> 0")


@dataclass
class PreviewConfig:
    """The post's ImageNet preview: a full classifier handle labelling one batch of images."""

    enabled: bool = False
    handle: str = "${oc.env:INSECT_EXP_HUB_CLASSIFIER_HANDLE," + MOBILENET_V2_CLASSIFIER + "}"
    labels: str = "${oc.env:INSECT_EXP_IMAGENET_LABELS," + IMAGENET_LABELS + "}"
    num_images: int = 30

    def __post_init__(self) -> None:
        n = self.num_images
        _require(n >= 1, "model.preview.num_images", n, ">= 1")


@dataclass
class HubModelConfig(BackboneConfig):
    """A TF Hub feature-vector backbone (URL or local SavedModel) with a logits head."""

    _target_: str = "insect_exp.models.hub.HubRecipe"
    name: str = "hub_mobilenet"
    handle: str = "${oc.env:INSECT_EXP_HUB_HANDLE," + MOBILENET_V2_FEATURES + "}"
    image_size: list[int] = field(default_factory=lambda: [224, 224])
    preview: PreviewConfig = field(default_factory=PreviewConfig)


@dataclass
class KerasAppConfig(BackboneConfig):
    """Any tf_keras.applications backbone by name, without its top, with a logits head."""

    _target_: str = "insect_exp.models.keras_app.KerasAppRecipe"
    name: str = "keras_app"
    backbone: str = "EfficientNetB0"
    # imagenet (downloaded by Keras, or found in ~/.keras/models), a local weights file, or null
    # for random initialisation.
    weights: str | None = "imagenet"
    image_size: list[int] = field(default_factory=lambda: [224, 224])


# Optimizers


@dataclass
class OptimizerConfig:
    keras_class: ClassVar[str]  # the tf_keras.optimizers class
    name: str = MISSING
    learning_rate: float = 1e-3
    schedule: Schedule = Schedule.constant
    # cosine: epochs of linear warm-up before the decay; the floor the decay ends at.
    warmup_epochs: int = 0
    min_learning_rate: float = 0.0
    # step: every decay_epochs; reduce_on_plateau: after plateau_patience epochs without a better
    # val_loss. Both multiply the rate by decay_factor.
    decay_epochs: int = 3
    decay_factor: float = 0.1
    plateau_patience: int = 2
    # Rescale each weight's gradient to at most this L2 norm (Keras's clipnorm); null: no clipping.
    clipnorm: float | None = None

    def __post_init__(self) -> None:
        self.schedule = _enum("optimizer.schedule", self.schedule, Schedule)
        c = self.clipnorm
        _require(c is None or (c > 0 and math.isfinite(c)), "optimizer.clipnorm", c, "> 0 or null")
        lr = self.learning_rate
        _require(lr > 0 and math.isfinite(lr), "optimizer.learning_rate", lr, "> 0")
        w = self.warmup_epochs
        _require(w >= 0, "optimizer.warmup_epochs", w, ">= 0")
        m = self.min_learning_rate
        _require(0 <= m <= lr, "optimizer.min_learning_rate", m, f"in [0, learning_rate={lr}]")
        _require(self.decay_epochs >= 1, "optimizer.decay_epochs", self.decay_epochs, ">= 1")
        f = self.decay_factor
        _require(0 < f < 1, "optimizer.decay_factor", f, "in (0, 1)")
        p = self.plateau_patience
        _require(p >= 0, "optimizer.plateau_patience", p, ">= 0")

    def options(self) -> dict[str, Any]:
        """The Keras optimizer's own keyword arguments (besides the learning rate)."""
        return {}


@dataclass
class AdamConfig(OptimizerConfig):
    keras_class: ClassVar[str] = "Adam"
    name: str = "adam"
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7

    def options(self) -> dict[str, Any]:
        return {"beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon}


@dataclass
class AdamWConfig(AdamConfig):
    """Adam with decoupled weight decay (Loshchilov & Hutter)."""

    keras_class: ClassVar[str] = "AdamW"
    name: str = "adamw"
    weight_decay: float = 0.004

    def __post_init__(self) -> None:
        super().__post_init__()
        wd = self.weight_decay
        _require(wd >= 0, "optimizer.weight_decay", wd, ">= 0")

    def options(self) -> dict[str, Any]:
        return {**super().options(), "weight_decay": self.weight_decay}


@dataclass
class SGDConfig(OptimizerConfig):
    keras_class: ClassVar[str] = "SGD"
    name: str = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0 <= self.momentum < 1, "optimizer.momentum", self.momentum, "in [0, 1)")

    def options(self) -> dict[str, Any]:
        return {"momentum": self.momentum, "nesterov": self.nesterov}


@dataclass
class RMSpropConfig(OptimizerConfig):
    keras_class: ClassVar[str] = "RMSprop"
    name: str = "rmsprop"
    rho: float = 0.9
    momentum: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0 <= self.momentum < 1, "optimizer.momentum", self.momentum, "in [0, 1)")

    def options(self) -> dict[str, Any]:
        return {"rho": self.rho, "momentum": self.momentum}


# Training


@dataclass
class LossConfig:
    # Targets become (1 - s) * one_hot + s / num_classes.
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        s = self.label_smoothing
        _require(0 <= s < 1, "loss.label_smoothing", s, "in [0, 1)")


@dataclass
class EarlyStoppingConfig:
    enabled: bool = False
    monitor: Monitor = Monitor.val_loss
    # Epochs without improvement before training stops.
    patience: int = 3
    # End with the best epoch's weights (what gets evaluated and logged), not the last epoch's.
    restore_best: bool = True

    def __post_init__(self) -> None:
        self.monitor = _enum("train.early_stopping.monitor", self.monitor, Monitor)
        p = self.patience
        _require(p >= 0, "train.early_stopping.patience", p, ">= 0")


@dataclass
class EmaConfig:
    """An exponential moving average of the trainable weights (docs/configuration.md, "Weight
    averaging"): validation, early stopping, checkpoints, test metrics and the logged model use
    it; val_*_raw score the raw weights."""

    enabled: bool = False
    # Each step: average = decay * average + (1 - decay) * weights.
    decay: float = 0.999

    def __post_init__(self) -> None:
        d = self.decay
        _require(0 < d < 1, "train.ema.decay", d, "in (0, 1)")


@dataclass
class TrainConfig:
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    # default, mirrored or multi_worker (docs/devices.md); batch_size is the global batch.
    strategy: Strategy = Strategy.default
    # Split the CPU into N logical devices before TensorFlow starts (0: one CPU device), so that
    # strategy=mirrored runs on machines without GPUs (tests, trying it out).
    logical_cpus: int = 0
    # multi_worker: how long to wait for every worker at start-up and for any one collective op
    # (a dead worker's peers fail after it at the latest); also how long the other workers wait
    # for the chief to extract the hub model's frozen features.
    worker_timeout_s: float = 600.0
    # Keep a FINISHED run's checkpoints (its latest and best epochs, several times the model's
    # size), so that `resume=<id> epochs=<more>` can train it further; KILLED and FAILED runs
    # always keep theirs.
    keep_checkpoints: bool = False
    # Batch mixing of the training images (docs/configuration.md#mixup-and-cutmix): Beta(alpha,
    # alpha) draws their share; 0 turns each off. With both on, mix_switch_prob of the mixed
    # batches are cut-mixed, the rest mixed up; mix_prob of the batches are mixed at all; the
    # epochs from mix_stop_epoch on (0-based, fine-tuning's counted on) are not (null: never).
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_switch_prob: float = 0.5
    mix_prob: float = 1.0
    mix_stop_epoch: int | None = None

    def __post_init__(self) -> None:
        self.strategy = _enum("train.strategy", self.strategy, Strategy)
        for key in ("mixup_alpha", "cutmix_alpha"):
            a = getattr(self, key)
            _require(a >= 0 and math.isfinite(a), f"train.{key}", a, ">= 0 (0: off)")
        for key in ("mix_switch_prob", "mix_prob"):
            p = getattr(self, key)
            _require(0 <= p <= 1, f"train.{key}", p, "in [0, 1]")
        e = self.mix_stop_epoch
        _require(e is None or e >= 1, "train.mix_stop_epoch", e, ">= 1 (or null: never)")
        n = self.logical_cpus
        _require(n >= 0, "train.logical_cpus", n, ">= 0 (0: the CPU as one device)")
        t = self.worker_timeout_s
        _require(t > 0 and math.isfinite(t), "train.worker_timeout_s", t, "> 0")


@dataclass
class MlflowConfig:
    # null: $MLFLOW_TRACKING_URI if set, else SQLite under mlruns/ in the launch directory.
    tracking_uri: str | None = None
    experiment_name: str = "insect_exp"
    # null: built from the model, optimizer and command-line overrides.
    run_name: str | None = None
    log_model: bool = True
    tags: dict[str, str] = field(default_factory=dict)
    # Register each run's logged model as a new version of this model in MLflow's Model Registry
    # (then models:/<name>/latest, models:/<name>/<version>); null: no registration.
    registered_model_name: str | None = None

    def __post_init__(self) -> None:
        name = self.registered_model_name
        ok = name is None or (name.strip() != "" and "/" not in name and ":" not in name)
        _require(ok, "mlflow.registered_model_name", name, "a name without '/' or ':' (or null)")


class Quantize(Enum):
    """TFLite quantization: none (float32), dynamic (int8 weights, float activations)."""

    none = "none"
    dynamic = "dynamic"


@dataclass
class ExportConfig:
    """Files for devices, logged beside the SavedModel: model.tflite and labels.txt."""

    tflite: bool = False
    # dynamic implies tflite.
    quantize: Quantize = Quantize.none

    def __post_init__(self) -> None:
        self.quantize = _enum("export.quantize", self.quantize, Quantize)

    @property
    def wanted(self) -> bool:
        return self.tflite or self.quantize is not Quantize.none


class Calibrate(Enum):
    """How the logged model's probabilities are calibrated after training (docs/calibration.md)."""

    none = "none"
    # softmax(logits / T), T fitted on the validation split by minimising its NLL.
    temperature = "temperature"


@dataclass
class ReportConfig:
    """What a run shows about its model besides its scores (insect_exp/explain.py)."""

    # Test images shown with their Grad-CAM map in plots/gradcam.png, half right, half wrong.
    gradcam_images: int = 8
    # The highest-loss test images listed in top_losses.tsv (plots/top_losses.png: the first 16).
    top_losses: int = 50
    # Also the training images' (top_losses_train.tsv): one more pass of the model over them.
    top_losses_train: bool = False

    def __post_init__(self) -> None:
        n = self.gradcam_images
        _require(n >= 0, "report.gradcam_images", n, ">= 0 (0: no plots/gradcam.png)")
        _require(self.top_losses >= 0, "report.top_losses", self.top_losses, ">= 0 (0: none)")


@dataclass
class RuntimeConfig:
    """Where and how the job was launched. conf/config.yaml fills it from Hydra by interpolation,
    so the job never reads Hydra's global state; tests set it directly."""

    launch_dir: str = "."
    # Hydra's job output dir and its config subdir (null: no config snapshot to log).
    output_dir: str | None = None
    config_subdir: str | None = None
    overrides: list[str] = field(default_factory=list)
    # Set in a multirun only: the sweep's dir and this job's number in it.
    sweep_dir: str | None = None
    job_num: int | None = None

    @property
    def multirun(self) -> bool:
        return self.job_num is not None


@dataclass
class Config:
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    epochs: int = 10
    batch_size: int = 32
    seed: int = 123
    # Train each configuration this many times, seeds seed, seed+1, ...: a sweep (replicates.py).
    replicates: int = 1
    # TensorFlow intra-op threads; 0: every core, or in a parallel sweep a share of the cores.
    threads: int = 0
    # Make TensorFlow ops deterministic (slower); seeding alone already fixes data order and init.
    deterministic: bool = False
    # Keras dtype policy: mixed_bfloat16 computes in bfloat16 and keeps float32 weights and logits
    # (faster on CPUs with AVX512-BF16/AMX and recent GPUs); float32 is the reference recipe; auto
    # picks mixed_bfloat16 where the device has it natively and a short check agrees, else float32.
    precision: Precision = Precision.auto
    # precision=auto's check: a few training steps in both precisions agree when their losses
    # differ by less than this fraction of float32's.
    precision_tolerance: float = 0.05
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    # temperature: fit one temperature on the validation split and bake it into the logged model.
    calibrate: Calibrate = Calibrate.none
    # multilabel: each image has a set of classes (dataset=csv labels `a;b`); threshold: the
    # probability above which a class is predicted, before per-class tuning on validation.
    task: Task = Task.single
    threshold: float = 0.5
    # A run id to continue from its last checkpoint, with its own logged config (epochs may rise).
    resume: str | None = None
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # Free-form keys for experiment presets and sweepers (e.g. a description).
    extra: dict[str, Any] = field(default_factory=dict)

    def params(self) -> dict[str, Any]:
        """The config as a run's params: what it trains, not where it ran or what it resumes."""
        # A structured config's container is a dict (OmegaConf's return type covers lists too).
        tree = cast(
            dict[str, Any], OmegaConf.to_container(OmegaConf.structured(self), enum_to_str=True)
        )
        tree.pop("runtime")
        tree.pop("resume")
        tree.pop("replicates")  # how many runs the sweep made, not what this one trains
        return tree

    def __post_init__(self) -> None:
        self.precision = _enum("precision", self.precision, Precision)
        self.calibrate = _enum("calibrate", self.calibrate, Calibrate)
        self.task = _enum("task", self.task, Task)
        _require(0 < self.threshold < 1, "threshold", self.threshold, "in (0, 1)")
        if self.task is Task.multilabel:
            self._check_multilabel()
        t = self.precision_tolerance
        _require(t >= 0 and math.isfinite(t), "precision_tolerance", t, ">= 0")
        _require(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _require(self.seed >= 0, "seed", self.seed, ">= 0")
        _require(self.replicates >= 1, "replicates", self.replicates, ">= 1")
        _require(self.threads >= 0, "threads", self.threads, ">= 0 (0: every core)")
        if self.export.wanted and self.precision in (
            Precision.mixed_bfloat16,
            Precision.mixed_float16,
        ):
            raise ConfigError(
                f"precision={self.precision.value} cannot be combined with export.tflite or "
                "export.quantize: TensorFlow Lite computes in float32, not in 16-bit floats; "
                "set precision=auto or float32"
            )
        mixing = self.train.mixup_alpha > 0 or self.train.cutmix_alpha > 0
        if mixing and self.dataset.class_weight is not ClassWeight.none:
            raise ConfigError(
                f"dataset.class_weight={self.dataset.class_weight.name} cannot be combined with "
                "train.mixup_alpha or train.cutmix_alpha: Keras would weigh a mixed image by the "
                "class of its larger share alone"
            )

    def _check_multilabel(self) -> None:
        """task=multilabel's refusals: the settings that assume one label per image."""
        if not isinstance(self.dataset, CsvDatasetConfig):
            raise ConfigError(
                "task=multilabel reads label sets from a CSV file list: use dataset=csv "
                "(rows path,label with labels separated by ';')"
            )
        if self.calibrate is not Calibrate.none:
            raise ConfigError("calibrate=temperature scales a softmax: not with task=multilabel")
        if self.dataset.class_weight is not ClassWeight.none:
            raise ConfigError("dataset.class_weight weighs one class per image: not with "
                              "task=multilabel")  # fmt: skip
        if self.train.mixup_alpha > 0 or self.train.cutmix_alpha > 0:
            # Its accuracy and soft targets are a softmax's; a label set's mix is not built yet.
            raise ConfigError("train.mixup_alpha and train.cutmix_alpha mix one label per image: "
                              "not with task=multilabel")  # fmt: skip
        if self.train.ema.enabled:
            # Its raw-weights validation scores one label per image; not built for label sets yet.
            raise ConfigError("train.ema.enabled scores the raw weights as single-label: not "
                              "with task=multilabel yet")  # fmt: skip


# The other commands: predict and evaluate


@dataclass
class StoreConfig:
    # null: $MLFLOW_TRACKING_URI if set, else SQLite under mlruns/ in the current directory.
    tracking_uri: str | None = None


@dataclass
class PredictConfig:
    """`python -m insect_exp.predict` (conf/predict.yaml): label image files with a logged model."""

    # runs:/<run id>/model, models:/<name>/<version|latest>, models:/<model id>, or a model folder.
    model_uri: str = MISSING
    # An image file or a folder (searched at every depth).
    inputs: str = MISSING
    # The CSV file to write; null prints it.
    output: str | None = None
    top_k: int = 3
    batch_size: int = 64
    # Images decoded in parallel; 0 lets tf.data choose.
    decode_workers: int = 0
    # Progress on stderr: null shows it for long inputs (1000 images or more) and on a terminal.
    progress: bool | None = None
    # Also write each image's Grad-CAM overlay, as PNG files in <output without .csv>_gradcam/.
    explain: bool = False
    # Test-time augmentation: none, or flip (probabilities averaged with the mirror image's).
    tta: TTA = TTA.none
    mlflow: StoreConfig = field(default_factory=StoreConfig)

    def __post_init__(self) -> None:
        self.tta = _enum("tta", self.tta, TTA)
        if self.explain and not self.output:
            raise ConfigError("explain=true needs output=<file.csv>: the overlays go beside it")
        _require(self.top_k >= 1, "top_k", self.top_k, ">= 1")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _require(self.decode_workers >= 0, "decode_workers", self.decode_workers, ">= 0")


@dataclass
class EvaluateMlflowConfig:
    # null: $MLFLOW_TRACKING_URI if set, else SQLite under mlruns/ in the launch directory.
    tracking_uri: str | None = None
    # null: the source run's experiment (insect_exp for a model that is not from a run).
    experiment_name: str | None = None
    # null: "evaluate <source run name> on <dataset>/<split>".
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class EvaluateConfig:
    """`python -m insect_exp.evaluate` (conf/evaluate.yaml): a logged model on a labelled folder."""

    # runs:/<run id>/model, models:/<name>/<version|latest>, models:/<model id>, or a model folder.
    model_uri: str = MISSING
    dataset: DatasetConfig = MISSING
    # The subfolder of the dataset root to evaluate on (ignored for a bare <class>/* folder).
    split: str = "test"
    batch_size: int = 32
    # Picks the images of the misclassified grid when there are more than it shows.
    seed: int = 123
    # Test-time augmentation: flip also logs every score of the images averaged with their mirror
    # images', as <name>_tta.
    tta: TTA = TTA.none
    mlflow: EvaluateMlflowConfig = field(default_factory=EvaluateMlflowConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        self.tta = _enum("tta", self.tta, TTA)
        _require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        if not self.split or "/" in self.split or self.split.startswith("."):
            raise ConfigError(f"split={self.split!r} must be a folder name such as test or train")


@dataclass
class CompareConfig:
    """`python -m insect_exp.compare A B` (conf/compare.yaml): two models, runs or sweep groups
    scored on the same images, with paired tests, logged as a new run; a regression gate."""

    # runs:/<id>[/model], a run id, runs:/<sweep parent id>[#<group>], models:/<name>/<version>,
    # models:/<name>@<alias> or models:/<model id>. `python -m insect_exp.compare A B` sets both.
    baseline: str = MISSING
    candidate: str = MISSING
    # root null: the test split both sources' runs logged (the same digest), their predictions
    # reused where logged; a root: every model evaluated on ROOT/<split> (or a bare class folder).
    dataset: DatasetConfig = MISSING
    split: str = "test"
    batch_size: int = 32
    # The gate (exit 1): the candidate's accuracy below the baseline's by more than max_drop
    # overall, or by more than max_class_drop for a class; null: that check is off.
    max_drop: float | None = None
    max_class_drop: float | None = None
    # A passing candidate gets the alias (`alias`, else the baseline's models:/<name>@<alias>).
    promote: bool = False
    alias: str | None = None
    # Paired bootstrap resamples, and their seed (reruns agree).
    resamples: int = 2000
    seed: int = 0
    mlflow: EvaluateMlflowConfig = field(default_factory=EvaluateMlflowConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _require(self.resamples >= 100, "resamples", self.resamples, ">= 100")
        for key in ("max_drop", "max_class_drop"):
            value = getattr(self, key)
            _require(value is None or 0 <= value <= 1, key, value, "null or in [0, 1]")


@overload
def to_object(cfg: DictConfig) -> Config: ...


@overload
def to_object(cfg: DictConfig, schema: type[S]) -> S: ...


def to_object(cfg: DictConfig, schema: type[Any] = Config) -> Any:
    """The composed config as typed objects (of `schema`: the train job's, or a command's), every
    range checked.

    Raises:
        UserError: a missing value or a value out of range, in one line naming the key.
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"no value for {', '.join(missing)}: set it on the command line")
    return OmegaConf.to_object(cfg)


def register_configs() -> None:
    """Register the schemas that the YAML files in conf/ name in their defaults lists.

    They live in groups of their own, `schema/<group>/<name>`, so that the real groups offer only
    real options (in --help, in Hydra's errors); a YAML extends one with
    `- /schema/model/cnn@_here_` in its defaults list.
    """
    from insect_exp.replicates import register_resolvers

    register_resolvers()  # conf/config.yaml's hydra node uses them
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, name, node in (
        ("dataset", "demo", DemoDatasetConfig),
        ("dataset", "folder", FolderDatasetConfig),
        ("dataset", "csv", CsvDatasetConfig),
        ("model", "cnn", CNNConfig),
        ("model", "hub", HubModelConfig),
        ("model", "keras_app", KerasAppConfig),
        ("optimizer", "adam", AdamConfig),
        ("optimizer", "adamw", AdamWConfig),
        ("optimizer", "sgd", SGDConfig),
        ("optimizer", "rmsprop", RMSpropConfig),
    ):
        cs.store(group=f"schema/{group}", name=name, node=node)
