"""The owner tag written into every rule we install, and whether its owner still runs.

The tag is a rule comment (`ipsec-capture g=5 pid=1234 t=1700000000 p=raw-pre-esp`) in both
backends, so `rules list` and `rules cleanup` can tell our rules from anyone else's and a crashed
capture's leftovers from a live one's without any state file. The start time guards against pid
reuse: a pid counts as the owner only if that process started before the rules were written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

TAG_WORD = "ipsec-capture"
_TAG_RE = re.compile(r"ipsec-capture g=(\d+) pid=(\d+) t=(\d+)(?: p=([a-z-]+))?")


@dataclass(frozen=True, slots=True)
class Tag:
    group: int
    pid: int
    started: int  # unix time, seconds
    point: str | None = None  # None on the jump rules from the built-in chains

    def text(self) -> str:
        base = f"{TAG_WORD} g={self.group} pid={self.pid} t={self.started}"
        return f"{base} p={self.point}" if self.point else base

    def for_point(self, point: str) -> Tag:
        return Tag(self.group, self.pid, self.started, point)


def parse_tag(comment: str) -> Tag | None:
    m = _TAG_RE.search(comment)
    if m is None:
        return None
    return Tag(int(m[1]), int(m[2]), int(m[3]), m[4])


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def pid_alive(pid: int, started: int) -> bool:
    """True if `pid` runs and began no later than `started` (so it is the process that tagged)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    # Field 3 (state) follows the last ')' of the comm; field 22 is the start time in clock ticks.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # zombie: dead, merely not reaped yet
        return False
    begun = _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return begun <= started + 2
