"""Side by side: the post's CNN recipe (bare, and with MLflow autolog) vs `python -m insect_exp`.

Usage: python benchmarks/cnn_vs_reference.py [--root DIR] [--epochs 10] [--repeats 3]
                                             [--variant "precision=mixed_bfloat16" ...]
                                             [--precision]

Without --root it generates a ~1,000-image folder like the post's (1,020 train / 180 test images,
3 classes) with the demo generator. Each side runs as its own process, so every side pays its
imports, data decoding and logging: the framework logs params, metrics, plots and the model; the
autolog side is the post's script with `mlflow.tensorflow.autolog()` around `fit` (it needs the
`tensorboard` package in this environment and is left out, with a note, without it). Every
framework run logs into one MLflow store, as a user's runs share mlruns/; that store and the
autolog side's are created before the first timed run.

Each repeat runs every side once, the order rotating from one repeat to the next, so that a
noisy moment of a shared machine does not always fall on the same side. Printed: the CPU and its
flags; per side the best and median wall time, the peak RSS of its processes together (see
_timing.measured) and the mean and spread of its val_accuracy; the framework's ratios to both
references (best to best, median to median) and its fixed overhead (framework minus reference,
best to best: run with --epochs 1 for the figure the performance issue names).

The framework runs its default config; each --variant adds a framework side with those extra
overrides. --precision adds the side `precision=float32` and compares the default (precision=auto)
with it: the policy auto chose on this machine (the runs' `precision_used`), time, and the paired
val_accuracy difference over the seeds with its Student's t interval (insect_exp.stats).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import sys
import tempfile
from pathlib import Path

# A sibling module: these scripts run as benchmarks/NAME.py.
from _timing import cpu, measured, post_sized_folder

HERE = Path(__file__).resolve().parent


FLOAT32_SIDE = "framework precision=float32"


def framework_run(tracking_uri: str, run_name: str):
    """One framework run of the benchmark's MLflow store, by name."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("benchmark")
    query = f"attributes.run_name = '{run_name}'"
    (run,) = client.search_runs([experiment.experiment_id], query, max_results=1)
    return run


def compare_precisions(
    results: dict[str, list[tuple[float, float, float]]], used: set[str]
) -> None:
    """The default (precision=auto) against precision=float32: what auto chose, the time ratio
    and the paired accuracy difference (repeat i of both sides has seed 123 + i)."""
    from insect_exp.stats import mean_interval

    auto, full = results["framework"], results[FLOAT32_SIDE]
    ratio = min(t for t, _, _ in auto) / min(t for t, _, _ in full)
    gap = mean_interval([a[2] - f[2] for a, f in zip(auto, full, strict=True)])
    print(f"precision=auto chose {', '.join(sorted(used))} on this machine; time against "
          f"float32 {ratio:.3f} (best to best); val_accuracy auto - float32 {gap.mean:+.4f} "
          f"[{gap.low:+.4f}, {gap.high:+.4f}] (95%, {gap.n} paired seeds)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="folder in the reference layout")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument(
        "--variant", action="append", default=[], help="extra framework overrides (space-separated)"
    )
    parser.add_argument(
        "--precision", action="store_true", help="compare precision=auto with precision=float32"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="insect_bench_"))
    root = args.root or post_sized_folder(work)
    print(cpu())
    print(f"data: {root}  epochs: {args.epochs}  repeats: {args.repeats}  work dir: {work}")
    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    (work / "mlruns").mkdir()
    autolog_uri = f"sqlite:///{work / 'autolog' / 'mlflow.db'}"
    (work / "autolog").mkdir()
    # Both stores exist before the first timed run, as a user's mlruns/ does after their first
    # run: creating one costs seconds that neither side pays again.
    from insect_exp import tracking

    tracking.prepare_store(uri)
    tracking.prepare_store(autolog_uri)

    reference = [sys.executable, str(HERE / "reference_cnn.py"), str(root), str(args.epochs)]
    sides: dict[str, object] = {"reference": reference}
    if importlib.util.find_spec("tensorboard") is not None:
        sides["reference + autolog"] = [*reference, "--autolog", autolog_uri]
    else:
        print("note: no reference + autolog side (mlflow.tensorflow.autolog needs tensorboard: "
              "pip install tensorboard in this environment)")  # fmt: skip
    variants = ["", *args.variant, *(["precision=float32"] if args.precision else [])]
    for variant in variants:
        sides[f"framework {variant}".strip()] = variant
    used: set[str] = set()  # the policies precision=auto chose

    def run(side: str, i: int) -> tuple[float, float, float]:
        command = sides[side]
        if isinstance(command, list):
            seconds, rss, out = measured(command, work)
            return seconds, rss, float(re.findall(r"REFERENCE val_accuracy=([0-9.]+)", out)[-1])
        # No '=' or space: the name goes into hydra.run.dir, which Hydra parses.
        name = f"benchmark-{i}-" + re.sub(r"\W", "_", side)
        seconds, rss, _ = measured(
            [
                sys.executable, "-m", "insect_exp", "dataset=insects", f"dataset.root={root}",
                f"epochs={args.epochs}", f"mlflow.tracking_uri={uri}",
                "mlflow.experiment_name=benchmark", f"mlflow.run_name={name}",
                f"hydra.run.dir={work / f'outputs-{name}'}", f"seed={123 + i}",
                *str(command).split(),
            ],
            work,
        )  # fmt: skip
        run = framework_run(uri, name)
        if side == "framework":
            used.add(run.data.params.get("precision_used", "float32"))
        return seconds, rss, run.data.metrics["val_accuracy"]

    names = list(sides)
    results: dict[str, list[tuple[float, float, float]]] = {side: [] for side in names}
    for i in range(args.repeats):
        order = names[i % len(names) :] + names[: i % len(names)]
        for side in order:
            results[side].append(run(side, i))
            seconds, rss, accuracy = results[side][-1]
            print(f"run {i + 1} {side:28s}: {seconds:7.1f} s  peak RSS {rss:5.2f} GB  "
                  f"val_accuracy {accuracy:.4f}", flush=True)  # fmt: skip

    # Wall times: best and median of the repeats; accuracies: mean and spread, as the reference
    # shuffles and initialises unseeded (the framework gets seed 123, 124, ...).
    print()
    stats = {}
    for side in names:
        times = [t for t, _, _ in results[side]]
        accuracies = [a for _, _, a in results[side]]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        stats[side] = (min(times), statistics.median(times))
        print(f"{side:28s} best {min(times):7.1f} s  median {statistics.median(times):7.1f} s  "
              f"peak RSS {max(r for _, r, _ in results[side]):5.2f} GB  "
              f"val_accuracy {statistics.mean(accuracies):.4f} +- {spread:.4f}")  # fmt: skip
    for side in names:
        if not side.startswith("framework"):
            continue
        for anchor in (n for n in names if n.startswith("reference")):
            best = stats[side][0] / stats[anchor][0]
            median = stats[side][1] / stats[anchor][1]
            print(f"{side} / {anchor}: {best:.3f} (best)  {median:.3f} (median)")
        overhead = stats[side][0] - stats["reference"][0]
        print(f"{side} minus reference (best to best): {overhead:+.1f} s")
    if args.precision:
        compare_precisions(results, used)


if __name__ == "__main__":
    main()
