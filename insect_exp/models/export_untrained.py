"""Export an UNTRAINED (random-weight) MobileNetV2 as TF Hub-style SavedModels for offline runs.

    python -m insect_exp.models.export_untrained OUT_DIR

writes
    OUT_DIR/feature_vector/  images [N, 224, 224, 3] in [0, 1] -> 1280 features (2,257,984
                             params), the interface of .../mobilenet_v2/feature_vector/4
    OUT_DIR/classifier/      images -> 1001 logits, as .../mobilenet_v2/classification/4
    OUT_DIR/labels.txt       1001 PLACEHOLDER names (the real ImageNet labels need a download)

The weights are random: the models have the published architecture and parameter counts, so
runs exercise the real loading, caching, training and logging paths, but their accuracy means
little. Use them for smoke tests on machines that cannot reach tfhub.dev, never for results.
No data is used: only the BatchNorm statistics are set, from one batch of random smooth noise,
because with their initial values the features of a random MobileNetV2 shrink to ~1e-12 and no
head can learn from them; calibrated, a head trained on them does better than chance.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import insect_exp  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

if TYPE_CHECKING:
    import tf_keras as keras

FEATURE_VECTOR_DIR = "feature_vector"
CLASSIFIER_DIR = "classifier"
LABELS_FILE = "labels.txt"
IMAGENET_CLASSES = 1001  # the hub classifiers' 1000 ImageNet classes plus "background"


def save_hub_module(
    model: keras.Model, out_dir: str | Path, image_size: Sequence[int] | None = None
) -> Path:
    """Save a Keras model (images in [0, 1] -> outputs) as a reusable SavedModel for hub.KerasLayer.

    Only the call function (traced for training True/False) and the variable lists that
    hub.KerasLayer reads are saved, not Keras's per-layer functions: saving and loading take
    seconds instead of tens of seconds.

    Args:
        image_size: (height, width) the model accepts; None accepts any size.
    """
    import tensorflow as tf

    height, width = (None, None) if image_size is None else (int(v) for v in image_size)
    spec = tf.TensorSpec([None, height, width, 3], tf.float32, name="images")

    @tf.function
    def call(images: tf.Tensor, training: bool = False) -> tf.Tensor:
        return model(images, training=training)

    for training in (False, True):
        call.get_concrete_function(spec, training)
    module = tf.train.Checkpoint()
    module.variables = list(model.variables)
    module.trainable_variables = list(model.trainable_variables)
    module.regularization_losses = []
    module.__call__ = call
    tf.saved_model.save(module, str(out_dir))
    return Path(out_dir)


def untrained_mobilenet_v2(
    image_size: Sequence[int] = (224, 224), classifier: bool = False
) -> keras.Model:
    """MobileNetV2 with random weights taking [0, 1] images, like the TF Hub modules.

    Keras's MobileNetV2 expects [-1, 1] inputs; the leading Rescaling maps the hub convention onto
    it and has no parameters, so the counts match the published modules.
    """
    import tf_keras as keras

    shape = (*(int(v) for v in image_size), 3)
    images = keras.Input(shape=shape, name="images")
    scaled = keras.layers.Rescaling(2.0, offset=-1.0)(images)
    if classifier:
        net = keras.applications.MobileNetV2(
            input_shape=shape,
            weights=None,
            classes=IMAGENET_CLASSES,
            classifier_activation=None,
        )
    else:
        net = keras.applications.MobileNetV2(
            input_shape=shape, include_top=False, pooling="avg", weights=None
        )
    model = keras.Model(images, net(scaled), name=net.name)
    norms = [layer for layer in net.layers if isinstance(layer, keras.layers.BatchNormalization)]
    _calibrate_batchnorm(model, norms)
    return model


def _calibrate_batchnorm(model: keras.Model, norms: list[keras.layers.Layer]) -> None:
    """Set BatchNorm moving statistics to those of one batch of smooth random noise images."""
    import tensorflow as tf

    height, width = model.input_shape[1:3]
    coarse = tf.image.resize(tf.random.uniform((32, 8, 8, 3)), (height, width))
    noise = 0.7 * coarse + 0.3 * tf.random.uniform((32, height, width, 3))
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0  # the moving statistics become this batch's statistics
    model(noise, training=True)
    for layer, momentum in zip(norms, momenta, strict=True):
        layer.momentum = momentum


def placeholder_labels() -> list[str]:
    """1001 stand-in names in the layout of ImageNetLabels.txt ("background" first)."""
    return ["background"] + [f"untrained_class_{i:04d}" for i in range(1, IMAGENET_CLASSES)]


def export(
    out_dir: str | Path,
    image_size: Sequence[int] = (224, 224),
    classifier: bool = True,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the untrained feature-vector model (and classifier + labels) under out_dir.

    Returns:
        Paths by name: "feature_vector", and "classifier" and "labels" if asked for.
    """
    import tf_keras as keras

    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    paths = {"feature_vector": out / FEATURE_VECTOR_DIR}
    save_hub_module(untrained_mobilenet_v2(image_size), paths["feature_vector"], image_size)
    if classifier:
        paths["classifier"] = out / CLASSIFIER_DIR
        model = untrained_mobilenet_v2(image_size, classifier=True)
        save_hub_module(model, paths["classifier"], image_size)
        paths["labels"] = out / LABELS_FILE
        paths["labels"].write_text("\n".join(placeholder_labels()) + "\n")
    (out / "README.txt").write_text(
        "UNTRAINED MobileNetV2 (random weights) exported by insect_exp.models.export_untrained\n"
        "for offline smoke runs. Only its BatchNorm statistics were set, from random noise, so\n"
        "that its features do not vanish. Predictions and accuracies made with it mean little.\n"
    )
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: export the untrained models and print the settings that use them."""
    parser = argparse.ArgumentParser(
        prog="python -m insect_exp.models.export_untrained",
        description="Export an UNTRAINED (random-weight) MobileNetV2 with the TF Hub interface "
        "for offline smoke runs of model=hub_mobilenet. Its predictions mean nothing.",
    )
    parser.add_argument("out_dir", help="directory to write feature_vector/, classifier/ into")
    parser.add_argument("--image-size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    parser.add_argument(
        "--no-classifier", action="store_true", help="skip the 1001-class classifier and labels"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    paths = export(args.out_dir, args.image_size, not args.no_classifier, args.seed)
    print("Exported UNTRAINED (random-weight) MobileNetV2 for offline smoke runs:")
    print(f"  export INSECT_EXP_HUB_HANDLE={paths['feature_vector']}")
    if "classifier" in paths:
        print(f"  export INSECT_EXP_HUB_CLASSIFIER_HANDLE={paths['classifier']}")
        print(f"  export INSECT_EXP_IMAGENET_LABELS={paths['labels']}  # placeholder names")
    print(f"or: python -m insect_exp model=hub_mobilenet model.handle={paths['feature_vector']}")


if __name__ == "__main__":
    main()
