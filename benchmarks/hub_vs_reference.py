"""Side by side: the post's TF Hub recipe vs `python -m insect_exp model=hub_mobilenet`.

Usage: python benchmarks/hub_vs_reference.py [--root DIR] [--handle DIR] [--epochs 10] [--repeats 1]

Both sides load the same backbone: --handle, else an UNTRAINED (random-weight) MobileNetV2
exported once into the work dir (offline-safe; its accuracy is low and only worth comparing
between the two sides). Without --root a ~1,000-image folder like the post's (1,020 train / 180
test, 3 classes) is generated. Each side runs as its own process, timed whole: imports, decoding,
training, the test-split evaluation and, for the framework, all MLflow logging (plots, model).
The framework's peak RSS is printed too (process tree, `_timing.measured`).
Targets: framework / reference wall time <= 0.18 (best and median of --repeats alternating runs,
as the machine may be shared), test accuracy within 2 points.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

# A sibling module: these scripts run as benchmarks/NAME.py.
from _timing import measured, post_sized_folder, timed

HERE = Path(__file__).resolve().parent


def framework_metrics(tracking_uri: str, run_name: str) -> dict[str, float]:
    """Final metrics of one framework run of the benchmark."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("benchmark")
    query = f"attributes.run_name = '{run_name}'"
    (run,) = client.search_runs([experiment.experiment_id], query, max_results=1)
    return run.data.metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="folder in the reference layout")
    parser.add_argument("--handle", help="feature-vector SavedModel dir or URL for both sides")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each side")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="insect_hub_bench_"))
    root = args.root or post_sized_folder(work)
    handle = args.handle
    if handle is None:
        from insect_exp.models.export_untrained import export

        handle = str(export(work / "untrained", classifier=False)["feature_vector"])
        print("backbone: UNTRAINED MobileNetV2 (random weights): compare accuracies only")
    print(f"data: {root}  handle: {handle}  epochs: {args.epochs}  work dir: {work}")

    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    (work / "mlruns").mkdir()
    reference: list[tuple[float, float]] = []
    framework: list[tuple[float, float, float]] = []
    peaks: list[float] = []  # the framework's peak RSS, GB
    for i in range(args.repeats):
        seconds, out = timed(
            [sys.executable, str(HERE / "reference_hub.py"), str(root), handle, str(args.epochs)],
            work,
        )
        reference.append(
            (seconds, float(re.findall(r"REFERENCE test_accuracy=([0-9.]+)", out)[-1]))
        )
        seconds, peak, _ = measured(
            [
                sys.executable, "-m", "insect_exp", "model=hub_mobilenet", f"model.handle={handle}",
                "dataset=insects", f"dataset.root={root}", f"epochs={args.epochs}",
                f"mlflow.tracking_uri={uri}", "mlflow.experiment_name=benchmark",
                f"mlflow.run_name=benchmark-{i}", f"hydra.run.dir={work / f'outputs{i}'}",
                f"seed={123 + i}",
            ],
            work,
        )  # fmt: skip
        metrics = framework_metrics(uri, f"benchmark-{i}")
        framework.append((seconds, metrics["test_accuracy"], metrics["backbone_images_computed"]))
        peaks.append(peak)
        print(f"run {i + 1}: reference {reference[-1][0]:6.1f} s, test_accuracy "
              f"{reference[-1][1]:.4f}; framework {seconds:6.1f} s, test_accuracy "
              f"{framework[-1][1]:.4f}, backbone ran on {framework[-1][2]:.0f} images, peak RSS "
              f"{peak:.2f} GB")  # fmt: skip

    # Wall times: best and median of the repeats (the machine may be shared); accuracies: their
    # mean, as the reference shuffles and initialises unseeded (the framework gets seed 123, ...).
    ref_times = [t for t, _ in reference]
    fw_times = [t for t, _, _ in framework]
    ref_acc = sum(a for _, a in reference) / len(reference)
    fw_acc = sum(a for _, a, _ in framework) / len(framework)
    print(f"reference wall time: best {min(ref_times):7.1f} s  median "
          f"{statistics.median(ref_times):7.1f} s  mean test_accuracy {ref_acc:.4f}")  # fmt: skip
    print(f"framework wall time: best {min(fw_times):7.1f} s  median "
          f"{statistics.median(fw_times):7.1f} s  mean test_accuracy {fw_acc:.4f}")  # fmt: skip
    best = min(fw_times) / min(ref_times)
    median = statistics.median(fw_times) / statistics.median(ref_times)
    print(
        f"ratio framework / reference: {best:.3f} (best)  {median:.3f} (median)  (target <= 0.18)"
    )
    print(f"framework peak RSS: {min(peaks):.2f}-{max(peaks):.2f} GB")
    print(f"test_accuracy difference: {100 * (fw_acc - ref_acc):+.1f} points  (target within 2)")


if __name__ == "__main__":
    main()
