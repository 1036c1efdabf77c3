"""Config schema: dataclasses registered in Hydra's ConfigStore that the YAML files in conf/ extend.

A typo in a key or a value of the wrong type fails at start-up with Hydra's own message, before
TensorFlow is imported.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# Published TF Hub handles used by the reference post; an environment variable can point them at a
# local SavedModel, which also works in sweeps that mix in models without these keys.
MOBILENET_V2_FEATURES = "https://tfhub.dev/google/tf2-preview/mobilenet_v2/feature_vector/4"
MOBILENET_V2_CLASSIFIER = "https://tfhub.dev/google/tf2-preview/mobilenet_v2/classification/4"
IMAGENET_LABELS = "https://storage.googleapis.com/download.tensorflow.org/data/ImageNetLabels.txt"


@dataclass
class DatasetConfig:
    """An image folder laid out as ROOT/train/<class>/* and optionally ROOT/test/<class>/*."""

    name: str = MISSING
    root: str | None = MISSING
    # Fraction of train held out (stratified, seeded) for validation; 0 validates on test.
    val_split: float = 0.0
    # Cap on images per class and split, for smoke runs on big folders.
    max_per_class: int | None = None
    # Images decoded in parallel; 0 lets tf.data choose (every core).
    decode_workers: int = 0
    # Shuffle buffer in images; null shuffles the whole (in-memory) train split.
    shuffle_buffer: int | None = None


@dataclass
class DemoDatasetConfig(DatasetConfig):
    """The built-in demo set, generated once and cached (root null: the user cache directory)."""

    name: str = "demo"
    root: str | None = None
    train_per_class: int = 120
    test_per_class: int = 30
    generator_seed: int = 0


@dataclass
class FolderDatasetConfig(DatasetConfig):
    name: str = "insects"
    root: str | None = MISSING


@dataclass
class AugmentConfig:
    """Random augmentation layers at the front of the model, active only while training."""

    flip: bool = False
    rotation: float = 0.0
    zoom: float = 0.0


@dataclass
class ModelConfig:
    name: str = MISSING
    image_size: list[int] = field(default_factory=lambda: [180, 180])
    # Dropout before the classification head; 0 disables it.
    dropout: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class CNNConfig(ModelConfig):
    """The reference CNN: three conv/pool blocks, a dense layer, a logits head."""

    name: str = "cnn"
    filters: list[int] = field(default_factory=lambda: [16, 32, 64])
    dense_units: int = 128


@dataclass
class FineTuneConfig:
    """Second training stage with the backbone unfrozen."""

    enabled: bool = False
    epochs: int = 5
    learning_rate: float = 1e-5
    # Unfreeze only the top N backbone variables' layers; null unfreezes the whole backbone.
    top_layers: int | None = None


@dataclass
class PreviewConfig:
    """The post's ImageNet preview: a full classifier handle labelling one batch of images."""

    enabled: bool = False
    handle: str = "${oc.env:INSECT_EXP_HUB_CLASSIFIER_HANDLE," + MOBILENET_V2_CLASSIFIER + "}"
    labels: str = "${oc.env:INSECT_EXP_IMAGENET_LABELS," + IMAGENET_LABELS + "}"
    num_images: int = 30


@dataclass
class HubModelConfig(ModelConfig):
    """A TF Hub feature-vector backbone (URL or local SavedModel) with a logits head."""

    name: str = "hub_mobilenet"
    handle: str = "${oc.env:INSECT_EXP_HUB_HANDLE," + MOBILENET_V2_FEATURES + "}"
    image_size: list[int] = field(default_factory=lambda: [224, 224])
    trainable: bool = False
    # Frozen backbone and no augmentation: compute features once ("auto" picks memory or disk).
    feature_cache: str = "auto"
    feature_cache_dir: str | None = None
    feature_cache_max_memory_mb: int = 2048
    # Seconds a remote handle may take to resolve before we call it offline.
    load_timeout_s: float = 20.0
    fine_tune: FineTuneConfig = field(default_factory=FineTuneConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)


@dataclass
class OptimizerConfig:
    name: str = MISSING
    learning_rate: float = 1e-3


@dataclass
class AdamConfig(OptimizerConfig):
    name: str = "adam"
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7


@dataclass
class SGDConfig(OptimizerConfig):
    name: str = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False


@dataclass
class RMSpropConfig(OptimizerConfig):
    name: str = "rmsprop"
    rho: float = 0.9
    momentum: float = 0.0


@dataclass
class MlflowConfig:
    # null: $MLFLOW_TRACKING_URI if set, else SQLite under mlruns/ in the launch directory.
    tracking_uri: str | None = None
    experiment_name: str = "insect_exp"
    # null: built from the model, optimizer and command-line overrides.
    run_name: str | None = None
    log_model: bool = True
    log_batch_metrics: bool = True
    tags: dict[str, str] = field(default_factory=dict)


class Precision(Enum):
    """Keras mixed-precision policies (https://keras.io/api/mixed_precision/policy/)."""

    float32 = "float32"
    mixed_bfloat16 = "mixed_bfloat16"
    mixed_float16 = "mixed_float16"


@dataclass
class Config:
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    epochs: int = 10
    batch_size: int = 32
    seed: int = 123
    # TensorFlow intra-op threads; 0: every core, or in a parallel sweep a share of the cores.
    threads: int = 0
    # Make TensorFlow ops deterministic (slower); seeding alone already fixes data order and init.
    deterministic: bool = False
    # Keras dtype policy: mixed_bfloat16 computes in bfloat16 and keeps float32 weights and logits
    # (faster on CPUs with AVX512-BF16/AMX and recent GPUs); float32 is the reference recipe.
    precision: Precision = Precision.float32
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    # Free-form keys for experiment presets and sweepers (e.g. a description).
    extra: dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    """Register the schemas that the YAML files in conf/ name in their defaults lists."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="dataset", name="base_demo", node=DemoDatasetConfig)
    cs.store(group="dataset", name="base_folder", node=FolderDatasetConfig)
    cs.store(group="model", name="base_cnn", node=CNNConfig)
    cs.store(group="model", name="base_hub", node=HubModelConfig)
    cs.store(group="optimizer", name="base_adam", node=AdamConfig)
    cs.store(group="optimizer", name="base_sgd", node=SGDConfig)
    cs.store(group="optimizer", name="base_rmsprop", node=RMSpropConfig)
