"""The blog post's CNN recipe, as the post writes it, for side-by-side timing.

Usage: python benchmarks/reference_cnn.py DATA_ROOT [EPOCHS] [--autolog TRACKING_URI]
Prints `REFERENCE val_accuracy=<float>` as its last line.

With --autolog, the same script with `mlflow.tensorflow.autolog()` around `fit`: what a user
would write to get the run into MLflow without the framework (params, per-epoch metrics and the
model, logged to TRACKING_URI). autolog needs the `tensorboard` package: install it in the
benchmark's environment; it is not a dependency of the framework.
"""

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # same Keras 2 as the framework

import tensorflow as tf  # noqa: E402
from tensorflow.keras import layers  # noqa: E402
from tensorflow.keras.models import Sequential  # noqa: E402

args = sys.argv[1:]
autolog_uri = None
if "--autolog" in args:
    at = args.index("--autolog")
    autolog_uri = args[at + 1]
    del args[at : at + 2]
root = args[0]
epochs = int(args[1]) if len(args) > 1 else 10
img_height, img_width, batch_size = 180, 180, 32

train_ds = tf.keras.preprocessing.image_dataset_from_directory(
    os.path.join(root, "train"), image_size=(img_height, img_width), batch_size=batch_size
)
test_ds = tf.keras.preprocessing.image_dataset_from_directory(
    os.path.join(root, "test"), image_size=(img_height, img_width), batch_size=batch_size
)
num_classes = len(train_ds.class_names)

AUTOTUNE = tf.data.experimental.AUTOTUNE
train_ds = train_ds.cache().shuffle(1000).prefetch(buffer_size=AUTOTUNE)
test_ds = test_ds.cache().prefetch(buffer_size=AUTOTUNE)

model = Sequential(
    [
        layers.experimental.preprocessing.Rescaling(
            1.0 / 255, input_shape=(img_height, img_width, 3)
        ),
        layers.Conv2D(16, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(),
        layers.Conv2D(32, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(),
        layers.Conv2D(64, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dense(num_classes),
    ]
)
model.compile(
    optimizer="adam",
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
)
model.summary()
if autolog_uri:
    import mlflow

    mlflow.set_tracking_uri(autolog_uri)
    mlflow.set_experiment("reference_autolog")
    mlflow.tensorflow.autolog()
history = model.fit(train_ds, validation_data=test_ds, epochs=epochs)
print(f"REFERENCE val_accuracy={history.history['val_accuracy'][-1]:.4f}")
