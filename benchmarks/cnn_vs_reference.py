"""Side by side: the post's CNN recipe vs `python -m insect_exp`, whole-process wall times.

Usage: python benchmarks/cnn_vs_reference.py [--root DIR] [--epochs 10] [--repeats 1]

Without --root it generates a ~1,000-image folder like the post's (1,020 train / 180 test images,
3 classes) with the demo generator. Each side runs as its own process, one after the other, so
both pay their imports, data decoding and, for the framework, MLflow logging of params, metrics,
plots and the model.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

# A sibling module: these scripts run as benchmarks/NAME.py.
from _timing import post_sized_folder, timed

HERE = Path(__file__).resolve().parent


def framework_val_accuracy(tracking_uri: str) -> float:
    """Final val_accuracy of the only run in the benchmark's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("benchmark")
    (run,) = client.search_runs([experiment.experiment_id], max_results=1)
    return run.data.metrics["val_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="folder in the reference layout")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each side")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="insect_bench_"))
    root = args.root or post_sized_folder(work)
    print(f"data: {root}  epochs: {args.epochs}  work dir: {work}")

    results: dict[str, list[tuple[float, float]]] = {"reference": [], "framework": []}
    for i in range(args.repeats):
        seconds, out = timed(
            [sys.executable, str(HERE / "reference_cnn.py"), str(root), str(args.epochs)], work
        )
        accuracy = float(re.findall(r"REFERENCE val_accuracy=([0-9.]+)", out)[-1])
        results["reference"].append((seconds, accuracy))

        uri = f"sqlite:///{work / f'mlruns{i}' / 'mlflow.db'}"
        (work / f"mlruns{i}").mkdir()
        seconds, _ = timed(
            [
                sys.executable, "-m", "insect_exp", "dataset=insects", f"dataset.root={root}",
                f"epochs={args.epochs}", f"mlflow.tracking_uri={uri}",
                "mlflow.experiment_name=benchmark", f"hydra.run.dir={work / f'outputs{i}'}",
            ],
            work,
        )  # fmt: skip
        results["framework"].append((seconds, framework_val_accuracy(uri)))
        for side in results:
            print(f"run {i + 1} {side:9s}: {results[side][-1][0]:7.1f} s  val_accuracy "
                  f"{results[side][-1][1]:.4f}")  # fmt: skip

    ref_time = min(t for t, _ in results["reference"])
    fw_time = min(t for t, _ in results["framework"])
    ref_acc = sum(a for _, a in results["reference"]) / args.repeats
    fw_acc = sum(a for _, a in results["framework"]) / args.repeats
    print(f"reference wall time (best of {args.repeats}): {ref_time:.1f} s")
    print(f"framework wall time (best of {args.repeats}): {fw_time:.1f} s")
    print(f"ratio framework / reference: {fw_time / ref_time:.3f}")
    print(f"val_accuracy reference {ref_acc:.4f}  framework {fw_acc:.4f}  "
          f"difference {100 * (fw_acc - ref_acc):+.1f} points")  # fmt: skip


if __name__ == "__main__":
    main()
