"""The capture points: where in the netfilter path a packet is copied to NFLOG, and why there.

A point's name is also its NFLOG prefix and, in the pcapng file, its interface name, so one name
follows a packet from the rule to Wireshark. `table`/`chain` use the iptables names (the nft
backend maps them to hooks and priorities); `description` is backend-neutral and becomes the
pcapng interface description.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipsec_capture.errors import UserError


@dataclass(frozen=True, slots=True)
class Point:
    name: str
    table: str  # raw | mangle | filter
    chain: str  # PREROUTING | OUTPUT | POSTROUTING | INPUT | FORWARD
    description: str


def _points(*points: Point) -> dict[str, Point]:
    return {p.name: p for p in points}


# Ordered from the wire inwards, then outwards: the order of pcapng interfaces and of status lines.
POINTS: dict[str, Point] = _points(
    Point("raw-pre-esp", "raw", "PREROUTING", "raw PREROUTING: ESP/AH arriving (ciphertext)"),
    Point("raw-pre-ike", "raw", "PREROUTING", "raw PREROUTING: IKE and NAT-T, UDP 500/4500 arriving"),
    Point("raw-out-esp", "raw", "OUTPUT", "raw OUTPUT: ESP/AH leaving (ciphertext)"),
    Point("raw-out-ike", "raw", "OUTPUT", "raw OUTPUT: IKE and NAT-T, UDP 500/4500 leaving"),
    Point("mangle-pre-in", "mangle", "PREROUTING",
          "mangle PREROUTING: decapsulated cleartext (policy ipsec in)"),
    Point("mangle-post-out", "mangle", "POSTROUTING",
          "mangle POSTROUTING: cleartext about to be encrypted (policy ipsec out)"),
    Point("filter-in", "filter", "INPUT", "filter INPUT: decapsulated, delivered locally (policy ipsec in)"),
    Point("filter-fwd", "filter", "FORWARD", "filter FORWARD: decapsulated, forwarded (policy ipsec in)"),
    Point("filter-out", "filter", "OUTPUT",
          "filter OUTPUT: locally generated, to be encrypted (policy ipsec out)"),
)


def parse_points(spec: str | None) -> tuple[str, ...]:
    """`"raw-pre-esp,filter-in"` -> those names in POINTS order; None or "" or "all" -> every point."""
    if spec is None or spec.strip() in ("", "all"):
        return tuple(POINTS)
    wanted = {s.strip() for s in spec.split(",") if s.strip()}
    unknown = sorted(wanted - POINTS.keys())
    if unknown:
        raise UserError(
            f"unknown capture point{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
            f"choose from {', '.join(POINTS)}"
        )
    return tuple(name for name in POINTS if name in wanted)
