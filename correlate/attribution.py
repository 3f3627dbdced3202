"""Counter attribution: an xfrm_stat counter delta names a cause, not a packet; it goes to the
unexplained packets of its direction (and netns) since the previous poll, those whose own
evidence fits the cause first (an anchor of that cause, then their own state: no SA for the
SPI, our ICV check failed), oldest first among equals. A poll's window reaches past the poll by
the cleartext window and by how late the capture's packet stamps may be (the events log header
says it: a packet the kernel did not stamp is stamped when its NFLOG batch is read).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from ipsec_capture.models import Event

from .causes import ANCHOR_CAUSES, MODE_ERROR_TOO_BIG, cause_for_counter, too_big_for_tunnel
from .diagnosis import accepted_by_probe, fmt_time
from .packet import CLEAR, ESP, Packet
from .sahistory import SaHistory


@dataclass(slots=True)
class Incident:
    """A kernel fact that is a failure by itself: a counter delta, or a drop with no packet."""

    time_ns: int
    source: str  # xfrm_stat / kfree_skb / kprobe / xfrm_monitor
    name: str  # counter name, drop reason, anchor, acquire
    cause: str
    direction: str
    netns: int | None = None
    delta: int = 1
    attributed: int = 0  # packets of the capture this was attributed to
    spis: dict[int, int] = field(default_factory=dict)  # SPI -> packets attributed
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"time_ns": self.time_ns, "source": self.source, "name": self.name, "cause": self.cause,
                "direction": self.direction, "netns": self.netns, "delta": self.delta,
                "attributed": self.attributed,
                "spis": {f"0x{s:08x}": n for s, n in sorted(self.spis.items())}, "detail": self.detail}


class CounterAttribution:
    """Turns counter Events into Incidents and gives their deltas to the join's pending packets.

    A delta counts drops, and a drop the kernel also anchored (xfrm_audit_state_*) is already
    explained by its anchor: the delta is consumed by the anchors of its cause in its poll
    window first, whether their packets were captured or not, and only the rest goes to
    unexplained packets. A packet whose own probe says the kernel took it is never given a delta.
    Anchors and probes may reach the join after the poll that counted their drop (the sources
    write from their own threads), so a delta is attributed late: just before the first packet
    of its poll window would leave the join (`flush`), or at the end."""

    def __init__(self, pending: deque[Packet], history: SaHistory, window_ns: int,
                 clear_window_ns: int, stamp_late_ns: int = 0) -> None:
        self.pending = pending
        self.history = history
        self.window_ns = window_ns
        self.clear_window_ns = clear_window_ns
        # a packet stamped when read may carry a time after the poll that counted its drop
        self.stamp_late_ns = stamp_late_ns
        self.last_poll: dict[int | None, tuple[int | None, int]] = {}  # netns -> (poll before, last poll)
        self.anchor_kinds = False  # an event of an anchor's kind came (fit 2 possible)
        # anchors not yet consumed by a delta, oldest first, per cause
        self._anchors: dict[str, list[Event]] = {}
        # incidents waiting for their attribution, with the low end of their poll window
        self.deferred: deque[tuple[Incident, int]] = deque()

    def anchor(self, ev: Event) -> None:
        """An audit anchor came: it explains one drop of its cause, one unit of a delta."""
        cause = ANCHOR_CAUSES.get(ev.kind)
        if cause is not None and ev.source == "kprobe":
            self.anchor_kinds = True
            self._anchors.setdefault(cause, []).append(ev)

    def counter(self, ev: Event) -> Incident | None:
        """The incident of one counter delta, to be attributed (`flush`); None for a delta that
        is not positive."""
        name = ev.reason or "?"
        delta = int(ev.detail.get("delta", 0))
        if delta <= 0:
            return None
        cause, direction = cause_for_counter(name)
        since = self._since(ev.netns, ev.time_ns)
        inc = Incident(ev.time_ns, "xfrm_stat", name, cause, direction, ev.netns, delta=delta,
                       detail=f"{name} +{delta}")
        low = (since if since is not None else inc.time_ns - self.window_ns) - self.clear_window_ns
        self.deferred.append((inc, low))
        return inc

    def _since(self, netns: int | None, t: int) -> int | None:
        """The previous poll of the namespace: one poll writes a line per counter that moved, all
        with its time, and each of them covers the same window since the poll before."""
        polls = self.last_poll.get(netns)
        if polls is None:
            self.last_poll[netns] = (None, t)
            return None
        before, last = polls
        if t == last:
            return before
        self.last_poll[netns] = (last, t)
        return last

    def flush(self, limit: float) -> list[Incident]:
        """Attribute the deferred incidents whose poll window reaches back before `limit` (the
        join is about to let such packets go), oldest first; returns them."""
        done = []
        deferred = self.deferred
        while deferred and deferred[0][1] < limit:
            inc, low = deferred.popleft()
            self._attribute(inc, low)
            done.append(inc)
        return done

    def _attribute(self, inc: Incident, low: int) -> None:
        """Give the counter's delta to the anchors of its cause, then to the unexplained packets of
        its direction in the poll window, those whose own evidence fits the cause first."""
        high = inc.time_ns + self.clear_window_ns + self.stamp_late_ns
        cause = inc.cause
        anchors = self._anchors.get(cause)
        if anchors:
            # anchors before the window can serve no later poll either
            anchors[:] = [a for a in anchors if a.time_ns >= low or not _same_netns(a.netns, inc.netns)]
        too_big = 0
        for p in self._chosen(inc, low, high):
            p.cause = inc.cause
            p.counter = inc.name
            if not p.evidence:
                p.evidence = []
            p.evidence.append(f"{inc.name} +{inc.delta} at {fmt_time(inc.time_ns)}")
            why = too_big_for_tunnel(p.record.payload) if inc.name == MODE_ERROR_TOO_BIG else None
            if why is not None:
                p.cause = "mtu"
                p.evidence.append(why)
                too_big += 1
            inc.attributed += 1
            if p.spi is not None:
                inc.spis[p.spi] = inc.spis.get(p.spi, 0) + 1
        if too_big and too_big == inc.attributed:
            inc.cause = "mtu"

    def _explained(self, inc: Incident, low: int, high: int, room: int) -> int:
        """Consume up to `room` anchors of the incident's cause in its window whose packets are
        not among its candidates (not captured, or already gone): each is one unit of the delta,
        counted as attributed to its SPI."""
        anchors = self._anchors.get(inc.cause)
        n = 0
        if not anchors or room <= 0:
            return 0
        keep = []
        for a in anchors:
            if n < room and low <= a.time_ns <= high and _same_netns(a.netns, inc.netns):
                n += 1
                inc.attributed += 1
                if a.spi is not None:
                    inc.spis[a.spi] = inc.spis.get(a.spi, 0) + 1
            else:
                keep.append(a)
        anchors[:] = keep
        return n

    def _chosen(self, inc: Incident, low: int, high: int) -> list[Packet]:
        """The packets for the `inc.delta` units its cause's anchors do not explain by themselves:
        the anchored candidates first (fit 2), then anchors with no candidate packet, then those
        whose own state fits (1), then the oldest unexplained (0). A poll's window holds
        thousands of packets and its delta is a few: without anchors the fit is cheap and the
        oldest fitting ones end the search."""
        candidates = self._candidates(inc, low, high)
        cause, delta = inc.cause, inc.delta
        if self.anchor_kinds:  # some packet may have fit 2: rank them all
            ranked = [(f, p) for p in candidates if (f := self._fit(p, cause, low, high)) >= 0]
            ranked.sort(key=lambda fp: -fp[0])
            anchored = [p for f, p in ranked if f == 2][:delta]
            anchors = self._anchors.get(cause)
            if anchors and anchored:  # their anchors are spent on them
                spent = {id(ev) for p in anchored for ev in p.events}
                anchors[:] = [a for a in anchors if id(a) not in spent]
            left = delta - len(anchored) - self._explained(inc, low, high, delta - len(anchored))
            return anchored + [p for f, p in ranked if f < 2][:max(left, 0)]
        if cause not in ("no-state", "icv-fail"):  # every fit is 0: the oldest
            return list(islice(candidates, delta))
        best: list[Packet] = []
        rest: list[Packet] = []
        for p in candidates:
            if self._own_fit(p, cause):
                best.append(p)
                if len(best) == delta:
                    return best
            elif len(rest) < delta:
                rest.append(p)
        return (best + rest)[:delta]

    def _candidates(self, inc: Incident, low: int, high: int) -> Iterator[Packet]:
        """Unexplained packets of the incident's direction (and netns) in its poll window, oldest
        first, but none whose own probe says the kernel took it. Pending packets are in time
        order (the join merges by time) and a delta is attributed when its window's first packets
        are about to leave: the window is read from the oldest end, up to its last packet."""
        direction, netns = inc.direction, inc.netns
        kind = ESP if direction == "in" else CLEAR if direction == "out" else None
        for p in self.pending:
            t = p.time_ns
            if t < low:
                continue
            if t > high:
                break
            if p.direction != direction or p.clear or p.absorbed or p.cause:
                continue
            if netns is not None and p.netns is not None and p.netns != netns:
                continue
            if kind is not None and p.kind != kind:
                continue
            events = p.events
            if events:
                if len(events) == 1:  # accepted_by_probe's common case, inline: one probe, ret 0
                    ev = events[0]
                    if ev.ret == 0 and ev.kind == "xfrm_input" and ev.source == "kprobe":
                        continue
                if accepted_by_probe(p):
                    continue
            yield p

    def _fit(self, p: Packet, cause: str, low: int, high: int) -> int:
        """2: an anchor of this cause in the poll window; -1: an anchor of another cause or of
        another poll's window (the packet is that anchor's drop, counted there)."""
        for ev in p.events:
            anchored = ANCHOR_CAUSES.get(ev.kind)
            if anchored is not None and ev.source == "kprobe":
                return 2 if anchored == cause and low <= ev.time_ns <= high else -1
        return self._own_fit(p, cause)

    def _own_fit(self, p: Packet, cause: str) -> int:
        """1 when the packet's own state fits the cause: no SA for its SPI, or our ICV check."""
        if cause == "no-state" and p.spi is not None:
            return 1 if self.history.of_packet(p) is None else 0
        if cause == "icv-fail" and p.decrypt == "icv-fail":
            return 1
        return 0


def _same_netns(a: int | None, b: int | None) -> bool:
    return a is None or b is None or a == b
