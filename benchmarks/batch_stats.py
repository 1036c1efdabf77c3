"""Per-batch metrics read once an epoch (as shipped) or converted at every step, on the CNN.

`callbacks.BatchStats` records every training batch's loss and accuracy. It keeps the tensors
Keras hands it and reads them once an epoch, which Keras 2 allows a callback to ask for (its own
callbacks set `_supports_tf_logs`, there being no public switch). Without that, Keras converts
every batch's logs to Python numbers, and each step waits for the one before to finish. This
script trains the reference CNN (Adam, batch 32) on random 180x180 images with the framework's
callback, once as shipped and once with the conversion at every step, each side a process of its
own, alternating, and prints the median epoch time after the first of each side.

    python benchmarks/batch_stats.py --runs 3 --epochs 4
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
import numpy as np, tf_keras as keras
from insect_exp import fit
from insect_exp.callbacks import BatchStats
from insect_exp.config import AdamConfig
from insect_exp.data.pipeline import ImageSplit, without_autotuning
from insect_exp.models.cnn import build_cnn

every_step, epochs, n = sys.argv[1] == "every-step", int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
images = rng.integers(0, 255, (n, 180, 180, 3), dtype=np.uint8)
labels = rng.integers(0, 3, n).astype(np.int32)
keras.utils.set_random_seed(1)
model = build_cnn((180, 180), 3)
fit.compile_classifier(model, fit.make_optimizer(AdamConfig()))
ds = without_autotuning(fit.train_batches(ImageSplit(images, labels, [""] * n), 32, seed=0))
stats = BatchStats(32, n)
if every_step:
    stats._supports_tf_logs = False  # the counterfactual: Keras converts the logs at every step

class Clock(keras.callbacks.Callback):
    epochs = []
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()
    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(time.perf_counter() - self.start)

clock = Clock()
model.fit(ds, epochs=epochs, steps_per_epoch=-(-n // 32), callbacks=[stats, clock], verbose=0)
assert len(stats.losses) == epochs * -(-n // 32)
print(json.dumps({"epochs": clock.epochs}))
"""

SIDES = ("once-an-epoch", "every-step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=1020)
    args = parser.parse_args()
    steady: dict[str, list[float]] = {side: [] for side in SIDES}
    for i in range(args.runs):
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:
            done = subprocess.run(
                [sys.executable, "-c", _RUN, side, str(args.epochs), str(args.images)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            epochs = json.loads(done.stdout.strip().splitlines()[-1])["epochs"]
            steady[side] += epochs[1:]
            shown = " ".join(f"{t:.2f}" for t in epochs)
            print(f"run {i + 1} {side:13s}: epochs {shown} s", flush=True)
    medians = {side: statistics.median(times) for side, times in steady.items()}
    for side, median in medians.items():
        print(f"{side:13s}: median epoch after the first {median:.2f} s")
    print(f"every-step / once-an-epoch: {medians['every-step'] / medians['once-an-epoch']:.3f}x")


if __name__ == "__main__":
    main()
