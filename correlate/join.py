"""The streaming join: captured packets (Records) and kernel facts (Events), both in time order, in;
joined and diagnosed Packets out, in capture order.

Memory is bounded by the window, not the capture: a packet waits at most `window_ns` of stream
time for its events, its cleartext and the counter poll that may explain it, then it is diagnosed,
yielded and forgotten. Keys:
  - ESP packet <-> kprobe events and anchors: (SPI, sequence number), netns when both know it;
  - kfree_skb drop <-> packet: the skb address the xfrm_input probe saw;
  - ESP <-> cleartext: a hash of the inner packet's addresses and L4 bytes when our decryption
    (keys) gives the inner packet; else (transport mode) outer = inner addresses and IPv4 ID;
    else the nearest unmatched packet of the same direction within `clear_window_ns`;
  - counter deltas -> the unexplained packets of their direction since the previous poll.
Times are only windows: NFLOG stamps are wall clock, BPF stamps converted from monotonic.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from ipsec_capture.decrypt.esp_header import IPPROTO_ESP, locate
from ipsec_capture.models import Event, Record

from .causes import (
    ANCHOR_CAUSES,
    MODE_ERROR_TOO_BIG,
    cause_for_counter,
    cause_for_drop,
    drop_reason_named,
    too_big_for_tunnel,
)
from .diagnosis import PROBE_ACCEPTED, Context, diagnose, fmt_time
from .packet import (
    CLEAR,
    ESP,
    IKE_POINTS,
    LATER,
    OK,
    POINT_ROLES,
    Packet,
    direction_of,
    settle,
    waiting_packet,
)
from .sahistory import SaHistory

_ESP = struct.Struct("!II")  # RFC 4303: SPI, sequence number
_U16 = struct.Struct("!H")
_IP4_MF_OR_OFFSET = 0x3FFF  # More Fragments bit plus the 13-bit fragment offset
# Plain IPv4 ESP, nearly every packet of a capture: version 4 and a 20-byte header (0x45), the
# fragment field, the protocol, and the SPI and sequence number right after the header. When it
# is ESP and not a fragment, this is what xfrm.esp_header.locate() finds, without its call.
_IP4_ESP = struct.Struct("!B5xHxB10xII")
_PROBE_KINDS = frozenset({"xfrm_input", "xfrm_output"})  # the probes the run loop attaches itself
_ESP_POINTS = {point: direction for point, (direction, kind) in POINT_ROLES.items() if kind == ESP}
SECOND = 1_000_000_000
DROP_AFTER_PROBE_NS = SECOND // 2  # xfrm_input's drop follows its probe within microseconds (ms under TCG)


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
    capture_stats: dict[str, Any] = field(default_factory=dict)


# where the transport checksum sits, per protocol (TCP, UDP, ICMP, ICMPv6)
_CSUM_AT = {6: 16, 17: 6, 1: 2, 58: 2}


def _l4_key_bytes(proto: int, l4: bytes | memoryview) -> bytes:
    """L4 bytes with the checksum left out: the kernel logs outbound cleartext before the checksum
    is completed (CHECKSUM_PARTIAL, seen on IPv6 UDP over veth), ESP carries the finished one."""
    at = _CSUM_AT.get(proto)
    if at is None or len(l4) < at + 2:
        return bytes(l4)
    return bytes(l4[:at]) + bytes(l4[at + 2:])


def _inner_key(pkt: bytes | memoryview) -> int | None:
    """Hash of the addresses and L4 bytes: the same for the inner packet we decrypted and the
    cleartext the kernel logged, whatever TTL/checksum/length fixes happened in between."""
    if len(pkt) < 20:
        return None
    v = pkt[0] >> 4
    if v == 4:
        ihl = (pkt[0] & 0x0F) * 4
        end = _U16.unpack_from(pkt, 2)[0] or len(pkt)
        return hash(bytes(pkt[12:20]) + _l4_key_bytes(pkt[9], pkt[ihl:end]))
    if v == 6 and len(pkt) >= 40:
        return hash(bytes(pkt[8:40]) + _l4_key_bytes(pkt[6], pkt[40:40 + _U16.unpack_from(pkt, 4)[0]]))
    return None


def _id_key(pkt: bytes | memoryview) -> int | None:
    """Transport mode without keys: outer and inner share addresses and the IPv4 ID."""
    if len(pkt) >= 20 and pkt[0] >> 4 == 4:
        return hash((bytes(pkt[12:20]), _U16.unpack_from(pkt, 4)[0]))
    return None


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
        # skb address -> (its packet, or the (SPI, seq) of a probe still waiting for its packet;
        # when the probe saw it). Addresses are reused at once, so only the latest probe counts.
        self._skb_target: dict[str, Packet | tuple[int, int]] = {}
        self._skb_seen: dict[str, int] = {}
        # The probes the run loop attached, in order, not yet written to those two dicts: most skb
        # addresses are never looked up (no drop names them), so the two writes and two deletes
        # per packet in dicts of a whole window are paid only once a lookup needs them (_skb_sync).
        self._skb_log_packets: deque[Packet] = deque()
        self._skb_log_probes: deque[Event] = deque()
        self._esp_wait: dict[int, Packet] = {}  # clear key -> ESP packet awaiting its cleartext
        self._clear_wait: dict[int, list[Packet]] = {}  # clear key -> cleartext awaiting its ESP
        self._last_poll: dict[int | None, int] = {}
        # Without keys, an ESP packet's clear key (addresses + IPv4 ID) only serves a cleartext
        # record: until the first one arrives, it is left unbuilt (see _key_pending_esp).
        self._lazy_keys = self.decoder is None
        self._clear_out = 0  # outbound cleartext packets pending: none, no nearest-match scan
        self._anchor_kinds = False  # an event of an anchor's kind came (fit 2 possible in _attribute)

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
        skb_target = self._skb_target
        log_packets, log_probes = self._skb_log_packets, self._skb_log_probes
        ctx = self.ctx
        sa_lives = self.history.by_spi  # none: no SA to look up for a packet
        record, event, finalize, record_esp = self._record, self._event, self._finalize, self._record_esp
        esp_points, ip4_esp, end = _ESP_POINTS, _IP4_ESP.unpack_from, _END
        record_type, packet_type, new_packet = Record, Packet, waiting_packet
        n_esp = n_other = n_probes = 0
        probed = False  # ctx.kprobes and ctx.drop_source set
        due = math.inf  # when the oldest pending packet's window ends
        rit, eit = iter(records), iter(events)
        rec, ev = next(rit, end), next(eit, end)
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
                    elif self._lazy_keys:  # _record_esp and _esp, with no clear key to build
                        n_esp += 1
                        found = (spi, seq)
                        p = new_packet(now, item.point, direction, ESP, item.length or len(payload), item,
                                       spi, seq, item.netns)
                        same = by_spiseq.setdefault(found, p)
                        if same is not p:
                            self._index_again(p, found, same)
                        if self._early:
                            self._attach_early(p, found)
                        if not pending:
                            due = now + window
                        pending.append(p)
                    else:
                        n_esp += 1
                        record_esp(item, direction, (spi, seq))
                        due = pending[0].time_ns + window
                else:
                    p = None
                    if item.source == "kprobe":
                        spi, seq, kind = item.spi, item.seq, item.kind
                        if spi is not None and seq is not None and kind in _PROBE_KINDS:
                            p = by_spiseq.get((spi, seq & 0xFFFFFFFF))
                            if type(p) is not packet_type or not \
                                    ((item.netns is None or p.netns is None or p.netns == item.netns)
                                     and (kind == "xfrm_output") == (p.direction == "out")):
                                p = None
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
                    while pending and pending[0].time_ns < limit:
                        p = pending.popleft()
                        if p.kind == ESP:  # _finalize
                            key = (p.spi, p.seq)
                            if by_spiseq.get(key) is p:
                                del by_spiseq[key]
                            else:
                                self._unindex(p, key)
                            if p.key is not None and self._esp_wait.get(p.key) is p:
                                del self._esp_wait[p.key]
                            events = p.events
                            if skb_target:
                                self._unlink_skbs(p)
                            if len(events) == 1 and p.cause is None and not p.clear and p.direction != "out" \
                                    and not sa_lives and (probed or ctx.drop_source):
                                e = events[0]
                                ret = e.ret
                                if ret == 0 and e.kind == "xfrm_input" and e.source != "kfree_skb" \
                                        and type(ret) is int:
                                    # diagnose()'s lone accepting probe, and settle(): with no cause
                                    # nor cleartext, its lists are still LATER
                                    p.verdict = OK
                                    p.clear, p.also, p.evidence = [], [], [PROBE_ACCEPTED]
                                else:
                                    settle(p)
                                    diagnose(p, ctx)
                            else:
                                settle(p)
                                diagnose(p, ctx)
                            while log_packets and log_packets[0].also is not LATER:  # left the window
                                self._skb_forget()
                            yield p
                        else:
                            p = finalize(p)
                            if p is not None:
                                yield p
                    due = pending[0].time_ns + window if pending else math.inf
                if early_order and early_order[0][0] + window < now:
                    self._expire_early(now)
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
        if self._lazy_keys:
            self._key_pending_esp()
        self._clear(p)
        if direction == "out":
            self._clear_out += 1
        self._pending.append(p)

    def _key_pending_esp(self) -> None:
        """The first cleartext record: give the ESP packets still pending the clear keys they were
        left without, in arrival order (the latest of a key wins, as if built on arrival)."""
        self._lazy_keys = False
        esp_wait = self._esp_wait
        for p in self._pending:
            if p.kind == ESP:
                p.key = _id_key(p.record.payload)
                if p.key is not None:
                    esp_wait[p.key] = p

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

    def _esp(self, p: Packet, key: tuple[int, int]) -> None:
        same = self._by_spiseq.get(key)
        if same is None:
            self._by_spiseq[key] = p
        else:
            self._index_again(p, key, same)
        if self._early:
            self._attach_early(p, key)
        ckey = None
        if self.decoder is not None:
            res = self.decoder.decrypt(p.record.payload)
            p.decrypt = res.status
            inner = res.inner
            if inner is not None:
                ckey = _inner_key(inner)
        elif self._lazy_keys:
            return  # no cleartext seen yet: nothing waits for this packet, nothing to match
        if ckey is None:
            ckey = _id_key(p.record.payload)
        p.key = ckey
        if ckey is not None:
            waiting = self._clear_wait.pop(ckey, None)
            if waiting:
                for c in waiting:
                    self._absorb(p, c)
                return
            self._esp_wait[ckey] = p
        if p.direction == "out" and not p.clear and self._clear_out:
            self._absorb_nearest(p)

    def _clear(self, c: Packet) -> None:
        payload = c.record.payload
        keys = [k for k in ((_inner_key(payload) if self.decoder is not None else None), _id_key(payload))
                if k is not None]
        for k in keys:
            esp = self._esp_wait.get(k)
            if esp is not None:
                self._absorb(esp, c)
                return
        if c.direction == "in":
            # inbound cleartext follows its ESP packet within microseconds: the nearest one
            for p in reversed(self._pending):
                if c.time_ns - p.time_ns > self.clear_window_ns:
                    break
                if p.kind == ESP and p.direction == "in" and p.decrypt != "ok" and \
                        all(pt != c.point for pt, _ in p.clear):
                    self._absorb(p, c)
                    return
        c.key = keys[0] if keys else None
        if c.key is not None:
            waiting = self._clear_wait.setdefault(c.key, [])
            first = waiting[-1] if waiting else None
            if first is not None and first.point != c.point and all(pt != c.point for pt, _ in first.also) \
                    and c.time_ns - first.time_ns <= self.clear_window_ns:
                # the same packet at its next point (filter-out then mangle-post-out): one packet
                c.absorbed = True
                if first.also:
                    first.also.append((c.point, c.time_ns))
                else:
                    first.also = [(c.point, c.time_ns)]
                return
            waiting.append(c)

    def _absorb_nearest(self, p: Packet) -> None:
        """Outbound ESP without a key match: the most recent unmatched cleartext just before it."""
        for c in reversed(self._pending):
            if p.time_ns - c.time_ns > self.clear_window_ns:
                break
            if c.kind == CLEAR and c.direction == "out" and not c.absorbed and \
                    (self.decoder is None or p.decrypt != "ok"):
                self._absorb(p, c)
                for other in reversed(self._pending):  # its other outbound points, same packet
                    if other.kind == CLEAR and not other.absorbed and other.key == c.key and other.key:
                        self._absorb(p, other)
                return

    def _absorb(self, p: Packet, c: Packet) -> None:
        c.absorbed = True
        if p.clear:
            p.clear.append((c.point, c.time_ns))
            p.clear.extend(c.also)
        else:
            p.clear = [(c.point, c.time_ns), *c.also]
        self.stats.clear_matched += 1 + len(c.also)
        if c.key is not None:
            lst = self._clear_wait.get(c.key)
            if lst and c in lst:
                lst.remove(c)
                if not lst:
                    del self._clear_wait[c.key]

    # -- events ----------------------------------------------------------------------------
    def _event(self, ev: Event) -> None:
        self.stats.events += 1
        if ev.kind in ANCHOR_CAUSES:
            self._anchor_kinds = True
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
            for p in (same,) if type(same) is Packet else reversed(same):
                if (netns is None or p.netns is None or p.netns == netns) and out == (p.direction == "out"):
                    self._attach(p, ev)
                    return
        self._wait_early(key, ev)
        skb = ev.detail.get("skb") if ev.detail else None
        if skb:
            self._skb_sync()
            self._skb_target[skb] = key
            self._skb_seen[skb] = ev.time_ns

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
                self._skb_sync()
                self._skb_target[skb] = p
                self._skb_seen[skb] = ev.time_ns

    def _skb_sync(self) -> None:
        """Write the logged probes to the skb dicts, in order, as if each had been written when
        attached: a packet that has left the window since took its address with it (_finalize)."""
        target, seen = self._skb_target, self._skb_seen
        for p, ev in zip(self._skb_log_packets, self._skb_log_probes, strict=True):
            skb = ev.detail["skb"]
            if p.also is LATER:  # still waiting (an ESP packet's `also` stays LATER until settle())
                target[skb] = p
                seen[skb] = ev.time_ns
            else:
                target.pop(skb, None)
                seen.pop(skb, None)
        self._skb_log_packets.clear()
        self._skb_log_probes.clear()

    def _skb_forget(self) -> None:
        """The oldest logged probe's packet left the window: the probe is no longer needed, and
        the address it would have taken leaves with the packet (older entries included)."""
        self._skb_log_packets.popleft()
        ev = self._skb_log_probes.popleft()
        if self._skb_target:
            skb = ev.detail["skb"]
            self._skb_target.pop(skb, None)
            self._skb_seen.pop(skb, None)

    def _unlink_skbs(self, p: Packet) -> None:
        """p leaves the window: the skb addresses that still name it name nothing now."""
        target = self._skb_target
        for ev in p.events:
            skb = ev.detail.get("skb") if ev.detail else None
            if skb and target.get(skb) is p:
                del target[skb], self._skb_seen[skb]

    def _drop(self, ev: Event) -> None:
        skb = ev.detail.get("skbaddr") if ev.detail else None
        if skb:
            self._skb_sync()
        target = self._skb_target.get(skb) if skb else None
        seen = self._skb_seen[skb] if target is not None else 0
        if target is not None and 0 <= ev.time_ns - seen <= DROP_AFTER_PROBE_NS:
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
        name = ev.reason or "?"
        delta = int(ev.detail.get("delta", 0))
        if delta <= 0:
            return
        cause, direction = cause_for_counter(name)
        since = self._last_poll.get(ev.netns)
        inc = Incident(ev.time_ns, "xfrm_stat", name, cause, direction, ev.netns, delta=delta,
                       detail=f"{name} +{delta}")
        self._attribute(inc, since)
        self._last_poll[ev.netns] = ev.time_ns
        self.incidents.append(inc)
        self._note(ev.time_ns, f"{name} +{delta} -> {inc.cause}" +
                   (f" ({inc.attributed} captured packet(s))" if inc.attributed else ""))

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
        if self._anchor_kinds:  # some packet may have fit 2: rank them all
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
        pending = self._pending
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
            return 1 if self.history.at(p.spi, p.time_ns, p.netns, p.dst, p.state_mark) is None else 0
        if cause == "icv-fail" and p.decrypt == "icv-fail":
            return 1
        return 0

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
            key = (p.spi, p.seq)
            if self._by_spiseq.get(key) is p:
                del self._by_spiseq[key]
            else:
                self._unindex(p, key)
            if p.key is not None and self._esp_wait.get(p.key) is p:
                del self._esp_wait[p.key]
            if self._skb_target:
                self._unlink_skbs(p)
        else:
            if p.direction == "out":
                self._clear_out -= 1
            if p.key is not None:
                lst = self._clear_wait.get(p.key)
                if lst and p in lst:
                    lst.remove(p)
                    if not lst:
                        del self._clear_wait[p.key]
            if p.absorbed:
                return None
        settle(p)
        log = self._skb_log_packets
        while log and log[0].also is not LATER:  # left the window
            self._skb_forget()
        diagnose(p, self.ctx)
        return p

