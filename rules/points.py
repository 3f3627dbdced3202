"""The capture points: where in the netfilter path a packet is copied to NFLOG, and why there.

A point's name is also its NFLOG prefix and, in the pcapng file, its interface name, so one name
follows a packet from the rule to Wireshark. `table`/`chain` use the iptables names (the nft
backend maps them to hooks and priorities); `description` is backend-neutral and becomes the
pcapng interface description.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipsec_capture.errors import UserError

# What a point sees: ciphertext (ESP/AH), IKE and NAT-T, or cleartext under an IPsec policy.
ESP, IKE, CLEAR = "esp", "ike", "clear"


@dataclass(frozen=True, slots=True)
class Point:
    name: str
    table: str  # raw | mangle | filter
    chain: str  # PREROUTING | OUTPUT | POSTROUTING | INPUT | FORWARD
    description: str
    direction: str  # "in" (arriving, decapsulated) | "out" (leaving, to be encrypted)
    kind: str  # ESP | IKE | CLEAR: how the join and the reports treat its packets


def _points(*points: Point) -> dict[str, Point]:
    return {p.name: p for p in points}


# Ordered from the wire inwards, then outwards: the order of pcapng interfaces and of status lines.
POINTS: dict[str, Point] = _points(
    Point("raw-pre-esp", "raw", "PREROUTING", "raw PREROUTING: ESP/AH arriving (ciphertext)", "in", ESP),
    Point("raw-pre-ike", "raw", "PREROUTING", "raw PREROUTING: IKE and NAT-T, UDP 500/4500 arriving",
          "in", IKE),
    Point("raw-out-esp", "raw", "OUTPUT", "raw OUTPUT: ESP/AH leaving (ciphertext)", "out", ESP),
    Point("raw-out-ike", "raw", "OUTPUT", "raw OUTPUT: IKE and NAT-T, UDP 500/4500 leaving", "out", IKE),
    Point("mangle-pre-in", "mangle", "PREROUTING",
          "mangle PREROUTING: decapsulated cleartext (policy ipsec in)", "in", CLEAR),
    Point("mangle-post-out", "mangle", "POSTROUTING",
          "mangle POSTROUTING: cleartext about to be encrypted (policy ipsec out)", "out", CLEAR),
    Point("filter-in", "filter", "INPUT", "filter INPUT: decapsulated, delivered locally (policy ipsec in)",
          "in", CLEAR),
    Point("filter-fwd", "filter", "FORWARD", "filter FORWARD: decapsulated, forwarded (policy ipsec in)",
          "in", CLEAR),
    Point("filter-out", "filter", "OUTPUT",
          "filter OUTPUT: locally generated, to be encrypted (policy ipsec out)", "out", CLEAR),
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
