"""Side by side: the post's CNN recipe vs `python -m insect_exp`, whole-process wall times.

Usage: python benchmarks/cnn_vs_reference.py [--root DIR] [--epochs 10] [--repeats 1]
                                             [--variant "precision=mixed_bfloat16" ...]

Without --root it generates a ~1,000-image folder like the post's (1,020 train / 180 test images,
3 classes) with the demo generator. Each side runs as its own process, one after the other, so
both pay their imports, data decoding and, for the framework, MLflow logging of params, metrics,
plots and the model. Every framework run logs into one MLflow store, as a user's runs share
mlruns/: the first run also pays for creating the store (about a second).

The framework runs its default config; each --variant adds a framework run with those extra
overrides per repeat, reported as its own row.
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


def framework_val_accuracy(tracking_uri: str, run_name: str) -> float:
    """Final val_accuracy of one framework run in the benchmark's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("benchmark")
    query = f"attributes.run_name = '{run_name}'"
    (run,) = client.search_runs([experiment.experiment_id], query, max_results=1)
    return run.data.metrics["val_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="folder in the reference layout")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each side")
    parser.add_argument(
        "--variant", action="append", default=[], help="extra framework overrides (space-separated)"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="insect_bench_"))
    root = args.root or post_sized_folder(work)
    print(f"data: {root}  epochs: {args.epochs}  work dir: {work}")
    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    (work / "mlruns").mkdir()

    sides = ["reference", "framework", *(f"framework {v}" for v in args.variant)]
    results: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
    for i in range(args.repeats):
        seconds, out = timed(
            [sys.executable, str(HERE / "reference_cnn.py"), str(root), str(args.epochs)], work
        )
        accuracy = float(re.findall(r"REFERENCE val_accuracy=([0-9.]+)", out)[-1])
        results["reference"].append((seconds, accuracy))
        for j, variant in enumerate(["", *args.variant]):
            name = f"benchmark-{i}-{j}"
            seconds, _ = timed(
                [
                    sys.executable, "-m", "insect_exp", "dataset=insects", f"dataset.root={root}",
                    f"epochs={args.epochs}", f"mlflow.tracking_uri={uri}",
                    "mlflow.experiment_name=benchmark", f"mlflow.run_name={name}",
                    f"hydra.run.dir={work / f'outputs-{i}-{j}'}", f"seed={123 + i}",
                    *variant.split(),
                ],
                work,
            )  # fmt: skip
            results[sides[1 + j]].append((seconds, framework_val_accuracy(uri, name)))
        for side, runs in results.items():
            print(f"run {i + 1} {side:30s}: {runs[-1][0]:7.1f} s  val_accuracy {runs[-1][1]:.4f}")

    # Wall times: best of the repeats (the machine may be shared); accuracies: their mean, as the
    # reference shuffles and initialises unseeded (the framework gets seed 123, 124, ...).
    ref_time = min(t for t, _ in results["reference"])
    ref_acc = sum(a for _, a in results["reference"]) / args.repeats
    print(f"reference{'':22s} wall time (best of {args.repeats}) {ref_time:7.1f} s  "
          f"mean val_accuracy {ref_acc:.4f}")  # fmt: skip
    for side in sides[1:]:
        time_ = min(t for t, _ in results[side])
        acc = sum(a for _, a in results[side]) / args.repeats
        print(f"{side:31s} wall time (best of {args.repeats}) {time_:7.1f} s  "
              f"mean val_accuracy {acc:.4f}  ratio {time_ / ref_time:.3f}  "
              f"accuracy {100 * (acc - ref_acc):+.1f} points")  # fmt: skip


if __name__ == "__main__":
    main()
