"""How long Keras's fit takes to return after its last epoch, with tf.data autotuning on and off.

Deleting an autotuned tf.data iterator waits for its tuning thread's current period, which
doubles while the iterator lives (10 ms up to a minute). Keras deletes the training iterator when
fit returns, so a run could stall there for up to the period: 20 s after a 20 s fit. The framework
turns autotuning off on its datasets (`insect_exp.data.pipeline.without_autotuning`).

Each run is its own process: the reference CNN, Adam, batch 32, the framework's training batches
(`insect_exp.fit.train_batches`) over random 180x180 images. Printed per run: the epoch times and
the seconds between Keras's on_train_end and fit returning.

    python benchmarks/fit_end.py --runs 4 --epochs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

_RUN = """
import json, sys, time
import insect_exp  # sets TF_USE_LEGACY_KERAS before TensorFlow loads
import numpy as np, tensorflow as tf, tf_keras as keras
from insect_exp import fit
from insect_exp.config import AdamConfig
from insect_exp.data.pipeline import ImageSplit
from insect_exp.models.cnn import build_cnn

autotune, epochs, n = sys.argv[1] == "on", int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
images = rng.integers(0, 255, (n, 180, 180, 3), dtype=np.uint8)
labels = rng.integers(0, 3, n).astype(np.int32)
keras.utils.set_random_seed(1)
model = build_cnn((180, 180), 3)
fit.compile_classifier(model, fit.make_optimizer(AdamConfig()))
ds = fit.train_batches(ImageSplit(images, labels, [""] * n), 32, seed=0)
options = tf.data.Options()
options.autotune.enabled = autotune
ds = ds.with_options(options)

class Clock(keras.callbacks.Callback):
    epochs, end = [], 0.0
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()
    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(time.perf_counter() - self.start)
    def on_train_end(self, logs=None):
        self.end = time.perf_counter()

clock = Clock()
model.fit(ds, epochs=epochs, steps_per_epoch=-(-n // 32), callbacks=[clock], verbose=0)
print(json.dumps({"epochs": clock.epochs, "return": time.perf_counter() - clock.end}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4, help="runs of each side, alternating")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--images", type=int, default=1020)
    args = parser.parse_args()
    found: dict[str, list[dict]] = {"on": [], "off": []}
    for i in range(args.runs):
        for side in ("on", "off") if i % 2 == 0 else ("off", "on"):
            done = subprocess.run(
                [sys.executable, "-c", _RUN, side, str(args.epochs), str(args.images)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            result = json.loads(done.stdout.strip().splitlines()[-1])
            found[side].append(result)
            epochs = " ".join(f"{t:.2f}" for t in result["epochs"])
            back = result["return"]
            print(
                f"run {i + 1} autotuning {side:3s}: epochs {epochs} s; "
                f"fit returned {back:.2f} s after its last epoch",
                flush=True,
            )
    for side, results in found.items():
        returns = [r["return"] for r in results]
        steady = [t for r in results for t in r["epochs"][1:]]
        stalled = sum(r > 1.0 for r in returns)
        print(
            f"autotuning {side:3s}: fit returned after max {max(returns):.2f} s, "
            f"{stalled} of {len(returns)} runs over 1 s; median epoch after the first "
            f"{statistics.median(steady):.2f} s"
        )


if __name__ == "__main__":
    main()
