"""A strong preset against its reference: experiment=reference_X and experiment=strong_X, N seeds.

Usage: python benchmarks/presets.py [--model cnn|hub] [--seeds 5] [--first-seed S] [--root DIR]
                                    [--handle H] [OVERRIDE ...]

Without --root it trains on a generated folder the size of the post's (1,020 train / 180 test
images, 3 classes). Each preset runs through the product, `python -m insect_exp
experiment=<preset> replicates=N` (seeds 123 .. 122+N on both sides; with --first-seed S, the
sweep `-m seed=S,...,S+N-1`: seeds a recipe was not chosen on), into one MLflow store in the work
dir, then `python -m insect_exp.compare` scores the two sweeps on the same
test images (each as the ensemble of its replicates: McNemar and a paired bootstrap interval).
Printed: each side's mean test accuracy with its 95% Student's t interval over the seeds, and
the margin, strong minus reference, as the mean of the per-seed differences (seed i against seed
i: the same split and batch order) with its t interval (insect_exp.stats.mean_interval); then the
comparison's own verdict. Wall and CPU time (children's, all threads) per side, for scale.

Both sides skip the Grad-CAM and top-losses reports (report.gradcam_images=0,
report.top_losses=0): they change no score, only the time. The models are logged: the comparison
loads them.

--model hub needs a real (pretrained) feature-vector handle to say anything: --handle URL or DIR
(else $INSECT_EXP_HUB_HANDLE, else the tfhub.dev URL, which needs the network). An untrained
backbone (`python -m insect_exp.models.export_untrained DIR`) runs it, but its accuracies measure
nothing. The reference_hub side's ImageNet preview is turned off (it needs a classifier handle).
Extra OVERRIDEs go to both sides (e.g. model.image_size=[96,96] for a quicker look).
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

# A sibling module: these scripts run as benchmarks/NAME.py.
from _timing import cpu, measured, post_sized_folder

QUICK = ("report.gradcam_images=0", "report.top_losses=0")


def children_cpu_s() -> float:
    """CPU seconds (user + system) of every finished child process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def seeds(count: int, first: int | None) -> list[str]:
    """The command line's seeds: replicates=N from the presets' seed, else a sweep from FIRST
    (replicates refuses a seed= beside it)."""
    if first is None:
        return [f"replicates={count}"]
    return ["-m", "seed=" + ",".join(str(first + i) for i in range(count))]  # -m first: a flag


def train_preset(preset: str, args: argparse.Namespace, root: Path, uri: str) -> str:
    """Train `preset` with replicates=N through the CLI; print its time; return the sweep's
    parent run id."""
    from mlflow.tracking import MlflowClient

    extra = list(args.overrides)
    if args.model == "hub":
        extra.append("model.preview.enabled=false")
        if args.handle:
            extra.append(f"model.handle={args.handle}")
    command = [
        sys.executable, "-m", "insect_exp", *seeds(args.seeds, args.first_seed),
        f"experiment={preset}", "dataset=insects", f"dataset.root={root}",
        f"mlflow.tracking_uri={uri}", f"mlflow.experiment_name={preset}",
        f"hydra.sweep.dir={args.work / f'sweep-{preset}'}", *QUICK, *extra,
    ]  # fmt: skip
    before = children_cpu_s()
    seconds, rss, _ = measured(command, args.work)
    print(f"{preset}: {seconds:.0f} s wall, {children_cpu_s() - before:.0f} s CPU for "
          f"{args.seeds} runs, peak RSS {rss:.2f} GB", flush=True)  # fmt: skip
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(preset)
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parent.info.run_id


def test_accuracies(uri: str, parent_id: str) -> dict[int, float]:
    """The sweep's finished children's test_accuracy, by seed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    query = f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'"
    children = client.search_runs([parent.info.experiment_id], query)
    return {int(c.data.params["seed"]): c.data.metrics["test_accuracy"] for c in children}


def report(reference: dict[int, float], strong: dict[int, float], names: list[str]) -> None:
    """Each side's mean test accuracy over seeds and the paired margin, with 95% t intervals."""
    from insect_exp.stats import mean_interval

    for name, values in zip(names, (reference, strong), strict=True):
        each = " ".join(f"{values[s]:.4f}" for s in sorted(values))
        m = mean_interval(list(values.values()))
        print(f"{name:14s} test_accuracy {m.mean:.4f} [{m.low:.4f}, {m.high:.4f}] "
              f"(95%, n={m.n}; seeds {min(values)}..{max(values)}: {each})")  # fmt: skip
    seeds = sorted(set(reference) & set(strong))
    gap = mean_interval([strong[s] - reference[s] for s in seeds])
    print(f"margin {names[1]} - {names[0]}: {gap.mean:+.4f} [{gap.low:+.4f}, {gap.high:+.4f}] "
          f"(95% t interval of {gap.n} paired seeds)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("cnn", "hub"), default="cnn")
    parser.add_argument("--seeds", type=int, default=5, help="replicates of each preset")
    parser.add_argument("--first-seed", type=int, help="seeds from this one (default: 123)")
    parser.add_argument("--root", type=Path, help="folder in the reference layout")
    parser.add_argument("--handle", help="hub: the feature-vector handle (URL or SavedModel dir)")
    parser.add_argument("overrides", nargs="*", help="extra overrides for both sides")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds must be 2 or more: an interval needs two seeds")

    args.work = Path(tempfile.mkdtemp(prefix="insect_presets_"))
    root = args.root or post_sized_folder(args.work)
    uri = f"sqlite:///{args.work / 'mlflow.db'}"
    print(cpu())
    print(f"data: {root}  seeds: {args.seeds}  work dir: {args.work}")
    names = [f"reference_{args.model}", f"strong_{args.model}"]
    parents = [train_preset(name, args, root, uri) for name in names]
    report(*(test_accuracies(uri, p) for p in parents), names)
    compare = [sys.executable, "-m", "insect_exp.compare", *(f"runs:/{p}" for p in parents),
               f"mlflow.tracking_uri={uri}"]  # fmt: skip
    out = subprocess.run(compare, cwd=args.work, capture_output=True, text=True, check=False)
    verdict = [line for line in out.stdout.splitlines() if not re.match(r"(MLflow|Open)", line)]
    print("\n".join(verdict) or out.stderr[-2000:])


if __name__ == "__main__":
    main()
