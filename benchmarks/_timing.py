"""What the side-by-side benchmark scripts share."""

import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    """Run `cmd` to completion; return wall seconds and its combined output (exit on failure)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    return elapsed, output


def post_sized_folder(work: Path) -> Path:
    """A generated folder the size of the post's: 1,020 train / 180 test images, 3 classes."""
    from insect_exp.data.demo import ensure_demo_dataset

    return ensure_demo_dataset(work / "data", train_per_class=340, test_per_class=60)
