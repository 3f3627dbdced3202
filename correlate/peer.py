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


def _tagged(side: int, packets: Iterable[Packet]) -> Iterator[tuple[int, int, int, Packet]]:
    for p in packets:
        if p.kind == ESP and p.spi is not None:
            yield p.time_ns, side, p.spi, p


def join_peers(a_name: str, a: Iterable[Packet], b_name: str, b: Iterable[Packet],
               window_ns: int = 5 * SECOND) -> dict[str, Any]:
    names = (a_name, b_name)
    rows: dict[tuple[int, int], PathRow] = {}
    sent: dict[tuple[int, int, int], Packet] = {}  # (sender side, spi, seq) -> sent packet
    recv: dict[tuple[int, int, int], Packet] = {}  # (receiver side, spi, seq) -> arrived first
    order: deque[tuple[int, str, tuple[int, int, int]]] = deque()

    def row(sender: int, spi: int, p: Packet) -> PathRow:
        r = rows.get((sender, spi))
        if r is None:
            r = rows[(sender, spi)] = PathRow(spi, names[sender], names[1 - sender], p.src, p.dst)
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
                    row(key[0], key[1], p).lost += 1
            else:
                p = recv.pop(key, None)
                if p is not None:
                    r = row(1 - key[0], key[1], p)
                    r.unsent += 1
                    verdict(r, p)

    for t, side, spi, p in heapq.merge(_tagged(0, a), _tagged(1, b), key=lambda x: x[0]):
        expire(t)
        seq = p.seq or 0
        if p.direction == "out":
            r = row(side, spi, p)
            r.sent += 1
            early = recv.pop((1 - side, spi, seq), None)
            if early is not None:  # the receiver's clock is behind: it logged the arrival first
                r.arrived += 1
                verdict(r, early)
            else:
                sent[(side, spi, seq)] = p
                order.append((t, "sent", (side, spi, seq)))
        else:
            mine = sent.pop((1 - side, spi, seq), None)
            if mine is not None:
                r = row(1 - side, spi, p)
                r.arrived += 1
                verdict(r, p)
            else:
                recv[(side, spi, seq)] = p
                order.append((t, "recv", (side, spi, seq)))
    expire(None)
    return {"a": a_name, "b": b_name,
            "sas": [r.to_dict() for r in sorted(rows.values(), key=lambda r: (r.sender, r.spi))]}


# -- N nodes ---------------------------------------------------------------------------------------

@dataclass(slots=True)
class PairRow:
    """One cell of the node-pair matrix: what `sender` sent to `receiver` and what became of it."""

    sender: str
    receiver: str
    sent: int = 0
    arrived: int = 0
    lost: int = 0
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    unknown: int = 0
    unsent: int = 0
    spis: set[int] = field(default_factory=set)

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.sender, "to": self.receiver, "sent": self.sent, "arrived": self.arrived,
                "lost": self.lost, "ok": self.ok, "failed": dict(sorted(self.failed.items())),
                "unknown": self.unknown, "unsent": self.unsent,
                "spis": [f"0x{s:08x}" for s in sorted(self.spis)]}


UNKNOWN_NODE = "?"  # a destination no bundle owns (the packet left towards a node not captured)
_FleetKey = tuple[str, int, int]  # (destination, SPI, seq)


def _fleet_tagged(side: int, packets: Iterable[Packet]) -> Iterator[tuple[int, int, Packet, str, str]]:
    """ESP packets with their addresses read at once (the record may be reused once we move on)."""
    for p in packets:
        if p.kind == ESP and p.spi is not None:
            yield p.time_ns, side, p, p.src, p.dst


def join_fleet(names: list[str], streams: list[Iterable[Packet]], window_ns: int = 5 * SECOND,
               path_limit: int = 1000) -> dict[str, Any]:
    """N bundles joined by (destination, SPI, seq): a matrix of node pairs (sent, arrived, verdict
    at the receiver by cause, lost) and the path of each packet (sender, receiver, verdict).

    A node is known by the addresses it sends ESP from and receives ESP at; a packet that never
    arrives is charged to the node that owns its destination (`?` when no bundle does), named
    once every stream is read. The same
    (dst, SPI, seq) from two senders (Cilium gives every node pair the same SPI) is told apart
    by the source address. Paths are kept for the first `path_limit` packets that were lost or
    failed, and for the first `path_limit` of the rest, so a report lists what went wrong first.
    """
    owner: dict[str, str] = {}
    cells: dict[tuple[str, str], PairRow] = {}
    sent: dict[_FleetKey, list[tuple[int, Packet, str, int]]] = {}  # key -> [(side, packet, src, t)]
    early: dict[_FleetKey, list[tuple[int, Packet, str, int]]] = {}  # arrivals logged before the send
    order: deque[tuple[int, str, _FleetKey, tuple[int, Packet, str, int]]] = deque()
    bad_paths: list[dict[str, Any]] = []
    good_paths: list[dict[str, Any]] = []
    counts = {"paths": 0, "lost": 0, "failed": 0}
    lost_to: dict[tuple[str, str], int] = {}  # (sender, destination address) -> lost

    def cell(sender: str, receiver: str) -> PairRow:
        c = cells.get((sender, receiver))
        if c is None:
            c = cells[(sender, receiver)] = PairRow(sender, receiver)
        return c

    def path(sender: str, receiver: str, p: Packet, src: str, dst: str, t_sent: int | None,
             arrival: Packet | None) -> None:
        counts["paths"] += 1
        verdict = "lost" if arrival is None else arrival.verdict
        cause = None if arrival is None else arrival.cause
        bad = verdict != OK
        if verdict == "lost":
            counts["lost"] += 1
        elif verdict == FAILED:
            counts["failed"] += 1
        into = bad_paths if bad else good_paths
        if len(into) < path_limit:
            into.append({"spi": f"0x{p.spi:08x}", "seq": p.seq, "src": src, "dst": dst, "from": sender,
                         "to": receiver, "sent_ns": t_sent,
                         "arrived_ns": None if arrival is None else arrival.time_ns,
                         "verdict": verdict, "cause": cause,
                         "evidence": [] if arrival is None else list(arrival.evidence)[:3]})

    def verdict(c: PairRow, p: Packet) -> None:
        if p.verdict == OK:
            c.ok += 1
        elif p.verdict == FAILED:
            k = p.cause or "other"
            c.failed[k] = c.failed.get(k, 0) + 1
        else:
            c.unknown += 1

    def take(pool: dict[_FleetKey, list[tuple[int, Packet, str, int]]], key: _FleetKey, src: str,
             not_side: int) -> tuple[int, Packet, str, int] | None:
        cands = pool.get(key)
        if not cands:
            return None
        pick = next((c for c in cands if c[2] == src and c[0] != not_side), None)
        if pick is None:
            pick = next((c for c in cands if c[0] != not_side), None)
        if pick is None:
            return None
        cands.remove(pick)
        if not cands:
            del pool[key]
        return pick

    def expire(now: int | None) -> None:
        while order and (now is None or order[0][0] + window_ns < now):
            _t, what, key, entry = order.popleft()
            pool = sent if what == "sent" else early
            cands = pool.get(key)
            if not cands or not any(c is entry for c in cands):
                continue  # matched meanwhile
            cands.remove(entry)
            if not cands:
                del pool[key]
            side, p, src, t = entry
            dst = key[0]
            if what == "sent":  # its receiver is named at the end, when every address is known
                k = (names[side], dst)
                lost_to[k] = lost_to.get(k, 0) + 1
                path(names[side], dst, p, src, dst, t, None)
            else:
                c = cell(owner.get(src, UNKNOWN_NODE), names[side])
                c.unsent += 1
                c.spis.add(p.spi or 0)
                verdict(c, p)

    def arrived(sside: int, sp: Packet, st: int, rside: int, rp: Packet, src: str, dst: str) -> None:
        """A packet one node sent, seen arriving at another (in whichever order they came)."""
        c = cell(names[sside], names[rside])
        c.sent += 1
        c.arrived += 1
        c.spis.add(sp.spi or 0)
        verdict(c, rp)
        path(names[sside], names[rside], sp, src, dst, st, rp)

    tagged = [_fleet_tagged(i, s) for i, s in enumerate(streams)]
    for t, side, p, src, dst in heapq.merge(*tagged, key=lambda x: x[0]):
        expire(t)
        key = (dst, p.spi or 0, p.seq or 0)
        if p.direction == "out":
            owner.setdefault(src, names[side])
            arr = take(early, key, src, side)
            if arr is not None:
                rside, rp, _s, _t = arr
                arrived(side, p, t, rside, rp, src, dst)
            else:
                entry = (side, p, src, t)
                sent.setdefault(key, []).append(entry)
                order.append((t, "sent", key, entry))
        else:
            owner.setdefault(dst, names[side])
            snd = take(sent, key, src, side)
            if snd is not None:
                sside, sp, _s, st = snd
                arrived(sside, sp, st, side, p, src, dst)
            else:
                entry = (side, p, src, t)
                early.setdefault(key, []).append(entry)
                order.append((t, "recv", key, entry))
    expire(None)
    for (sender, dst), n in lost_to.items():
        c = cell(sender, owner.get(dst, UNKNOWN_NODE))
        c.lost += n
        c.sent += n
    for row in bad_paths:
        if row["verdict"] == "lost":
            row["to"] = owner.get(row["dst"], UNKNOWN_NODE)
    matrix = sorted(cells.values(), key=lambda c: (c.sender, c.receiver))
    return {"nodes": list(names), "window_ns": window_ns,
            "addresses": dict(sorted(owner.items())),
            "matrix": [c.to_dict() for c in matrix],
            "paths": {"total": counts["paths"], "lost": counts["lost"], "failed": counts["failed"],
                      "listed": bad_paths + good_paths[:max(0, path_limit - len(bad_paths))]}}
