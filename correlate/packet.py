"""A joined packet: one ESP packet (or an unmatched cleartext one) with everything the join found
about it - its kernel events, the cleartext points it reached, its SA, the verdict and why.

Also the classification of capture points (direction, ciphertext or cleartext), which the join
and the reports share.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from ipsec_capture.correlate.sahistory import SaLife

from ipsec_capture.models import Event, Record

OK, FAILED, UNKNOWN = "ok", "failed", "unknown"
VERDICTS = (OK, FAILED, UNKNOWN)
ESP, CLEAR = "esp", "clear"

# capture point (rules/points.py names) -> (direction, kind)
POINT_ROLES: dict[str, tuple[str, str]] = {
    "raw-pre-esp": ("in", ESP),
    "raw-out-esp": ("out", ESP),
    "mangle-pre-in": ("in", CLEAR),
    "filter-in": ("in", CLEAR),
    "filter-fwd": ("in", CLEAR),
    "mangle-post-out": ("out", CLEAR),
    "filter-out": ("out", CLEAR),
}
IKE_POINTS = frozenset({"raw-pre-ike", "raw-out-ike"})
_INBOUND_HOOKS = frozenset({0, 1, 2})  # <linux/netfilter.h> NF_INET_PRE_ROUTING, LOCAL_IN, FORWARD


def direction_of(record: Record) -> str:
    role = POINT_ROLES.get(record.point)
    if role is not None:
        return role[0]
    if record.hook is not None:
        return "in" if record.hook in _INBOUND_HOOKS else "out"
    return "out" if "out" in record.point else "in"


def _addr(payload: bytes | memoryview, src: bool) -> str:
    if len(payload) >= 20 and payload[0] >> 4 == 4:
        off = 12 if src else 16
        return socket.inet_ntop(socket.AF_INET, bytes(payload[off:off + 4]))
    if len(payload) >= 40 and payload[0] >> 4 == 6:
        off = 8 if src else 24
        return socket.inet_ntop(socket.AF_INET6, bytes(payload[off:off + 16]))
    return "?"


@dataclass(slots=True)
class Packet:
    """One packet through the join. Addresses are computed on demand (hot path: bytes only)."""

    time_ns: int
    point: str
    direction: str  # in / out
    kind: str  # esp / clear
    length: int
    record: Record
    spi: int | None = None
    seq: int | None = None
    netns: int | None = None
    decrypt: str | None = None  # our decoder's status when keys were given
    clear: list[tuple[str, int]] = field(default_factory=list)  # (point, time_ns) of its cleartext
    also: list[tuple[str, int]] = field(default_factory=list)  # a cleartext packet's later points
    events: list[Event] = field(default_factory=list)
    sa: SaLife | None = None
    verdict: str = UNKNOWN
    cause: str | None = None
    counter: str | None = None  # the xfrm_stat counter this packet moved (attributed)
    evidence: list[str] = field(default_factory=list)
    absorbed: bool = False  # a cleartext record folded into its ESP packet
    key: int | None = None  # cleartext match key

    @property
    def src(self) -> str:
        return _addr(self.record.payload, True)

    @property
    def dst(self) -> str:
        return _addr(self.record.payload, False)

    def to_dict(self) -> dict[str, Any]:
        """The per-packet row of the JSON report and the notebook table."""
        return {
            "time_ns": self.time_ns, "point": self.point, "direction": self.direction, "kind": self.kind,
            "netns": self.netns, "spi": None if self.spi is None else f"0x{self.spi:08x}", "seq": self.seq,
            "src": self.src, "dst": self.dst, "length": self.length, "verdict": self.verdict,
            "cause": self.cause, "counter": self.counter, "evidence": list(self.evidence),
            "decrypt": self.decrypt, "cleartext": [p for p, _ in self.clear],
            "also_at": [p for p, _ in self.also],
            "events": [f"{e.source}/{e.kind}" for e in self.events],
            "sa": None if self.sa is None else self.sa.to_dict(),
        }
