"""The live status line on stderr: packets per capture point, rate, drops, file size.

On a terminal it redraws one line twice a second; otherwise (a log file, a CI job) it prints a
full line every few seconds, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

TTY_INTERVAL = 0.5
LOG_INTERVAL = 5.0


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class StatusLine:
    def __init__(self, stream: TextIO = sys.stderr, interval: float | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = interval if interval is not None else (TTY_INTERVAL if self.tty else LOG_INTERVAL)
        self._last = time.monotonic()
        self._last_total = 0
        self._shown = False

    def due(self, now: float) -> bool:
        return now - self._last >= self.interval

    def show(self, now: float, points: dict[str, int], total: int, lost: int, size: int) -> None:
        rate = (total - self._last_total) / max(now - self._last, 1e-9)
        self._last, self._last_total = now, total
        per_point = " ".join(f"{name} {n}" for name, n in points.items()) or "no packets yet"
        line = f"{total} packets ({rate:,.0f}/s) | {per_point} | drops {lost} | {human_bytes(size)}"
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Leave the terminal on a fresh line before the summary."""
        if self.tty and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
