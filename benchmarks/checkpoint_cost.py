"""What a per-epoch checkpoint costs against a reference CNN epoch at 180x180 (issue: < 3%).

Trains the reference CNN (Adam, batch 32) on random 180x180 images for a few epochs, with and
without the checkpoint callback, in one process, alternating, and prints the median epoch time of
each, the median time of one checkpoint write (latest, plus the best's hard links) and the ratio.

    python benchmarks/checkpoint_cost.py --images 1020 --epochs 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import insect_exp  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1020, help="training images (the post's)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import tf_keras as keras

    from insect_exp import fit, resilience
    from insect_exp.config import AdamConfig
    from insect_exp.data.pipeline import ImageSplit
    from insect_exp.models.cnn import build_cnn

    rng = np.random.default_rng(0)
    split = ImageSplit(
        rng.integers(0, 255, (args.images, 180, 180, 3), dtype=np.uint8),
        (np.arange(args.images) % 3).astype(np.int32),
        [str(i) for i in range(args.images)],
    )
    val = split.subset(np.arange(96))

    def train(directory: str | None) -> float:
        """Seconds per epoch after the first (which pays for tracing)."""
        keras.utils.set_random_seed(0)
        model = build_cnn((180, 180), 3)
        fit.compile_classifier(model, fit.make_optimizer(AdamConfig()))
        warm = fit.FitSettings(1, 32, 0, AdamConfig(), checkpoint_dir=directory)
        fit.fit(model, split, val, warm, verbose=0)
        settings = fit.FitSettings(args.epochs, 32, 0, AdamConfig(), checkpoint_dir=directory)
        start = time.perf_counter()
        fit.fit(model, split, val, settings, verbose=0)
        return (time.perf_counter() - start) / args.epochs

    plain, checkpointed = [], []
    for _ in range(args.repeats):  # alternating, so that both see the same machine
        plain.append(train(None))
        checkpointed.append(train(tempfile.mkdtemp()))

    keras.utils.set_random_seed(0)
    model = build_cnn((180, 180), 3)
    fit.compile_classifier(model, fit.make_optimizer(AdamConfig()))
    model.fit(split.images[:32].astype("float32"), split.labels[:32], verbose=0)
    checkpoint = resilience.Checkpointer(tempfile.mkdtemp(), "main", 0)
    writes = []
    for epoch in range(5):
        start = time.perf_counter()
        checkpoint(model, epoch, {"val_loss": 1.0 - epoch})  # always a new best: both files
        writes.append(time.perf_counter() - start)

    epoch_plain, epoch_ckpt = statistics.median(plain), statistics.median(checkpointed)
    write = statistics.median(writes)
    print(f"epoch without checkpoints: {epoch_plain:.2f} s (median of {len(plain)})")
    print(f"epoch with checkpoints:    {epoch_ckpt:.2f} s (median of {len(checkpointed)})")
    print(f"one checkpoint write (latest + best): {write * 1000:.0f} ms")
    print(f"cost per epoch: {write / epoch_plain:.1%} (write / epoch)")


if __name__ == "__main__":
    main()
