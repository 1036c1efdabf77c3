"""The blog post's TF Hub transfer-learning recipe, as the post writes it, for side-by-side timing.

Usage: python benchmarks/reference_hub.py DATA_ROOT HANDLE [EPOCHS]
HANDLE is the feature-vector module (the post's tfhub.dev URL, or a local SavedModel offline).
Prints `REFERENCE test_accuracy=<float>` as its last line: the post never evaluates its hub model,
so the benchmark adds an evaluation on ROOT/test, the split the framework reports.
"""

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # hub.KerasLayer needs Keras 2, as in the post

import tensorflow as tf  # noqa: E402
import tensorflow_hub as hub  # noqa: E402

root, feature_extractor_model = sys.argv[1], sys.argv[2]
epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 10
batch_size, img_height, img_width = 32, 224, 224

train_ds = tf.keras.preprocessing.image_dataset_from_directory(
    os.path.join(root, "train"), image_size=(img_height, img_width), batch_size=batch_size
)
class_names = train_ds.class_names

normalization_layer = tf.keras.layers.experimental.preprocessing.Rescaling(1.0 / 255)
train_ds = train_ds.map(lambda x, y: (normalization_layer(x), y))
AUTOTUNE = tf.data.experimental.AUTOTUNE
train_ds = train_ds.cache().prefetch(buffer_size=AUTOTUNE)

feature_extractor_layer = hub.KerasLayer(
    feature_extractor_model, input_shape=(224, 224, 3), trainable=False
)
num_classes = len(class_names)
model = tf.keras.Sequential([feature_extractor_layer, tf.keras.layers.Dense(num_classes)])
model.summary()
model.compile(
    optimizer=tf.keras.optimizers.Adam(),
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["acc"],
)


class CollectBatchStats(tf.keras.callbacks.Callback):
    def __init__(self):
        self.batch_losses = []
        self.batch_acc = []

    def on_train_batch_end(self, batch, logs=None):
        self.batch_losses.append(logs["loss"])
        self.batch_acc.append(logs["acc"])
        self.model.reset_metrics()


batch_stats_callback = CollectBatchStats()
history = model.fit(train_ds, epochs=epochs, callbacks=[batch_stats_callback])

# Not in the post: score the trained model on the test split, as the framework does.
test_ds = tf.keras.preprocessing.image_dataset_from_directory(
    os.path.join(root, "test"), image_size=(img_height, img_width), batch_size=batch_size
)
test_ds = test_ds.map(lambda x, y: (normalization_layer(x), y))
_, test_accuracy = model.evaluate(test_ds, verbose=0)
print(f"REFERENCE test_accuracy={test_accuracy:.4f}")
