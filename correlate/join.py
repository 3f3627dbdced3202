"""The streaming join: captured packets (Records) and kernel facts (Events), both in time order, in;
joined and diagnosed Packets out, in capture order.

Memory is bounded by the window, not the capture: a packet waits at most `window_ns` of stream
time for its events, its cleartext and the counter poll that may explain it, then it is diagnosed,
yielded and forgotten. This module merges the two streams and indexes packets by (SPI, seq); the
rest is in small modules of their own:
  - ESP packet <-> kprobe events and anchors: (SPI, sequence number), netns when both know it (here);
  - kfree_skb drop <-> packet: the skb address the xfrm_input probe saw (`skbs`);
  - ESP <-> cleartext: inner packet hash, IPv4 ID, or nearest in time (`clearmatch`);
  - counter deltas -> the unexplained packets of their direction since the previous poll
    (`attribution`);
  - the verdict of a packet leaving the window (`diagnosis.finish`).
Times are only windows: NFLOG stamps are wall clock, BPF stamps converted from monotonic.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ipsec_capture.bpf.eventlog import STAMP_LATE_KEY
from ipsec_capture.capture.esp_header import locate
from ipsec_capture.models import Event, Record
from ipsec_capture.wire import IPPROTO_ESP, SECOND

from .attribution import CounterAttribution, Incident
from .causes import ANCHOR_CAUSES, INBOUND_DROP_FUNCS, cause_for_drop, drop_reason_named
from .clearmatch import ClearMatcher
from .diagnosis import Context, finish
from .packet import CLEAR, ESP, IKE_POINTS, POINT_ROLES, Packet, direction_of, waiting_packet
from .sahistory import SaHistory
from .skbs import SkbTracker

__all__ = ["Incident", "JoinStats", "Joiner"]

_ESP = struct.Struct("!II")  # RFC 4303: SPI, sequence number
_IP4_MF_OR_OFFSET = 0x3FFF  # More Fragments bit plus the 13-bit fragment offset
# Plain IPv4 ESP, nearly every packet of a capture: version 4 and a 20-byte header (0x45), the
# fragment field, the protocol, and the SPI and sequence number right after the header. When it
# is ESP and not a fragment, this is what xfrm.esp_header.locate() finds, without its call.
_IP4_ESP = struct.Struct("!B5xHxB10xII")
_PROBE_KINDS = frozenset({"xfrm_input", "xfrm_output"})  # the probes the run loop attaches itself
_ESP_POINTS = {point: direction for point, (direction, kind) in POINT_ROLES.items() if kind == ESP}


@dataclass(slots=True)
class JoinStats:
    records: int = 0
    events: int = 0
    esp: int = 0
    clear: int = 0
    ike: int = 0
    other: int = 0
    clear_matched: int = 0
    events_matched: int = 0
    events_unmatched: dict[str, int] = field(default_factory=dict)  # "source/kind" -> count
    events_other_netns: int = 0  # events of another namespace than the capture's: not evidence
    capture_stats: dict[str, Any] = field(default_factory=dict)


def _locate_esp(pkt: bytes | memoryview) -> tuple[int, int] | None:
    """(SPI, seq) of the ESP packet, or None when it carries none (SPI 0 is reserved: not ESP)."""
    if len(pkt) >= _IP4_ESP.size:
        vihl, frag, proto, spi, seq = _IP4_ESP.unpack_from(pkt)
        if vihl == 0x45 and proto == IPPROTO_ESP and not frag & _IP4_MF_OR_OFFSET:
            return (spi, seq) if spi else None
    found = locate(pkt)
    if found is None:
        return None
    spi, seq = _ESP.unpack_from(pkt, found[3])
    return (spi, seq) if spi else None


class _End:
    """An exhausted input stream: later than any item, so the merge takes the other one."""

    time_ns = math.inf


_END: Any = _End()


class Joiner:
    """One pass over one capture's Records and Events. `run()` yields diagnosed Packets; after it
    is exhausted, `incidents`, `history` and `stats` describe the rest."""

    def __init__(self, *, sas: Iterable[Any] | None = None, window_ns: int = 3 * SECOND,
                 clear_window_ns: int = SECOND // 20, header: dict[str, Any] | None = None) -> None:
        self.window_ns = window_ns
        self.clear_window_ns = clear_window_ns
        self.history = SaHistory()
        self.incidents: list[Incident] = []
        self.timeline: list[tuple[int, str]] = []
        self.timeline_limit = 2000
        self.stats = JoinStats()
        self.decoder = None
        sas = list(sas or ())
        if sas:
            from ipsec_capture.decrypt.decoder import EspDecoder

            self.decoder = EspDecoder(sas)
        sources = {s.get("name") for s in (header or {}).get("sources", []) if isinstance(s, dict)
                   and s.get("active", True)}
        # The capture's own namespace (the header says it): an event of another one is never
        # evidence for this capture's packets, even when a source let it into the log.
        netns = (header or {}).get("netns")
        inode = netns.get("inode") if isinstance(netns, dict) else None
        self.netns: int | None = inode if isinstance(inode, int) and not isinstance(inode, bool) else None
        self.ctx = Context(history=self.history, clear_points=set(), keys=self.decoder is not None,
                           drop_source=bool(sources & {"kfree_skb", "kprobe", "tracepoint"}),
                           kprobes="kprobe" in sources)
        # The xfrm_stat counters were collected: they already count (and attribute) every drop
        # that a bare kfree_skb location could only guess at.
        self._counters = "xfrm_stat" in sources
        self._pending: deque[Packet] = deque()
        # (SPI, seq) -> its pending ESP packet, or a list of them when the pair repeats (oldest first)
        self._by_spiseq: dict[tuple[int, int], Packet | list[Packet]] = {}
        self._early: dict[tuple[int, int], list[Event]] = {}
        self._early_order: deque[tuple[int, tuple[int, int]]] = deque()
        self._skbs = SkbTracker()
        self._matcher = ClearMatcher(self._pending, self.stats, self.decoder, clear_window_ns)
        # read_events checked the header's value (a count of ns)
        self._attribution = CounterAttribution(self._pending, self.history, window_ns, clear_window_ns,
                                               stamp_late_ns=(header or {}).get(STAMP_LATE_KEY, 0))

    # -- the merge -------------------------------------------------------------------------
    def run(self, records: Iterable[Record], events: Iterable[Event]) -> Iterator[Packet]:
        """The join's one loop: both streams merged by time (a Record first on a tie, as
        heapq.merge would), each item joined, then the packets whose window ended yielded.

        Millions of packets pass here, so the common case is inlined, with the same effect as
        the general methods it stands for: an ESP packet at a ciphertext point while no
        cleartext has been seen (`_record`), the xfrm_input/xfrm_output probe of the one packet
        pending with its (SPI, seq) (`_event`), and the end of an ESP packet's window
        (`_finalize`). Its counts reach `stats` when the run ends."""
        window = self.window_ns
        pending = self._pending
        early_order = self._early_order
        by_spiseq = self._by_spiseq
        skbs, matcher, ctx = self._skbs, self._matcher, self.ctx
        deferred = self._attribution.deferred
        own = self.netns
        skb_target = skbs.target
        log_packets, log_probes = skbs.log_packets, skbs.log_probes
        record, event, finalize = self._record, self._event, self._finalize
        esp_points, ip4_esp, end = _ESP_POINTS, _IP4_ESP.unpack_from, _END
        record_type, packet_type, new_packet = Record, Packet, waiting_packet
        n_esp = n_other = n_probes = 0
        probed = False  # ctx.kprobes and ctx.drop_source set
        due = math.inf  # when the oldest pending packet's window ends
        rit, eit = iter(records), iter(events)
        rec, ev = next(rit, end), next(eit, end)
        # a Record or an Event: `type(item) is record_type` narrows the first, mypy cannot narrow the
        # other branch to Event (the _END sentinel is Any already)
        item: Any
        try:
            while True:
                if rec.time_ns <= ev.time_ns and rec is not end:
                    item = rec
                    rec = next(rit, end)
                elif ev is not end:
                    item = ev
                    ev = next(eit, end)
                else:
                    break
                now = item.time_ns
                if type(item) is record_type:
                    direction = esp_points.get(item.point)
                    payload = item.payload
                    if direction is not None and len(payload) >= 28:
                        vihl, frag, proto, spi, seq = ip4_esp(payload)
                        if vihl != 0x45 or proto != IPPROTO_ESP or frag & _IP4_MF_OR_OFFSET:
                            direction = None  # not plain IPv4 ESP: xfrm.esp_header.locate() decides
                    else:
                        direction = None
                    if direction is None:
                        record(item)
                        due = pending[0].time_ns + window if pending else math.inf
                    elif not spi:
                        n_other += 1
                    else:  # _record_esp, its packet counted here
                        n_esp += 1
                        found = (spi, seq)
                        p = new_packet(now, item.point, direction, ESP, item.length or len(payload), item,
                                       spi, seq, item.netns)
                        if matcher.lazy_keys:  # _esp with no clear key to build
                            same = by_spiseq.setdefault(found, p)
                            if same is not p:
                                self._index_again(p, found, same)
                            if self._early:
                                self._attach_early(p, found)
                        else:
                            self._esp(p, found)
                        if not pending:
                            due = now + window
                        pending.append(p)
                elif item.netns is not None and item.netns != own and own is not None:
                    self.stats.events_other_netns += 1
                else:
                    p = None
                    if item.source == "kprobe":
                        spi, seq, kind = item.spi, item.seq, item.kind
                        if spi is not None and seq is not None and kind in _PROBE_KINDS:
                            got = by_spiseq.get((spi, seq & 0xFFFFFFFF))
                            if type(got) is packet_type and \
                                    ((item.netns is None or got.netns is None or got.netns == item.netns)
                                     and (kind == "xfrm_output") == (got.direction == "out")):
                                p = got
                    if p is None:
                        event(item)
                    else:  # _event, _probe and _attach for the one packet with its (SPI, seq)
                        n_probes += 1
                        if not probed:
                            ctx.kprobes = ctx.drop_source = probed = True
                        p.events.append(item)
                        detail = item.detail
                        if detail and detail.get("skb"):
                            log_packets.append(p)
                            log_probes.append(item)
                if due < now:
                    limit = now - window  # a packet older than this has waited its window
                    if deferred:
                        self._attributed(limit)
                    while pending and pending[0].time_ns < limit:
                        p = pending.popleft()
                        if p.kind == ESP:  # _finalize
                            # an ESP packet has both (Packet's type cannot say so per kind; a cast
                            # would cost a call per packet here)
                            key: tuple[int, int] = (p.spi, p.seq)  # type: ignore[assignment]
                            if by_spiseq.get(key) is p:
                                del by_spiseq[key]
                            else:
                                self._unindex(p, key)
                            if p.key is not None:
                                matcher.forget_esp(p)
                            if skb_target:
                                skbs.unlink(p)
                            finish(p, ctx)
                            if log_packets:
                                skbs.forget_left()
                            yield p
                        else:
                            p = finalize(p)
                            if p is not None:
                                yield p
                    due = pending[0].time_ns + window if pending else math.inf
                if early_order and early_order[0][0] + window < now:
                    self._expire_early(now)
            self._attributed(math.inf)
            while pending:
                p = finalize(pending.popleft())
                if p is not None:
                    yield p
            self._expire_early(None)
        finally:
            st = self.stats
            st.records += n_esp + n_other
            st.esp += n_esp
            st.other += n_other
            st.events += n_probes
            st.events_matched += n_probes

    # -- records ---------------------------------------------------------------------------
    def _record(self, rec: Record) -> None:
        st = self.stats
        st.records += 1
        point = rec.point
        payload = rec.payload
        role = POINT_ROLES.get(point)
        if role is not None and role[1] == ESP:  # a ciphertext point: the common case
            direction = role[0]
            found = _locate_esp(payload)
        elif point in IKE_POINTS:
            # UDP 4500 carries IKE (non-ESP marker) and NAT-T ESP: only the latter is a packet to judge
            found = _locate_esp(payload)
            if found is None:
                st.ike += 1
                return
            direction = direction_of(rec)
        elif role is None:
            found = _locate_esp(payload)
            direction = direction_of(rec)
            if found is None:
                self._record_clear(rec, direction)
                return
        else:
            self._record_clear(rec, role[0])
            return
        if found is None:
            st.other += 1
            return
        st.esp += 1
        self._record_esp(rec, direction, found)

    def _record_esp(self, rec: Record, direction: str, found: tuple[int, int]) -> None:
        """An ESP record at `found` (SPI, seq), counted by the caller: its packet, joined."""
        p = waiting_packet(rec.time_ns, rec.point, direction, ESP, rec.wire_length, rec, found[0], found[1],
                           rec.netns)
        self._esp(p, found)
        self._pending.append(p)

    def _record_clear(self, rec: Record, direction: str) -> None:
        self.stats.clear += 1
        p = waiting_packet(rec.time_ns, rec.point, direction, CLEAR, rec.wire_length, rec, None, None,
                           rec.netns)
        self.ctx.clear_points.add(rec.point)
        self._matcher.clear(p)
        self._pending.append(p)

    def _esp(self, p: Packet, key: tuple[int, int]) -> None:
        """A new ESP packet: indexed by (SPI, seq), given the events that came before it, matched."""
        same = self._by_spiseq.setdefault(key, p)
        if same is not p:
            self._index_again(p, key, same)
        if self._early:
            self._attach_early(p, key)
        self._matcher.esp(p)

    def _index_again(self, p: Packet, key: tuple[int, int], same: Packet | list[Packet]) -> None:
        """A second pending packet with this (SPI, seq): the index holds a list, oldest first."""
        if type(same) is list:
            same.append(p)
        else:
            self._by_spiseq[key] = [same, p]  # type: ignore[list-item]

    def _unindex(self, p: Packet, key: tuple[int, int]) -> None:
        """p's window ended and the index holds a list for its (SPI, seq): p is its oldest."""
        same = self._by_spiseq.get(key)
        if type(same) is list:
            same.remove(p)
            if not same:
                del self._by_spiseq[key]

    def _attach_early(self, p: Packet, key: tuple[int, int]) -> None:
        early = self._early.pop(key, None)
        if early:
            for ev in early:
                self._attach(p, ev)

    # -- events ----------------------------------------------------------------------------
    def _event(self, ev: Event) -> None:
        self.stats.events += 1
        if ev.kind in ANCHOR_CAUSES:
            self._attribution.anchor(ev)
        src = ev.source
        if src == "kprobe":
            ctx = self.ctx
            if not (ctx.kprobes and ctx.drop_source):
                ctx.kprobes = ctx.drop_source = True
            self._probe(ev)
        elif src == "xfrm_stat":
            self._counters = True
            self._counter(ev)
        elif src == "kfree_skb":
            self.ctx.drop_source = True
            self._drop(ev)
        elif src in ("sa_snapshot", "xfrm_monitor"):
            life = self.history.add(ev)
            if src == "xfrm_monitor":
                self._monitor(ev, life)
        elif src == "capture":
            self.stats.capture_stats.update(ev.detail)

    def _note(self, t: int, text: str) -> None:
        if len(self.timeline) < self.timeline_limit:
            self.timeline.append((t, text))

    def _monitor(self, ev: Event, life: Any) -> None:
        spi = f" spi 0x{life.spi:08x} {life.src} -> {life.dst}" if life is not None else ""
        if ev.kind == "expire":
            hard = ev.detail.get("hard", True)
            self._note(ev.time_ns, f"{'hard' if hard else 'soft'} expire{spi}")
        elif ev.kind == "acquire":
            tup = ev.tuple or {}
            self._note(ev.time_ns, f"acquire {tup.get('src', '?')} -> {tup.get('dst', '?')} "
                                   "(no outbound SA: the kernel asked the IKE daemon)")
            flow = f"{tup.get('src', '?')} -> {tup.get('dst', '?')}"
            self.incidents.append(Incident(ev.time_ns, "xfrm_monitor", "acquire", "no-sa-out", "out",
                                           ev.netns, detail=f"acquire {flow}"))
        else:
            self._note(ev.time_ns, f"{ev.kind}{spi}")

    def _probe(self, ev: Event) -> None:
        spi, seq = ev.spi, ev.seq
        if spi is None or seq is None:
            self._unmatched(ev)
            return
        key = (spi, seq & 0xFFFFFFFF)
        same = self._by_spiseq.get(key)
        if same is not None:
            netns = ev.netns
            out = ev.kind == "xfrm_output"
            for p in (same,) if isinstance(same, Packet) else reversed(same):
                if (netns is None or p.netns is None or p.netns == netns) and out == (p.direction == "out"):
                    self._attach(p, ev)
                    return
        self._wait_early(key, ev)
        skb = ev.detail.get("skb") if ev.detail else None
        if skb:
            self._skbs.link(skb, key, ev.time_ns)

    def _wait_early(self, key: tuple[int, int], ev: Event) -> None:
        """An event whose packet has not been read yet (NFLOG's clock may lag the kernel's)."""
        self._early.setdefault(key, []).append(ev)
        self._early_order.append((ev.time_ns, key))

    def _attach(self, p: Packet, ev: Event) -> None:
        p.events.append(ev)
        self.stats.events_matched += 1
        detail = ev.detail
        if detail:
            skb = detail.get("skb")
            if skb:
                self._skbs.link(skb, p, ev.time_ns)

    def _drop(self, ev: Event) -> None:
        target = self._skbs.named_by(ev)
        if isinstance(target, Packet) and target.direction == "out" and \
                str(ev.detail.get("location", "")).startswith(INBOUND_DROP_FUNCS):
            # a packet this namespace sent, freed on the receive path: the peer namespace's drop of
            # the skb the veth handed it (a drop with no netns of its own says so only this way)
            self.stats.events_other_netns += 1
            return
        if target is not None:
            if isinstance(target, Packet):
                target.events.append(ev)
                self.stats.events_matched += 1
            else:
                self._wait_early(target, ev)
            return
        loc = str(ev.detail.get("location", "?"))
        if self._counters and not drop_reason_named(ev.reason):
            # No probe joined it to a packet and its reason names nothing: the counter that moved
            # with it tells the cause and finds the packet; an incident of its own would be a guess.
            self._unmatched(ev)
            self._note(ev.time_ns, f"drop {ev.reason or '?'} at {loc} (unjoined; the counters explain it)")
            return
        cause = cause_for_drop(ev.reason, loc)
        direction = "out" if "output" in loc or "route" in loc else "in"
        self.incidents.append(Incident(ev.time_ns, "kfree_skb", ev.reason or loc, cause, direction, ev.netns,
                                       detail=f"kfree_skb reason {ev.reason or '?'} at {loc}"))
        self._note(ev.time_ns, f"drop {ev.reason or '?'} at {loc} -> {cause}")

    def _counter(self, ev: Event) -> None:
        inc = self._attribution.counter(ev)
        if inc is not None:
            self.incidents.append(inc)  # attributed later (_attributed)

    def _attributed(self, limit: float) -> None:
        """Attribute the counter deltas whose poll window's packets start to leave the join."""
        for inc in self._attribution.flush(limit):
            self._note(inc.time_ns, f"{inc.name} +{inc.delta} -> {inc.cause}" +
                       (f" ({inc.attributed} captured packet(s))" if inc.attributed else ""))

    def _unmatched(self, ev: Event) -> None:
        k = f"{ev.source}/{ev.kind}"
        st = self.stats.events_unmatched
        st[k] = st.get(k, 0) + 1
        cause = ANCHOR_CAUSES.get(ev.kind)
        if cause is not None:
            self.incidents.append(Incident(ev.time_ns, "kprobe", ev.kind, cause, "in", ev.netns,
                                           spis={ev.spi: 1} if ev.spi else {},
                                           detail=f"anchor {ev.kind} for a packet not captured"))

    def _expire_early(self, now: int | None) -> None:
        order = self._early_order
        while order and (now is None or order[0][0] + self.window_ns < now):
            _, key = order.popleft()
            evs = self._early.pop(key, None)
            for ev in evs or ():
                self._unmatched(ev)

    # -- the end of a packet's window ------------------------------------------------------
    def _finalize(self, p: Packet) -> Packet | None:
        if p.kind == ESP:
            key: tuple[int, int] = (p.spi, p.seq)  # type: ignore[assignment]  # ESP: both are set
            if self._by_spiseq.get(key) is p:
                del self._by_spiseq[key]
            else:
                self._unindex(p, key)
            self._matcher.forget_esp(p)
            if self._skbs.target:
                self._skbs.unlink(p)
        else:
            self._matcher.forget_clear(p)
            if p.absorbed:
                return None
        finish(p, self.ctx)
        self._skbs.forget_left()
        return p
