"""The training process with its collector off during start-up and frozen at exit, or on throughout.

Usage: python benchmarks/gc_startup.py [--root DIR] [--epochs 1] [--repeats 3]

`python -m insect_exp` turns Python's garbage collector off while it imports and builds (Hydra,
TensorFlow, the model), freezes what start-up made before `fit`, and freezes everything again as
the command ends, so that the interpreter's final collections skip TensorFlow's objects. The other
side runs the same command with `gc.disable` and `gc.freeze` made no-ops first: the collector on
throughout, as without the mechanism. Each side runs as its own process, alternating. Printed per
run: wall time, the CPU seconds of the command (its logging process included), the seconds the
collector ran in the training process (gc.callbacks) and the seconds from the interpreter's
atexit hooks to the process's end (its final collections). The wall time of a shared machine is
noisy; the collector's seconds and the exit seconds are not.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A sibling module: these scripts run as benchmarks/NAME.py.
from _timing import cpu, post_sized_folder

# Run in the measured process: count the collector's time, say when atexit ran, run the command.
WRAPPER = """
import atexit, gc, runpy, sys, time
if sys.argv[1] == "on":
    gc.disable = gc.freeze = lambda: None  # the counterfactual: the collector on throughout
spent, began = [0.0], [0.0]
def count(phase, info):
    if phase == "start":
        began[0] = time.perf_counter()
    else:
        spent[0] += time.perf_counter() - began[0]
gc.callbacks.append(count)
atexit.register(lambda: print(f"GC {spent[0]:.3f} ATEXIT {time.time():.3f}", file=sys.stderr))
sys.argv = ["insect_exp", *sys.argv[2:]]
runpy.run_module("insect_exp", run_name="__main__", alter_sys=True)
"""


def one_run(side: str, overrides: list[str], work: Path) -> tuple[float, float, float, float]:
    """Wall seconds, CPU seconds, collector seconds and exit seconds of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, side, *overrides], cwd=work, capture_output=True, text=True
    )
    ended, wall = time.time(), time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{side}: command failed ({done.returncode})\n{done.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    found = re.findall(r"GC ([0-9.]+) ATEXIT ([0-9.]+)", done.stderr)[-1]
    return wall, used, float(found[0]), ended - float(found[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="folder in the reference layout")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="insect_bench_"))
    root = args.root or post_sized_folder(work)
    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    (work / "mlruns").mkdir()
    from insect_exp import tracking

    tracking.prepare_store(uri)  # as a user's mlruns/ after their first run
    print(cpu())
    sides = {"shipped": "off", "collector on": "on"}
    results: dict[str, list[tuple[float, float, float, float]]] = {side: [] for side in sides}
    for i in range(args.repeats):
        for side in list(sides)[i % 2 :] + list(sides)[: i % 2]:
            overrides = [
                "dataset=insects", f"dataset.root={root}", f"epochs={args.epochs}",
                f"mlflow.tracking_uri={uri}", "mlflow.experiment_name=benchmark",
                f"hydra.run.dir={work / f'outputs-{i}-{sides[side]}'}", "seed=123",
            ]  # fmt: skip
            results[side].append(one_run(sides[side], overrides, work))
            wall, used, collector, exiting = results[side][-1]
            print(f"run {i + 1} {side:12s}: wall {wall:6.1f} s  CPU {used:6.1f} s  "
                  f"collector {collector:5.2f} s  exit {exiting:5.2f} s", flush=True)  # fmt: skip
    print()
    for side, runs in results.items():
        medians = [statistics.median(column) for column in zip(*runs, strict=True)]
        print(f"{side:12s} median: wall {medians[0]:6.1f} s  CPU {medians[1]:6.1f} s  "
              f"collector {medians[2]:5.2f} s  exit {medians[3]:5.2f} s")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
