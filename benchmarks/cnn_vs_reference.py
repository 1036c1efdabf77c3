"""Side by side: the post's CNN recipe (bare, and with MLflow autolog) vs `python -m insect_exp`.

Usage: python benchmarks/cnn_vs_reference.py [--root DIR] [--epochs 10] [--repeats 3]
                                             [--variant "precision=mixed_bfloat16" ...]
                                             [--precision] [--augment-cost POLICY ...]

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

With --augment-cost POLICY ... it measures only what an augmentation policy costs an epoch of the
demo CNN (180x180, batches of 32): each side (no policy, then each POLICY at its defaults, e.g.
randaugment, trivialaugment) trains --epochs epochs through insect_exp.fit in a fresh process,
the order rotating each repeat; each epoch's wall and CPU time (the process's, all threads) are
taken at its end, validation included. The first epoch (tracing) is left out: printed are the
best and median of the others, and each policy's ratio to no policy.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
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


def epoch_times(root: Path, epochs: int, policy: str, seed: int) -> None:
    """Train the demo CNN on root for `epochs` with `policy`; print each epoch's wall and CPU s."""
    import json
    import time

    import insect_exp  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
    from insect_exp import fit, models
    from insect_exp.config import AdamConfig, AugmentConfig, CNNConfig
    from insect_exp.data.pipeline import load
    from insect_exp.data.scan import scan

    data = load(scan(root), (180, 180), 0.0)
    augment = AugmentConfig(policy=policy)
    model = models.recipe_for(CNNConfig(augment=augment)).build(len(data.class_names))
    fit.compile_classifier(model, fit.make_optimizer(AdamConfig()))
    settings = fit.FitSettings(epochs, 32, seed, AdamConfig(), augment=augment)
    marks = [(time.perf_counter(), time.process_time())]

    def sink(metrics: dict, _step: int) -> None:
        if "val_accuracy" in metrics:  # the epoch's end, validation done
            marks.append((time.perf_counter(), time.process_time()))

    fit.fit(model, data.train, data.val, settings, sink, verbose=0)
    walls = [b[0] - a[0] for a, b in itertools.pairwise(marks)]
    cpus = [b[1] - a[1] for a, b in itertools.pairwise(marks)]
    print("EPOCHS " + json.dumps({"wall": walls, "cpu": cpus}))


def augment_cost(root: Path, work: Path, args: argparse.Namespace) -> None:
    """Per-epoch wall and CPU time of the demo CNN with each policy against none."""
    import json

    sides = ["none", *args.augment_cost]
    steady: dict[str, dict[str, list[float]]] = {s: {"wall": [], "cpu": []} for s in sides}
    for i in range(args.repeats):
        for side in sides[i % len(sides) :] + sides[: i % len(sides)]:
            command = [sys.executable, __file__, "--epoch-side", side, "--root", str(root),
                       "--epochs", str(args.epochs), "--seed", str(123 + i)]  # fmt: skip
            _, _, out = measured(command, work)
            times = json.loads(out.split("EPOCHS ", 1)[1].splitlines()[0])
            for kind in ("wall", "cpu"):
                steady[side][kind] += times[kind][1:]
            walls = " ".join(f"{t:.1f}" for t in times["wall"])
            cpus = " ".join(f"{t:.1f}" for t in times["cpu"])
            print(f"run {i + 1} {side:15s}: epochs {walls} s wall, {cpus} s CPU", flush=True)
    print()
    for side in sides:
        wall, cpu_s = steady[side]["wall"], steady[side]["cpu"]
        ratio = ""
        if side != "none":
            base = steady["none"]
            ratio = (f"  / none: wall {min(wall) / min(base['wall']):.3f} (best) "
                     f"{statistics.median(wall) / statistics.median(base['wall']):.3f} (median), "
                     f"cpu {min(cpu_s) / min(base['cpu']):.3f} (best)")  # fmt: skip
        print(f"{side:15s} epoch wall best {min(wall):6.1f} s median {statistics.median(wall):6.1f}"
              f" s; cpu best {min(cpu_s):6.1f} s median {statistics.median(cpu_s):6.1f} s"
              f"{ratio}")  # fmt: skip


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
    parser.add_argument(
        "--augment-cost", nargs="+", metavar="POLICY", help="only the per-epoch cost of policies"
    )
    parser.add_argument("--epoch-side", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=123, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epoch_side:
        epoch_times(args.root, args.epochs, args.epoch_side, args.seed)
        return

    work = Path(tempfile.mkdtemp(prefix="insect_bench_"))
    root = args.root or post_sized_folder(work)
    print(cpu())
    print(f"data: {root}  epochs: {args.epochs}  repeats: {args.repeats}  work dir: {work}")
    if args.augment_cost:
        augment_cost(root, work, args)
        return
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
