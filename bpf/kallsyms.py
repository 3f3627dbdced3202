"""Kernel addresses -> `function+0xoff` through /proc/kallsyms (kfree_skb locations).

Loaded once into two sorted parallel lists and searched with bisect: a drop storm symbolizes at
list-lookup speed, with no per-symbol objects. Needs root (otherwise every address reads 0).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

KALLSYMS = "/proc/kallsyms"
_TEXT_TYPES = frozenset("tTwW")


class Kallsyms:
    def __init__(self, path: str = KALLSYMS) -> None:
        pairs: list[tuple[int, str]] = []
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or parts[1] not in _TEXT_TYPES:
                    continue
                addr = int(parts[0], 16)
                if addr:
                    pairs.append((addr, parts[2]))
        pairs.sort()
        self._addrs = [a for a, _ in pairs]
        self._names = [n for _, n in pairs]

    def __len__(self) -> int:
        return len(self._addrs)

    @property
    def readable(self) -> bool:
        """False when addresses are hidden (not root, kptr_restrict): symbolizing is impossible."""
        return bool(self._addrs)

    def lookup(self, addr: int) -> tuple[str, int] | None:
        """(function, offset) of the text symbol containing `addr`, or None."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0:
            return None
        return self._names[i], addr - self._addrs[i]

    def symbolize(self, addr: int) -> str:
        """`xfrm_input+0x2de` as the kernel's %pS prints it; the hex address when unknown."""
        hit = self.lookup(addr)
        if hit is None:
            return f"0x{addr:x}"
        return f"{hit[0]}+0x{hit[1]:x}"

    def address(self, name: str) -> int | None:
        """Start address of a function (first of same-named local symbols)."""
        for a, n in zip(self._addrs, self._names, strict=True):
            if n == name:
                return a
        return None

    def extents(self, wanted: Callable[[str], bool]) -> list[tuple[int, int]]:
        """Sorted [start, end) of every function whose name `wanted` accepts (a function ends
        where the next text symbol begins), neighbours merged: the drop locations a BPF filter
        tests in the kernel. The last symbol of the table has no end: it is left out."""
        out: list[tuple[int, int]] = []
        addrs, names = self._addrs, self._names
        for i, (start, name) in enumerate(zip(addrs, names, strict=True)):
            if not wanted(name):
                continue
            j = bisect.bisect_right(addrs, start, i)  # past aliases at the same address
            if j == len(addrs):
                continue
            end = addrs[j]
            if out and out[-1][1] >= start:
                out[-1] = (out[-1][0], max(end, out[-1][1]))
            else:
                out.append((start, end))
        return out
