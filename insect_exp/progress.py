"""Progress of long work (decoding, cache writing, feature extraction): a bar on a terminal, else a
few log lines."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

log = logging.getLogger(__name__)

_LOG_EVERY_S = 30.0  # without a terminal: a line at most this often, and at each quarter
_QUIET_S = 2.0  # ... but none for work done within this long


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Counts done (and skipped) items of a known total; shows rate and ETA.

    On a terminal (stderr a TTY) it redraws one line, at most 10 times a second. Otherwise it logs
    a first line (with the ETA) once 2 s have passed, then one at each quarter (or every 30 s,
    whichever comes first) and one at the end; work done within 2 s logs nothing.

    Args:
        report: where the lines go without a terminal (default: this module's log, at INFO).
        enabled: False shows nothing.
    """

    def __init__(
        self,
        total: int,
        what: str,
        unit: str = "images",
        stream: TextIO | None = None,
        report: Callable[[str], None] | None = None,
        enabled: bool = True,
    ):
        self.total = max(0, int(total))
        self.what = what
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.report = report or log.info
        self.enabled = enabled
        self.done = 0
        self.skipped = 0
        self.start = time.monotonic()
        self._shown = 0.0
        self._quarter = 0

    def line(self, final: bool = False) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        text = (
            f"{self.what}: {self.done}/{self.total} {self.unit}{skipped}, {rate:.0f} {self.unit}/s"
        )
        if final or self.done >= self.total:
            return f"{text}, took {_duration(elapsed)}"
        if rate > 0:
            text += f", ETA {_duration((self.total - self.done) / rate)}"
        return text

    def update(self, count: int, skipped: int = 0) -> None:
        """`count` more items done, and `skipped` more items given up (they count as done)."""
        self.done += int(count) + int(skipped)
        self.skipped += int(skipped)
        now = time.monotonic()
        if not self.enabled:
            return
        if self.tty:
            if now - self._shown >= 0.1 or self.done >= self.total:
                width = 24
                filled = int(width * self.done / max(self.total, 1))
                bar = "=" * filled + (">" if filled < width else "") + " " * (width - filled - 1)
                self.stream.write(f"\r[{bar[:width]}] {self.line()}\x1b[K")
                self.stream.flush()
                self._shown = now
            return
        if now - self.start < _QUIET_S:
            return
        quarter = 4 * self.done // max(self.total, 1)
        due = quarter > self._quarter or now - self._shown >= _LOG_EVERY_S
        if self.done < self.total and due:
            self._quarter = quarter
            self._shown = now
            self.report(self.line())

    def close(self) -> None:
        """The final line (the bar ends with a newline)."""
        if not self.enabled:
            return
        if self.tty:
            self.update(0)
            self.stream.write("\n")
            self.stream.flush()
        elif time.monotonic() - self.start >= _QUIET_S:
            self.report(self.line(final=True))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def keras_verbosity(stream: TextIO | None = None) -> int:
    """Keras's `verbose` for fit: its bar on a terminal (1), else one line per epoch (2).

    Keras draws its bar on standard output; in a file or a pipe (a SLURM .out, `> run.log`) each
    batch's redraw would stay there as text.
    """
    stream = stream if stream is not None else sys.stdout
    return 1 if getattr(stream, "isatty", lambda: False)() else 2
