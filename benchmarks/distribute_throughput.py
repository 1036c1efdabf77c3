"""Training throughput of train.strategy=mirrored over 2 logical CPU devices against default.

Each strategy trains the reference CNN (Adam, global batch 32) on the same generated images in a
process of its own (logical devices exist only if set before TensorFlow starts): one warm-up epoch
(tracing), then --epochs timed epochs through insect_exp.fit, the code path of a run. The
processes alternate over --repeats and the best images/s of each is printed. `default (oneDNN
off)` is the fair baseline: a run with several CPU replicas turns oneDNN off (docs/devices.md).
On one CPU, mirrored cannot be faster: the point of it there is
correctness, not speed.

    python benchmarks/distribute_throughput.py --images 1020 --epochs 3 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _timing import cpu  # a sibling module: these scripts run as benchmarks/NAME.py

HERE = Path(__file__).resolve()
SETUPS = {
    "default": ("default", 0, {}),
    "default (oneDNN off)": ("default", 0, {"TF_ENABLE_ONEDNN_OPTS": "0"}),
    "mirrored, 2 logical CPUs": ("mirrored", 2, {}),
}


def measure(strategy: str, logical_cpus: int, images: int, size: int, epochs: int) -> dict:
    """Images per second of training epochs under one strategy (this process's only run)."""
    from insect_exp import distribute
    from insect_exp.config import AdamConfig, Strategy, TrainConfig

    train_cfg = TrainConfig(strategy=Strategy[strategy], logical_cpus=logical_cpus)
    distribute.before_tensorflow(train_cfg)
    import numpy as np
    import tf_keras as keras

    from insect_exp import fit
    from insect_exp.data.pipeline import ImageSplit
    from insect_exp.models.cnn import build_cnn

    dist = distribute.start(train_cfg, 32)
    rng = np.random.default_rng(0)
    labels = (np.arange(images) % 3).astype(np.int32)
    pixels = rng.integers(0, 80, (images, size, size, 3), dtype=np.uint8)
    pixels[np.arange(images), :, :, labels] += 150  # learnable: one dominant channel per class
    split = ImageSplit(pixels, labels, [str(i) for i in range(images)])
    val = split.subset(np.arange(min(64, images)))
    keras.utils.set_random_seed(0)
    with dist.strategy.scope():
        model = build_cnn((size, size), 3)
        fit.compile_classifier(model, fit.make_optimizer(AdamConfig()))
        fit.fit(model, split, val, fit.FitSettings(1, 32, 0, AdamConfig()), verbose=0)
        start = time.perf_counter()
        fitted = fit.fit(
            model, split, val, fit.FitSettings(epochs, 32, 0, AdamConfig()), verbose=0,
            first_epoch=1,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    return {
        "images_per_s": images * epochs / seconds,
        "devices": dist.describe(),
        "loss": fitted.history.epochs["loss"][-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1020, help="training images (the post's)")
    parser.add_argument("--image-size", type=int, default=180)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--phase", choices=SETUPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        strategy, logical, _ = SETUPS[args.phase]
        result = measure(strategy, logical, args.images, args.image_size, args.epochs)
        print(json.dumps(result))
        return

    print(cpu())
    print(f"reference CNN, {args.images} images of {args.image_size}x{args.image_size}, "
          f"global batch 32, {args.epochs} timed epochs, best of {args.repeats}")  # fmt: skip
    best: dict[str, dict] = {}
    for _ in range(args.repeats):  # alternating, so that every setup sees the same machine
        for name, (_, _, env) in SETUPS.items():
            cmd = [
                sys.executable, str(HERE), "--phase", name, "--images", str(args.images),
                "--image-size", str(args.image_size), "--epochs", str(args.epochs),
            ]  # fmt: skip
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, **env}, check=False
            )
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            if result["images_per_s"] > best.get(name, {}).get("images_per_s", 0):
                best[name] = result
    base = best["default"]["images_per_s"]
    for name, result in best.items():
        print(
            f"{name:26s} {result['images_per_s']:8.1f} images/s  "
            f"({result['images_per_s'] / base:.2f}x default)  final loss {result['loss']:.4f}"
            f"  [{result['devices']}]"
        )


if __name__ == "__main__":
    main()
