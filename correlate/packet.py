"""A joined packet: one ESP packet (or an unmatched cleartext one) with everything the join found
about it - its kernel events, the cleartext points it reached, its SA, the verdict and why.

Also the classification of capture points (direction, ciphertext or cleartext), which the join
and the reports share.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field, fields
from typing import Any

from ipsec_capture.models import Event, Record
from ipsec_capture.rules.points import CLEAR as CLEAR  # re-exported: the join's modules use both
from ipsec_capture.rules.points import ESP as ESP
from ipsec_capture.rules.points import IKE, POINTS

from .sahistory import SaLife

OK, FAILED, UNKNOWN = "ok", "failed", "unknown"
VERDICTS = (OK, FAILED, UNKNOWN)

# capture point -> (direction, kind) for the points whose packets the join judges (ESP) or matches
# to them (CLEAR); IKE points are shown, never judged. rules/points.py defines the points.
POINT_ROLES: dict[str, tuple[str, str]] = {
    name: (p.direction, p.kind) for name, p in POINTS.items() if p.kind != IKE
}
IKE_POINTS = frozenset(name for name, p in POINTS.items() if p.kind == IKE)
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

    def scapy(self, keys: Any = None) -> Any:
        """This packet as scapy objects (`.outer`, `.inner`, `.status`: correlate.scapy_view),
        decrypted with `keys` (a loaded bundle, an EspDecoder or SAs) when given. Needs the
        optional scapy extra; the join never calls it."""
        from .scapy_view import scapy_pair

        return scapy_pair(self.record.payload, keys)

    @property
    def state_mark(self) -> int | None:
        """The skb mark an inbound state lookup matches (none logged: 0); None outbound, where
        the state is chosen by the inner packet's mark, which the ESP record does not carry."""
        return (self.record.mark or 0) if self.direction == "in" else None

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


# A packet waiting in the join's window holds no empty lists: its clear, also and evidence are this
# until it gets a first item, and become lists when it leaves the join (`settle`). Tens of
# thousands of packets wait at once; three empty lists each were a third of the objects there.
LATER: Any = ()
_new = object.__new__


def waiting_packet(time_ns: int, point: str, direction: str, kind: str, length: int, record: Record,
                   spi: int | None, seq: int | None, netns: int | None) -> Packet:
    """A new packet for the join's window (see LATER): every field set as Packet() sets it, without
    the class call, which costs as much as the assignments and happens once per packet."""
    p = _new(Packet)
    p.time_ns = time_ns
    p.point = point
    p.direction = direction
    p.kind = kind
    p.length = length
    p.record = record
    p.spi = spi
    p.seq = seq
    p.netns = netns
    p.decrypt = None
    p.clear = LATER
    p.also = LATER
    p.events = []
    p.sa = None
    p.verdict = UNKNOWN
    p.cause = None
    p.counter = None
    p.evidence = LATER
    p.absorbed = False
    p.key = None
    return p


# waiting_packet() sets each field by name: a field added to Packet must be added there too.
assert [f.name for f in fields(Packet)] == [
    "time_ns", "point", "direction", "kind", "length", "record", "spi", "seq", "netns", "decrypt", "clear",
    "also", "events", "sa", "verdict", "cause", "counter", "evidence", "absorbed", "key"]


def settle(p: Packet) -> None:
    """A packet leaving the join's window gets the lists Packet() would have given it."""
    if not p.clear:
        p.clear = []
    if not p.also:
        p.also = []
    if not p.evidence:
        p.evidence = []
