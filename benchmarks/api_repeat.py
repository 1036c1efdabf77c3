"""Repeated `insect_exp.train()` calls in one process, as a notebook makes them: peak RSS each.

Usage: python benchmarks/api_repeat.py [--calls 5] [--epochs 1] [--image-size 64] [--breakdown]

Each call trains the demo data's CNN from the same temp launch dir (its own SQLite store, no model
logged). Printed per call: the process's peak RSS so far (getrusage's ru_maxrss, which only grows)
and the current RSS from /proc, and the call's val_accuracy. A state leak between calls (graphs
kept by Keras's session, datasets or models kept alive) shows as RSS that grows call after call;
the issue's bound is the fifth call's peak within 10% of the first's.

With --breakdown, after each call (and a full collection): the resident set split into anonymous
and file-backed memory (loaded libraries' code is file-backed), glibc malloc's bytes in use and
free-but-kept, loaded modules, live tf.Graph objects and live Python objects: a leak grows the
objects or the bytes in use; code loaded grows modules and file-backed memory; the allocator's
kept heap grows only its free bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import sys
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


class MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (glibc 2.33+): the heap's bytes over all malloc arenas."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd")
        + ("usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def breakdown() -> str:
    """Where the resident set is, after a full collection (Linux with glibc 2.33+ only)."""
    import tensorflow as tf

    gc.collect()
    rollup = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        rollup[key] = int(value.split()[0]) / 1024
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2
    heap = mallinfo2()
    objects = gc.get_objects()
    return (
        f"anon {rollup['Anonymous']:.0f} MiB, file-backed "
        f"{rollup['Rss'] - rollup['Anonymous']:.0f} MiB; malloc in use "
        f"{(heap.uordblks + heap.hblkhd) / 2**20:.0f} MiB, free-but-kept "
        f"{heap.fordblks / 2**20:.0f} MiB; {len(sys.modules)} modules, "
        f"{sum(isinstance(o, tf.Graph) for o in objects)} tf.Graphs, {len(objects)} objects"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--breakdown", action="store_true", help="where the RSS is, per call")
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
            if args.breakdown:
                print(f"  {breakdown()}", flush=True)
        growth = 100 * (peaks[-1] / peaks[0] - 1)
        print(f"peak RSS, call {args.calls} against call 1: {growth:+.1f}%")


if __name__ == "__main__":
    main()
