"""Counter attribution: an xfrm_stat counter delta names a cause, not a packet; it goes to the
unexplained packets of its direction (and netns) since the previous poll, those whose own
evidence fits the cause first (an anchor of that cause, then their own state: no SA for the
SPI, our ICV check failed), oldest first among equals.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from ipsec_capture.models import Event

from .causes import ANCHOR_CAUSES, MODE_ERROR_TOO_BIG, cause_for_counter, too_big_for_tunnel
from .diagnosis import fmt_time
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
    """Turns counter Events into Incidents and gives their deltas to the join's pending packets."""

    def __init__(self, pending: deque[Packet], history: SaHistory, window_ns: int,
                 clear_window_ns: int) -> None:
        self.pending = pending
        self.history = history
        self.window_ns = window_ns
        self.clear_window_ns = clear_window_ns
        self.last_poll: dict[int | None, int] = {}
        self.anchor_kinds = False  # an event of an anchor's kind came (fit 2 possible)

    def counter(self, ev: Event) -> Incident | None:
        """The incident of one counter delta, attributed; None for a delta that is not positive."""
        name = ev.reason or "?"
        delta = int(ev.detail.get("delta", 0))
        if delta <= 0:
            return None
        cause, direction = cause_for_counter(name)
        since = self.last_poll.get(ev.netns)
        inc = Incident(ev.time_ns, "xfrm_stat", name, cause, direction, ev.netns, delta=delta,
                       detail=f"{name} +{delta}")
        self._attribute(inc, since)
        self.last_poll[ev.netns] = ev.time_ns
        return inc

    def _attribute(self, inc: Incident, since: int | None) -> None:
        """Give the counter's delta to the unexplained packets of its direction in the poll window,
        those whose own evidence fits the cause first (oldest first among equals)."""
        too_big = 0
        for p in self._chosen(inc, since):
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

    def _chosen(self, inc: Incident, since: int | None) -> list[Packet]:
        """The `inc.delta` candidates that fit its cause best (anchor 2, own evidence 1, none 0),
        oldest first among equals. A poll's window holds thousands of packets and its delta is
        a few: without anchors the fit is cheap and the oldest fitting ones end the search."""
        candidates = self._candidates(inc, since)
        cause, delta = inc.cause, inc.delta
        if self.anchor_kinds:  # some packet may have fit 2: rank them all
            ranked = list(candidates)
            ranked.sort(key=lambda p: -self._fit(p, cause))
            return ranked[:delta]
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

    def _candidates(self, inc: Incident, since: int | None) -> Iterator[Packet]:
        """Unexplained packets of the incident's direction (and netns) in its poll window, oldest
        first. The window is the newest pending packets back to the first one older than it."""
        low = (since if since is not None else inc.time_ns - self.window_ns) - self.clear_window_ns
        high = inc.time_ns + self.clear_window_ns
        pending = self.pending
        n = 0
        for p in reversed(pending):
            if p.time_ns < low:
                break
            n += 1
        direction, netns = inc.direction, inc.netns
        kind = ESP if direction == "in" else CLEAR if direction == "out" else None
        for p in islice(pending, len(pending) - n, None):
            if p.time_ns > high or p.direction != direction or p.clear or p.absorbed or p.cause:
                continue
            if netns is not None and p.netns is not None and p.netns != netns:
                continue
            if kind is not None and p.kind != kind:
                continue
            yield p

    def _fit(self, p: Packet, cause: str) -> int:
        for ev in p.events:
            if ANCHOR_CAUSES.get(ev.kind) == cause:
                return 2
        return self._own_fit(p, cause)

    def _own_fit(self, p: Packet, cause: str) -> int:
        """1 when the packet's own state fits the cause: no SA for its SPI, or our ICV check."""
        if cause == "no-state" and p.spi is not None:
            return 1 if self.history.at(p.spi, p.time_ns, p.netns) is None else 0
        if cause == "icv-fail" and p.decrypt == "icv-fail":
            return 1
        return 0
