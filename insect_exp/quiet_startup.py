"""A quiet TensorFlow start-up: its C++ start-up lines filtered by TF_CPP_MIN_LOG_LEVEL.

TensorFlow's C++ start-up lines (`Could not find cuda drivers`, `failed call to cuInit`, oneDNN and
absl notices) say nothing useful on a CPU-only machine and bury the run's own log. Two things keep
them out, both set up by `insect_exp/__init__.py` before anything imports TensorFlow:

- `TF_CPP_MIN_LOG_LEVEL` defaults to 3 where no NVIDIA GPU is visible (1 elsewhere): TensorFlow
  honours it from the moment its logging is initialised (the `cuInit` error comes after that).
- Some lines are printed while `import tensorflow` loads its shared libraries, before they read
  that variable, so the variable alone does not stop them. While TensorFlow is imported, the
  process's stderr (file descriptor 2) goes through a filter that applies the same level to those
  lines: at level 1 and up, INFO lines and absl's "All log messages before absl::InitializeLog()"
  notice are dropped; WARNING lines at 2, ERROR lines at 3. Every other line passes unchanged.

Set `TF_CPP_MIN_LOG_LEVEL=0` to see everything again. Neither step imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator

from insect_exp.hardware import nvidia_gpu_visible

# absl/glog line prefix: severity letter, MMDD, time, thread id, file:line]
_LOG_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^ \]]+:\d+\] ")
_PRE_INIT_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called"
_LEVELS = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}


def quiet_tensorflow_startup() -> None:
    """Default TF_CPP_MIN_LOG_LEVEL by machine and filter TensorFlow's import-time lines by it.

    Called from insect_exp/__init__.py; does nothing once TensorFlow is imported. A value the user
    set for TF_CPP_MIN_LOG_LEVEL is kept.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1" if nvidia_gpu_visible() else "3")
    if "tensorflow" in sys.modules or os.name != "posix":
        return
    if not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


def min_log_level() -> int:
    """TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it (0 when unset or not a number)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def is_startup_noise(line: bytes, level: int) -> bool:
    """Whether a line TensorFlow prints while it is imported falls below `level`."""
    if level >= 1 and line.startswith(_PRE_INIT_NOTICE):
        return True
    match = _LOG_LINE.match(line)
    return match is not None and _LEVELS[match.group(1)] < level


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Runs the first `import tensorflow` with stderr filtered by `is_startup_noise`."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # once: later imports are TensorFlow's own business
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _FilteredLoader(spec.loader)
        return spec


class _FilteredLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        # The module keeps its own loader, as if this one had never been there.
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        level = min_log_level()
        if level <= 0:
            self._loader.exec_module(module)
            return
        with filtered_stderr(lambda line: is_startup_noise(line, level)):
            self._loader.exec_module(module)


@contextlib.contextmanager
def filtered_stderr(drop: Callable[[bytes], bool]) -> Iterator[None]:
    """Pass what the process writes to file descriptor 2 on, line by line, except what `drop` says.

    Catches C and C++ writes as well as Python's. Lines go on as they come (a thread pumps them),
    so a crash inside the block still shows what came before it.
    """
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        original = os.dup(2)
        read_end, write_end = os.pipe()
    except OSError:
        yield
        return
    out = os.dup(original)  # the pump's own copy: it outlives this block if it must
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        pending = b""
        try:
            with os.fdopen(read_end, "rb", buffering=0) as source:
                while chunk := source.read(65536):
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        if not drop(line):
                            os.write(out, line + b"\n")
                if pending and not drop(pending):
                    os.write(out, pending)
        except OSError:
            pass
        finally:
            os.close(out)

    thread = threading.Thread(target=pump, name="insect_exp-stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end: the pump reads to its end
        os.close(original)
        thread.join(timeout=5)
