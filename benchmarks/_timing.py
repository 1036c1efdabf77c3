"""What the side-by-side benchmark scripts share."""

import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, str]:
    """Run `cmd` to completion; return wall seconds and its combined output (exit on failure)."""
    seconds, _, output = measured(cmd, cwd, env)
    return seconds, output


def measured(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float, str]:
    """Run `cmd` to completion; wall seconds, its peak RSS in GB, its output (exit on failure).

    The peak counts every process of the command at once: the framework logs to MLflow from a
    second process (insect_exp/tracking/remote.py). It is the larger of the command's own peak
    (wait4's ru_maxrss) and the sum of the RSS of it and its descendants, sampled every 50 ms.
    The sum counts pages the processes share (Python, NumPy) once per process: it errs high.
    """
    start = time.perf_counter()
    out_file = Path(cwd) / f".bench-{os.getpid()}-{time.monotonic_ns()}.log"
    with out_file.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        tree_peak = [0]
        done = threading.Event()
        sampler = threading.Thread(target=_sample_tree, args=(proc.pid, done, tree_peak))
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = out_file.read_text(errors="replace")
    out_file.unlink()
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    return elapsed, max(usage.ru_maxrss * 1024, tree_peak[0]) / 1024**3, output


def _sample_tree(root: int, done: threading.Event, peak: list[int]) -> None:
    """The largest sum of RSS (bytes) of `root` and its descendants, until `done`."""
    page = os.sysconf("SC_PAGE_SIZE")
    while not done.wait(0.05):
        parents = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                    parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        tree, grew = {root}, True
        while grew:
            found = {pid for pid, parent in parents.items() if parent in tree} - tree
            grew = bool(found)
            tree |= found
        total = 0
        for pid in tree:
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            except (OSError, ValueError, IndexError):
                continue
        peak[0] = max(peak[0], total)


def cpu() -> str:
    """The CPU and the flags that decide TensorFlow's speed here (machines differ by 4x)."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    have = " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"
    return f"{model}, {os.cpu_count()} cores, flags: {have}"


def summary(values: list[float]) -> str:
    """Best and median of repeated wall times."""
    return f"best {min(values):7.1f} s  median {statistics.median(values):7.1f} s"


def post_sized_folder(work: Path) -> Path:
    """A generated folder the size of the post's: 1,020 train / 180 test images, 3 classes."""
    from insect_exp.data.demo import ensure_demo_dataset

    return ensure_demo_dataset(work / "data", train_per_class=340, test_per_class=60)
