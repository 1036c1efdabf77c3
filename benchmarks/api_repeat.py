"""Repeated `insect_exp.train()` calls in one process, as a notebook makes them: peak RSS each.

Usage: python benchmarks/api_repeat.py [--calls 5] [--epochs 1] [--image-size 64]

Each call trains the demo data's CNN from the same temp launch dir (its own SQLite store, no model
logged). Printed per call: the process's peak RSS so far (getrusage's ru_maxrss, which only grows)
and the current RSS from /proc, and the call's val_accuracy. A state leak between calls (graphs
kept by Keras's session, datasets or models kept alive) shows as RSS that grows call after call;
the issue's bound is the fifth call's peak within 10% of the first's.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path


def current_rss_mib() -> float:
    """The process's resident set now, from /proc (0 where there is none)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return 0.0
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    import insect_exp

    with tempfile.TemporaryDirectory(prefix="api-repeat-") as tmp:
        os.chdir(tmp)
        os.environ.setdefault("INSECT_EXP_CACHE_DIR", str(Path(tmp) / "cache"))
        peaks = []
        for call in range(1, args.calls + 1):
            began, cpu = time.perf_counter(), time.process_time()
            result = insect_exp.train(
                epochs=args.epochs,
                model__image_size=[args.image_size, args.image_size],
                mlflow__log_model=False,
            )
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            peaks.append(peak)
            print(
                f"call {call}: peak RSS {peak:.0f} MiB, RSS now {current_rss_mib():.0f} MiB, "
                f"val_accuracy {result.metrics['val_accuracy']:.4f}, "
                f"{time.perf_counter() - began:.1f} s ({time.process_time() - cpu:.1f} s CPU), "
                f"{result.status}",
                flush=True,
            )
        growth = 100 * (peaks[-1] / peaks[0] - 1)
        print(f"peak RSS, call {args.calls} against call 1: {growth:+.1f}%")


if __name__ == "__main__":
    main()
