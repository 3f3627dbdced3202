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

import heapq
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ipsec_capture.correlate.causes import (
    ANCHOR_CAUSES,
    MODE_ERROR_TOO_BIG,
    cause_for_counter,
    cause_for_drop,
    too_big_for_tunnel,
)
from ipsec_capture.correlate.diagnosis import Context, diagnose, fmt_time
from ipsec_capture.correlate.packet import CLEAR, ESP, IKE_POINTS, POINT_ROLES, Packet, direction_of
from ipsec_capture.correlate.sahistory import SaHistory

from ipsec_capture.models import Event, Record

_ESP = struct.Struct("!II")  # RFC 4303: SPI, sequence number
_U16 = struct.Struct("!H")
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
    from ipsec_capture.xfrm.esp_header import locate

    found = locate(pkt)
    if found is None:
        return None
    spi, seq = _ESP.unpack_from(pkt, found[3])
    return (spi, seq) if spi else None


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
            from ipsec_capture.xfrm.esp import EspDecoder

            self.decoder = EspDecoder(sas)
        sources = {s.get("name") for s in (header or {}).get("sources", []) if isinstance(s, dict)
                   and s.get("active", True)}
        self.ctx = Context(history=self.history, clear_points=set(), keys=self.decoder is not None,
                           drop_source=bool(sources & {"kfree_skb", "kprobe", "tracepoint"}),
                           kprobes="kprobe" in sources)
        self._pending: deque[Packet] = deque()
        self._by_spiseq: dict[tuple[int, int], list[Packet]] = {}
        self._early: dict[tuple[int, int], list[Event]] = {}
        self._early_order: deque[tuple[int, tuple[int, int]]] = deque()
        # skb address -> (its packet, or the (SPI, seq) of a probe still waiting for its packet;
        # when the probe saw it). Addresses are reused at once, so only the latest probe counts.
        self._by_skb: dict[str, tuple[Packet | tuple[int, int], int]] = {}
        self._esp_wait: dict[int, Packet] = {}  # clear key -> ESP packet awaiting its cleartext
        self._clear_wait: dict[int, list[Packet]] = {}  # clear key -> cleartext awaiting its ESP
        self._last_poll: dict[int | None, int] = {}

    # -- the merge -------------------------------------------------------------------------
    def run(self, records: Iterable[Record], events: Iterable[Event]) -> Iterator[Packet]:
        now = 0
        window = self.window_ns
        pending = self._pending
        for item in heapq.merge(records, events, key=_time):
            now = item.time_ns
            if type(item) is Record:
                self._record(item)
            else:
                self._event(item)
            while pending and pending[0].time_ns + window < now:
                p = self._finalize(pending.popleft())
                if p is not None:
                    yield p
            self._expire_early(now)
        while pending:
            p = self._finalize(pending.popleft())
            if p is not None:
                yield p
        self._expire_early(None)

    # -- records ---------------------------------------------------------------------------
    def _record(self, rec: Record) -> None:
        st = self.stats
        st.records += 1
        point = rec.point
        payload = rec.payload
        found = None
        role = POINT_ROLES.get(point)
        if point in IKE_POINTS:
            # UDP 4500 carries IKE (non-ESP marker) and NAT-T ESP: only the latter is a packet to judge
            found = _locate_esp(payload)
            if found is None:
                st.ike += 1
                return
            role = (direction_of(rec), ESP)
        elif role is None:
            found = _locate_esp(payload)
            role = (direction_of(rec), ESP if found else CLEAR)
        direction, kind = role
        if kind == ESP:
            found = found or _locate_esp(payload)
            if found is None:
                st.other += 1
                return
            st.esp += 1
            p = Packet(rec.time_ns, point, direction, ESP, rec.wire_length, rec, found[0], found[1],
                       rec.netns)
            self._esp(p)
        else:
            st.clear += 1
            p = Packet(rec.time_ns, point, direction, CLEAR, rec.wire_length, rec, netns=rec.netns)
            self.ctx.clear_points.add(point)
            self._clear(p)
        self._pending.append(p)

    def _esp(self, p: Packet) -> None:
        key = (p.spi, p.seq)
        lst = self._by_spiseq.get(key)
        if lst is None:
            self._by_spiseq[key] = [p]
        else:
            lst.append(p)
        early = self._early.pop(key, None)
        if early:
            for ev in early:
                self._attach(p, ev)
        payload = p.record.payload
        ckey = None
        if self.decoder is not None:
            res = self.decoder.decrypt(payload)
            p.decrypt = res.status
            inner = res.inner
            if inner is not None:
                ckey = _inner_key(inner)
        if ckey is None:
            ckey = _id_key(payload)
        p.key = ckey
        if ckey is not None:
            waiting = self._clear_wait.pop(ckey, None)
            if waiting:
                for c in waiting:
                    self._absorb(p, c)
                return
            self._esp_wait[ckey] = p
        if p.direction == "out" and not p.clear:
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
                first.also.append((c.point, c.time_ns))
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
        p.clear.append((c.point, c.time_ns))
        p.clear.extend(c.also)
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
        src = ev.source
        if src == "xfrm_stat":
            self._counter(ev)
        elif src == "kfree_skb":
            self.ctx.drop_source = True
            self._drop(ev)
        elif src == "kprobe":
            self.ctx.kprobes = self.ctx.drop_source = True
            self._probe(ev)
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
        if ev.spi is None or ev.seq is None:
            self._unmatched(ev)
            return
        key = (ev.spi, ev.seq & 0xFFFFFFFF)
        for p in reversed(self._by_spiseq.get(key, ())):
            same_ns = ev.netns is None or p.netns is None or p.netns == ev.netns
            if same_ns and (ev.kind == "xfrm_output") == (p.direction == "out"):
                self._attach(p, ev)
                return
        self._wait_early(key, ev)
        skb = ev.detail.get("skb") if ev.detail else None
        if skb:
            self._by_skb[skb] = (key, ev.time_ns)

    def _wait_early(self, key: tuple[int, int], ev: Event) -> None:
        """An event whose packet has not been read yet (NFLOG's clock may lag the kernel's)."""
        self._early.setdefault(key, []).append(ev)
        self._early_order.append((ev.time_ns, key))

    def _attach(self, p: Packet, ev: Event) -> None:
        p.events.append(ev)
        self.stats.events_matched += 1
        skb = ev.detail.get("skb") if ev.detail else None
        if skb:
            self._by_skb[skb] = (p, ev.time_ns)

    def _drop(self, ev: Event) -> None:
        skb = ev.detail.get("skbaddr") if ev.detail else None
        target, seen = self._by_skb.get(skb, (None, 0)) if skb else (None, 0)
        if target is not None and 0 <= ev.time_ns - seen <= DROP_AFTER_PROBE_NS:
            if isinstance(target, Packet):
                target.events.append(ev)
                self.stats.events_matched += 1
            else:
                self._wait_early(target, ev)
            return
        loc = str(ev.detail.get("location", "?"))
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
        those whose own evidence fits the cause first."""
        low = (since if since is not None else inc.time_ns - self.window_ns) - self.clear_window_ns
        high = inc.time_ns + self.clear_window_ns
        candidates: list[Packet] = []
        for p in reversed(self._pending):
            if p.time_ns < low:
                break
            if p.time_ns > high or p.direction != inc.direction or p.clear or p.absorbed or p.cause:
                continue
            if inc.netns is not None and p.netns is not None and p.netns != inc.netns:
                continue
            if inc.direction == "in" and p.kind != ESP:
                continue
            if inc.direction == "out" and p.kind != CLEAR:
                continue
            candidates.append(p)
        candidates.reverse()  # oldest first
        candidates.sort(key=lambda p: -self._fit(p, inc.cause))
        too_big = 0
        for p in candidates[:inc.delta]:
            p.cause = inc.cause
            p.counter = inc.name
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

    def _fit(self, p: Packet, cause: str) -> int:
        for ev in p.events:
            if ANCHOR_CAUSES.get(ev.kind) == cause:
                return 2
        if cause == "no-state" and p.spi is not None:
            return 1 if self.history.at(p.spi, p.time_ns, p.netns) is None else 0
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
            lst = self._by_spiseq.get((p.spi, p.seq))
            if lst is not None:
                lst.remove(p)
                if not lst:
                    del self._by_spiseq[(p.spi, p.seq)]
            if p.key is not None and self._esp_wait.get(p.key) is p:
                del self._esp_wait[p.key]
            for ev in p.events:
                skb = ev.detail.get("skb") if ev.detail else None
                if skb and self._by_skb.get(skb, (None,))[0] is p:
                    del self._by_skb[skb]
        else:
            if p.key is not None:
                lst = self._clear_wait.get(p.key)
                if lst and p in lst:
                    lst.remove(p)
                    if not lst:
                        del self._clear_wait[p.key]
            if p.absorbed:
                return None
        diagnose(p, self.ctx)
        return p


def _time(item: Record | Event) -> int:
    return item.time_ns
