"""What the machine offers a run: its cores, its memory, its GPUs. Only TensorFlow's own
device listing (`describe_devices`) imports TensorFlow."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def nvidia_gpu_visible() -> bool:
    """Whether this machine seems to have an NVIDIA GPU (a /dev/nvidia* device or nvidia-smi).

    Cheap and without TensorFlow: it decides how quiet TensorFlow's start-up is, not where the
    model trains.
    """
    if shutil.which("nvidia-smi"):
        return True
    with contextlib.suppress(OSError):
        return any(Path("/dev").glob("nvidia[0-9]*"))
    return False


def cpus() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))  # respects taskset/cgroup CPU limits
    except AttributeError:
        return os.cpu_count() or 1


def memory_bytes() -> int:
    """The memory this process may use: the machine's RAM, or its cgroup's limit if lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # cgroup v2, then v1 (which reports "no limit" as a huge number, above the RAM anyway).
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            total = min(total, int(Path(limit).read_text().strip()))
    return total


def describe_devices() -> str:
    """One line naming the device TensorFlow trains on, e.g. for the run's start-up log.

    `training on GPU:0 (NVIDIA H200, compute capability 9.0) of 1 GPU(s)` or `training on CPU
    (no GPU visible to TensorFlow)`. Imports TensorFlow.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "training on CPU (no GPU visible to TensorFlow)"
    details = {}
    with contextlib.suppress(Exception):
        details = tf.config.experimental.get_device_details(gpus[0])
    name = details.get("device_name", "")
    capability = details.get("compute_capability")
    about = ", ".join(
        part
        for part in (
            name,
            f"compute capability {capability[0]}.{capability[1]}" if capability else "",
        )
        if part
    )
    device = gpus[0].name.replace("/physical_device:", "")
    return f"training on {device}{f' ({about})' if about else ''} of {len(gpus)} GPU(s)"
