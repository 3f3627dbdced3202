"""The skb tracker: which packet a kfree_skb drop names, by the skb address its probe saw.

A drop carries only an skb address. The xfrm_input / xfrm_output probe of a packet saw the same
address a moment before, so the latest probe with that address names the packet (or, when the
probe came before its packet was read, the (SPI, seq) the packet will have). Addresses are reused
at once, so only the latest probe counts, and an address leaves with its packet's window.

Most addresses are never looked up (no drop names them): the join's hot path only logs its
probes (`log_packets`, `log_probes`, in order), and the two dicts are written from that log when a
lookup needs them (`sync`), as if each probe had been written when attached.
"""

from __future__ import annotations

from collections import deque

from ipsec_capture.models import Event
from ipsec_capture.wire import SECOND

from .packet import LATER, Packet

DROP_AFTER_PROBE_NS = SECOND // 2  # xfrm_input's drop follows its probe within microseconds (ms under TCG)

Target = Packet | tuple[int, int]  # a pending packet, or the (SPI, seq) of a probe awaiting its packet


class SkbTracker:
    """skb address -> the packet (or awaited (SPI, seq)) of the latest probe that saw it."""

    __slots__ = ("log_packets", "log_probes", "seen", "target")

    def __init__(self) -> None:
        # skb address -> its target; when the probe saw it
        self.target: dict[str, Target] = {}
        self.seen: dict[str, int] = {}
        # The probes the join's run loop attached, in order, not yet written to those two dicts.
        self.log_packets: deque[Packet] = deque()
        self.log_probes: deque[Event] = deque()

    def link(self, skb: str, target: Target, time_ns: int) -> None:
        """A probe that saw `skb` names `target` from now on (after the logged probes)."""
        self.sync()
        self.target[skb] = target
        self.seen[skb] = time_ns

    def sync(self) -> None:
        """Write the logged probes to the dicts, in order, as if each had been written when
        attached: a packet that has left the window since took its address with it."""
        target, seen = self.target, self.seen
        for p, ev in zip(self.log_packets, self.log_probes, strict=True):
            skb = ev.detail["skb"]
            if p.also is LATER:  # still waiting (an ESP packet's `also` stays LATER until settle())
                target[skb] = p
                seen[skb] = ev.time_ns
            else:
                target.pop(skb, None)
                seen.pop(skb, None)
        self.log_packets.clear()
        self.log_probes.clear()

    def forget_left(self) -> None:
        """Drop the logged probes whose packets left the window (settled): they are no longer
        needed, and the addresses they would have taken leave with their packets."""
        packets = self.log_packets
        while packets and packets[0].also is not LATER:
            packets.popleft()
            ev = self.log_probes.popleft()
            if self.target:
                skb = ev.detail["skb"]
                self.target.pop(skb, None)
                self.seen.pop(skb, None)

    def unlink(self, p: Packet) -> None:
        """p leaves the window: the addresses that still name it name nothing now."""
        target = self.target
        for ev in p.events:
            skb = ev.detail.get("skb") if ev.detail else None
            if skb and target.get(skb) is p:
                del target[skb], self.seen[skb]

    def named_by(self, drop: Event) -> Target | None:
        """The target of a drop: the latest probe of its skb, if that probe came shortly before."""
        skb = drop.detail.get("skbaddr") if drop.detail else None
        if not skb:
            return None
        self.sync()
        target = self.target.get(skb)
        if target is not None and 0 <= drop.time_ns - self.seen[skb] <= DROP_AFTER_PROBE_NS:
            return target
        return None
