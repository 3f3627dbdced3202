"""Two bundles from the two ends of a tunnel, joined by (SPI, seq): what A sent, whether it arrived
at B, and B's verdict on it (and the same the other way).

Streams both joined-packet sequences; a packet sent waits `window_ns` for its arrival (the two
hosts' clocks need only agree to within the window). Counts per SPI and path, nothing per packet.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ipsec_capture.rules.points import ESP
from ipsec_capture.wire import SECOND

from .packet import FAILED, OK, Packet


@dataclass(slots=True)
class PathRow:
    spi: int
    sender: str
    receiver: str
    src: str = ""
    dst: str = ""
    sent: int = 0
    arrived: int = 0
    lost: int = 0
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    unknown: int = 0
    unsent: int = 0  # received at the receiver, never seen leaving the sender

    def to_dict(self) -> dict[str, Any]:
        return {"spi": f"0x{self.spi:08x}", "from": self.sender, "to": self.receiver, "src": self.src,
                "dst": self.dst, "sent": self.sent, "arrived": self.arrived, "lost": self.lost, "ok": self.ok,
                "failed": dict(sorted(self.failed.items())), "unknown": self.unknown, "unsent": self.unsent}


def _tagged(side: int, packets: Iterable[Packet]) -> Iterator[tuple[int, int, Packet]]:
    for p in packets:
        if p.kind == ESP and p.spi is not None:
            yield p.time_ns, side, p


def join_peers(a_name: str, a: Iterable[Packet], b_name: str, b: Iterable[Packet],
               window_ns: int = 5 * SECOND) -> dict[str, Any]:
    names = (a_name, b_name)
    rows: dict[tuple[int, int], PathRow] = {}
    sent: dict[tuple[int, int, int], Packet] = {}  # (sender side, spi, seq) -> sent packet
    recv: dict[tuple[int, int, int], Packet] = {}  # (receiver side, spi, seq) -> arrived first
    order: deque[tuple[int, str, tuple[int, int, int]]] = deque()

    def row(sender: int, p: Packet) -> PathRow:
        r = rows.get((sender, p.spi))
        if r is None:
            r = rows[(sender, p.spi)] = PathRow(p.spi, names[sender], names[1 - sender], p.src, p.dst)
        return r

    def verdict(r: PathRow, p: Packet) -> None:
        if p.verdict == OK:
            r.ok += 1
        elif p.verdict == FAILED:
            c = p.cause or "other"
            r.failed[c] = r.failed.get(c, 0) + 1
        else:
            r.unknown += 1

    def expire(now: int | None) -> None:
        while order and (now is None or order[0][0] + window_ns < now):
            _, what, key = order.popleft()
            if what == "sent":
                p = sent.pop(key, None)
                if p is not None:
                    row(key[0], p).lost += 1
            else:
                p = recv.pop(key, None)
                if p is not None:
                    r = row(1 - key[0], p)
                    r.unsent += 1
                    verdict(r, p)

    for t, side, p in heapq.merge(_tagged(0, a), _tagged(1, b), key=lambda x: x[0]):
        expire(t)
        seq = p.seq or 0
        if p.direction == "out":
            r = row(side, p)
            r.sent += 1
            early = recv.pop((1 - side, p.spi, seq), None)
            if early is not None:  # the receiver's clock is behind: it logged the arrival first
                r.arrived += 1
                verdict(r, early)
            else:
                sent[(side, p.spi, seq)] = p
                order.append((t, "sent", (side, p.spi, seq)))
        else:
            mine = sent.pop((1 - side, p.spi, seq), None)
            if mine is not None:
                r = row(1 - side, p)
                r.arrived += 1
                verdict(r, p)
            else:
                recv[(side, p.spi, seq)] = p
                order.append((t, "recv", (side, p.spi, seq)))
    expire(None)
    return {"a": a_name, "b": b_name,
            "sas": [r.to_dict() for r in sorted(rows.values(), key=lambda r: (r.sender, r.spi))]}
