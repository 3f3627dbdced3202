"""What `watch` knows at any moment: the SAs of each namespace with the kernel's own per-SA
numbers, the failures it could pin on an SA, the xfrm_stat counters, SA lifecycle, our losses, and
the incidents (the first drop of a cause on an SA).

Pure bookkeeping, no I/O: the service feeds it SA dumps, Events and ESP arrivals and prints what
it returns, the exporter reads it. One lock guards it, because the HTTP thread reads while the
main loop writes.

Where each failure count comes from (one place per cause, so nothing is counted twice):
  - replay and icv-fail per SA: the kernel's own per-SA `struct xfrm_stats` (replay,
    integrity_failed) from the SA dump;
  - no-state: the kernel cannot name an SA it has not got, so the SPI comes from the packet. A
    candidate is an inbound ESP packet whose (destination, SPI) has no SA here (seen by the ESP tap
    rule, or named by the kprobe source's xfrm_audit_state_notfound anchor); XfrmInNoStates moving
    in that namespace confirms it, and only as many candidates as the counter moved are counted (a
    move waits `no_state_grace` for packets still in an NFLOG batch, then counts per namespace);
  - everything else per namespace: the xfrm_stat counter, by the cause correlate/causes.py names.
Labels stay bounded: one series per SA (plus cause), and an SA that is gone is dropped from the
metrics `forget_after` seconds later.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ipsec_capture.correlate.causes import CAUSES, cause_for_counter, cause_for_drop
from ipsec_capture.models import Event
from ipsec_capture.xfrm.sa import SA

# per-SA struct xfrm_stats fields the kernel counts -> our cause names
SA_STAT_CAUSES = {"replay": "replay", "integrity_failed": "icv-fail"}
KERNEL_PER_SA = frozenset(SA_STAT_CAUSES.values())
NO_STATE_COUNTER = "XfrmInNoStates"
LIFECYCLE = ("new", "rekey", "delete", "expire-soft", "expire-hard")


def _pack(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)


def algorithm_of(sa: SA) -> str:
    """One label value for the transform: `rfc4106(gcm(aes))`, `cbc(aes)+hmac(sha256)`."""
    if sa.aead is not None:
        return sa.aead.name
    names = [a.name for a in (sa.enc, sa.auth, sa.comp) if a is not None]
    return "+".join(names) or "none"


def spi_label(spi: int) -> str:
    return f"0x{spi:08x}"


@dataclass(slots=True)
class SaEntry:
    """One SA as the metrics show it; `packets`/`bytes` are the kernel's (curlft), `failed` holds
    per cause what the kernel or watch counted for it."""

    netns: str
    spi: int
    src: str
    dst: str
    proto: int
    direction: str
    algorithm: str
    reqid: int = 0
    packets: int = 0
    bytes: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    installed: bool = True  # False: seen only as the target of packets (no SA in the kernel)
    gone_at: float | None = None
    deleted_at: float | None = None

    def labels(self) -> tuple[str, str, str, str, str, str]:
        return (self.netns, spi_label(self.spi), self.src, self.dst, self.direction, self.algorithm)

    def public(self) -> dict[str, Any]:
        return {"spi": spi_label(self.spi), "src": self.src, "dst": self.dst,
                "direction": self.direction, "algorithm": self.algorithm, "netns": self.netns,
                "installed": self.installed}

    @property
    def peer(self) -> str:
        return self.src if self.direction == "in" else self.dst


# (netns, src, dst, spi, proto): the kernel finds an inbound SA by (dst, spi, proto) and its mark;
# Cilium gives every peer's inbound SA the same dst and SPI, told apart by mark, so src is in the key
SaKey = tuple[str, str, str, int, int]


@dataclass(slots=True)
class Candidate:
    """An inbound ESP packet for a (dst, SPI) with no SA here, waiting for XfrmInNoStates."""

    dst: str
    spi: int
    src: str
    count: int
    seen: float
    via: str  # esp-tap | kprobe


@dataclass(slots=True)
class Incident:
    """The first drop of a cause on an SA (or in a namespace, when no SA can be named)."""

    time_ns: int
    cause: str
    netns: str
    sa: SaEntry | None
    count: int
    evidence: list[str]

    def to_dict(self) -> dict[str, Any]:
        c = CAUSES.get(self.cause)
        return {"time_ns": self.time_ns,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.time_ns / 1e9))
                        + f".{self.time_ns % 1_000_000_000 // 1_000_000:03d}Z",
                "incident": self.cause, "summary": c.summary if c else "", "hint": c.hint if c else "",
                "netns": self.netns, "sa": self.sa.public() if self.sa else None,
                "peer": self.sa.peer if self.sa else None, "count": self.count,
                "evidence": self.evidence}


def local_address_test(netns_of: Callable[[str], Any]) -> Callable[[str, str], bool]:
    """(netns, address) -> is it one of that namespace's own addresses (bind test, cached)."""
    cache: dict[tuple[str, str], bool] = {}

    def is_local(netns: str, addr: str) -> bool:
        key = (netns, addr)
        if key not in cache:
            fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
            try:
                with netns_of(netns):
                    s = socket.socket(fam, socket.SOCK_DGRAM)
                try:
                    s.bind((addr, 0))
                    cache[key] = True
                except OSError:
                    cache[key] = False
                finally:
                    s.close()
            except Exception:
                return False
        return cache[key]

    return is_local


class WatchState:
    """Everything the exporter shows and the incidents the service prints (see module doc)."""

    def __init__(self, is_local: Callable[[str, str], bool], forget_after: float = 300.0,
                 quiet_after: float = 60.0, candidate_ttl: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lock = threading.RLock()
        self.is_local = is_local
        self.forget_after = forget_after
        self.quiet_after = quiet_after
        self.candidate_ttl = candidate_ttl
        self.clock = clock
        self.sas: dict[SaKey, SaEntry] = {}
        self.live: dict[str, set[tuple[str, int]]] = {}  # netns -> {(dst, spi)} of installed SAs
        # the same with dst packed, for the ESP tap's per-packet test (no address string per packet)
        self.live_packed: dict[str, set[tuple[bytes, int]]] = {}
        self.no_state_grace = 1.0  # seconds an XfrmInNoStates move waits for its packets (NFLOG batches)
        self._waiting: dict[str, list[Any]] = {}  # netns -> [left, value, since] of a no-state move
        self.xfrm_stat: dict[str, dict[str, int]] = {}  # netns -> counter -> value
        self.lifecycle: dict[tuple[str, str, str, str], int] = {}  # (netns, src, dst, event) -> n
        self.lost: dict[tuple[str, str], int] = {}  # (netns, what) -> n
        self.source_up: dict[tuple[str, str], bool] = {}  # (netns, source) -> active
        self.incidents_total: dict[tuple[str, str], int] = {}  # (netns, cause) -> n
        self.unattributed: dict[tuple[str, str], int] = {}  # (netns, cause): drops no SA could take
        self.candidates: dict[str, deque[Candidate]] = {}
        self.recent_drops: deque[tuple[float, str, str]] = deque(maxlen=64)  # (t, cause, where)
        self._active: dict[tuple[str, str, SaKey | None], float] = {}  # incident key -> last drop
        self.recorder: dict[str, int] = {}  # the flight recorder's own numbers (bundles, ring bytes)
        self.ready = False  # every source attached (what the `ready` line says; readiness probes)
        self.started = clock()

    # -- SAs -------------------------------------------------------------------------------------
    def _entry(self, netns: str, sa: SA) -> SaEntry:
        key = (netns, sa.src, sa.dst, sa.spi, sa.proto)
        e = self.sas.get(key)
        if e is None or not e.installed:
            direction = sa.direction or ("in" if self.is_local(netns, sa.dst) else "out")
            failed = e.failed if e is not None else {}
            e = SaEntry(netns, sa.spi, sa.src, sa.dst, sa.proto, direction, algorithm_of(sa),
                        reqid=sa.reqid, failed=failed)
            self.sas[key] = e
            self.live.setdefault(netns, set()).add((sa.dst, sa.spi))
            self.live_packed.setdefault(netns, set()).add((_pack(sa.dst), sa.spi))
        return e

    def sync_sas(self, netns: str, sas: list[SA], now_ns: int | None = None) -> list[Incident]:
        """A fresh SA dump of `netns`: the kernel's per-SA numbers; SAs missing from it are gone."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        out: list[Incident] = []
        with self.lock:
            t = self.clock()
            seen: set[SaKey] = set()
            for sa in sas:
                e = self._entry(netns, sa)
                e.gone_at = None
                seen.add((netns, sa.src, sa.dst, sa.spi, sa.proto))
                e.packets = sa.lifetime_cur.get("packets", 0)
                e.bytes = sa.lifetime_cur.get("bytes", 0)
                for stat, cause in SA_STAT_CAUSES.items():
                    value = sa.stats.get(stat, 0)
                    delta = value - e.stats.get(stat, 0)
                    e.stats[stat] = value
                    e.failed[cause] = value
                    if delta > 0:
                        inc = self._drop(netns, cause, e, delta, now_ns,
                                         [f"the kernel's per-SA counter {stat} +{delta} (now {value})"])
                        if inc is not None:
                            out.append(inc)
            self.live[netns] = {(k[2], k[3]) for k in seen}
            self.live_packed[netns] = {(_pack(k[2]), k[3]) for k in seen}
            for key, e in list(self.sas.items()):
                if key[0] != netns or key in seen:
                    continue
                if e.installed and e.gone_at is None:
                    e.gone_at = t
                    e.installed = False
            self._forget(t)
        return out

    def _forget(self, t: float) -> None:
        for key, e in list(self.sas.items()):
            if e.gone_at is not None and t - e.gone_at >= self.forget_after:
                del self.sas[key]
        for incident, last in list(self._active.items()):
            if t - last >= max(self.quiet_after, self.forget_after):
                del self._active[incident]

    # -- events ----------------------------------------------------------------------------------
    def on_event(self, ev: Event, netns: str) -> list[Incident]:
        """One Event from a source of `netns` (tracepoint drops carry none: the caller's default)."""
        with self.lock:
            if ev.source == "xfrm_stat" and ev.kind == "counter" and ev.reason:
                return self._counter(netns, ev.reason, int(ev.detail.get("delta", 0)),
                                     int(ev.detail.get("value", 0)), ev.time_ns)
            if ev.source == "xfrm_monitor":
                self._monitor(ev, netns)
                return []
            if ev.source == "kprobe" and ev.kind == "notfound" and ev.spi:
                dst = (ev.tuple or {}).get("dst") or ""
                self.add_candidate(netns, dst, ev.spi, (ev.tuple or {}).get("src") or "", 1, "kprobe")
            elif ev.source == "kfree_skb" and ev.kind == "drop":
                where = str(ev.detail.get("location", ""))
                self.recent_drops.append((self.clock(), cause_for_drop(ev.reason, where),
                                          f"{where} ({ev.reason or 'no reason'})"))
            elif ev.kind in ("lost", "overrun"):
                n = int(ev.detail.get("lost", ev.detail.get("count", 1)) or 1)
                k = (netns, f"{ev.source}-events")
                self.lost[k] = self.lost.get(k, 0) + n
            return []

    def _monitor(self, ev: Event, netns: str) -> None:
        sa_d = ev.detail.get("sa")
        if ev.kind == "overrun":
            k = (netns, "xfrm_monitor-events")
            self.lost[k] = self.lost.get(k, 0) + 1
            return
        if not sa_d:
            return
        sa = SA.from_dict(sa_d)
        src, dst = sa.src, sa.dst
        if ev.kind == "sa-new":
            rekey = any(e.installed and e.src == src and e.dst == dst and e.proto == sa.proto
                        and e.reqid == sa.reqid and e.spi != sa.spi and e.netns == netns
                        for e in self.sas.values())
            self._entry(netns, sa)
            self._count_life(netns, src, dst, "rekey" if rekey else "new")
        elif ev.kind == "sa-delete":
            key = (netns, src, dst, sa.spi, sa.proto)
            e = self.sas.get(key)
            if e is not None and e.installed:
                e.installed = False
                e.gone_at = e.deleted_at = self.clock()
            if not any(k[0] == netns and k[2] == dst and k[3] == sa.spi and v.installed
                       for k, v in self.sas.items()):
                self.live.get(netns, set()).discard((dst, sa.spi))
                self.live_packed.get(netns, set()).discard((_pack(dst), sa.spi))
            self._count_life(netns, src, dst, "delete")
        elif ev.kind == "expire":
            self._count_life(netns, src, dst, "expire-hard" if ev.detail.get("hard") else "expire-soft")

    def _count_life(self, netns: str, src: str, dst: str, event: str) -> None:
        k = (netns, src, dst, event)
        self.lifecycle[k] = self.lifecycle.get(k, 0) + 1

    # -- ESP arrivals for SPIs without an SA -------------------------------------------------------
    def has_sa(self, netns: str, dst: str, spi: int) -> bool:
        return (dst, spi) in self.live.get(netns, ())

    def add_candidate(self, netns: str, dst: str, spi: int, src: str, count: int, via: str) -> None:
        with self.lock:
            q = self.candidates.setdefault(netns, deque(maxlen=256))
            t = self.clock()
            for c in q:
                if c.dst == dst and c.spi == spi and c.via == via:
                    c.count += count
                    c.seen = t
                    return
            q.append(Candidate(dst, spi, src, count, t, via))

    def _counter(self, netns: str, name: str, delta: int, value: int, now_ns: int) -> list[Incident]:
        self.xfrm_stat.setdefault(netns, {})[name] = value
        if delta <= 0:
            return []
        cause, _direction = cause_for_counter(name)
        out: list[Incident] = []
        left = delta
        if name == NO_STATE_COUNTER:
            left, out = self._attribute_no_state(netns, delta, now_ns)
            if left > 0:  # its packets may still be in an NFLOG batch: settle() looks again
                w = self._waiting.setdefault(netns, [0, value, self.clock()])
                w[0] += left
                w[1] = value
            return out
        return out + self._blame_netns(netns, name, cause, left, value, now_ns)

    def settle(self, now_ns: int | None = None) -> list[Incident]:
        """No-state moves still waiting: pinned on candidates that came since, or after
        `no_state_grace` seconds blamed on the namespace. The service calls it every turn."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        out: list[Incident] = []
        with self.lock:
            t = self.clock()
            for netns, w in list(self._waiting.items()):
                left, got = self._attribute_no_state(netns, w[0], now_ns)
                out += got
                w[0] = left
                if left <= 0:
                    del self._waiting[netns]
                elif t - w[2] >= self.no_state_grace:
                    del self._waiting[netns]
                    cause, _d = cause_for_counter(NO_STATE_COUNTER)
                    out += self._blame_netns(netns, NO_STATE_COUNTER, cause, left, w[1], now_ns)
        return out

    def _blame_netns(self, netns: str, name: str, cause: str, left: int, value: int,
                     now_ns: int) -> list[Incident]:
        out: list[Incident] = []
        if left > 0:
            k = (netns, cause)
            self.unattributed[k] = self.unattributed.get(k, 0) + left
            if cause in KERNEL_PER_SA and self._sa_incident_active(netns, cause):
                return out  # the per-SA counter already opened it
            evidence = [f"{name} +{left} (now {value}) in netns {netns}"]
            evidence += self._drop_evidence(cause)
            inc = self._drop(netns, cause, None, left, now_ns, evidence)
            if inc is not None:
                out.append(inc)
        return out

    def _attribute_no_state(self, netns: str, delta: int, now_ns: int) -> tuple[int, list[Incident]]:
        q = self.candidates.get(netns)
        out: list[Incident] = []
        t = self.clock()
        left = delta
        while q and left > 0:
            c = q[0]
            if t - c.seen > self.candidate_ttl:
                q.popleft()
                continue
            take = min(c.count, left)
            c.count -= take
            left -= take
            if c.count == 0:
                q.popleft()
            e = self._target(netns, c)
            e.failed["no-state"] = e.failed.get("no-state", 0) + take
            evidence = [f"XfrmInNoStates +{delta} in netns {netns}",
                        f"{take} ESP packet(s) from {c.src} for SPI {spi_label(c.spi)} to {c.dst} with no "
                        f"SA (dst, SPI) in the kernel ({c.via})"]
            if e.deleted_at is not None:
                evidence.append(f"this SA was deleted {t - e.deleted_at:.1f} s before")
            evidence += self._drop_evidence("no-state")
            inc = self._drop(netns, "no-state", e, take, now_ns, evidence)
            if inc is not None:
                out.append(inc)
        return left, out

    def _target(self, netns: str, c: Candidate) -> SaEntry:
        """The SA a no-state packet was meant for: the gone SA that had this (dst, SPI), else an
        entry made from the packet alone (algorithm unknown)."""
        for proto in (50, 51):
            e = self.sas.get((netns, c.src, c.dst, c.spi, proto))
            if e is not None:
                return e
        for k, e in self.sas.items():  # a wildcard source (Cilium's legacy `src 0.0.0.0` states)
            if k[0] == netns and k[2] == c.dst and k[3] == c.spi:
                return e
        e = SaEntry(netns, c.spi, c.src, c.dst, 50, "in", "unknown", installed=False, gone_at=self.clock())
        self.sas[(netns, c.src, c.dst, c.spi, 50)] = e
        return e

    def _drop_evidence(self, cause: str) -> list[str]:
        t = self.clock()
        where: dict[str, int] = {}
        for seen, c, w in self.recent_drops:
            if c == cause and t - seen <= self.candidate_ttl:
                where[w] = where.get(w, 0) + 1
        return [f"skb:kfree_skb at {w} x{n}" for w, n in where.items()]

    def _sa_incident_active(self, netns: str, cause: str) -> bool:
        t = self.clock()
        return any(k[0] == netns and k[1] == cause and k[2] is not None and t - last < self.quiet_after
                   for k, last in self._active.items())

    def _drop(self, netns: str, cause: str, e: SaEntry | None, n: int, now_ns: int,
              evidence: list[str]) -> Incident | None:
        """Record drops of `cause`; an Incident if this starts one (none active within quiet_after)."""
        key = (netns, cause, (e.netns, e.src, e.dst, e.spi, e.proto) if e else None)
        t = self.clock()
        last = self._active.get(key)
        self._active[key] = t
        if last is not None and t - last < self.quiet_after:
            return None
        k = (netns, cause)
        self.incidents_total[k] = self.incidents_total.get(k, 0) + 1
        return Incident(now_ns, cause, netns, e, n, evidence)

    def set_counters(self, netns: str, values: dict[str, int]) -> None:
        """The xfrm_stat baseline at start, so every counter is exported before it first moves."""
        with self.lock:
            have = self.xfrm_stat.setdefault(netns, {})
            for name, value in values.items():
                have.setdefault(name, value)

    def set_recorder(self, numbers: dict[str, int]) -> None:
        with self.lock:
            self.recorder = dict(numbers)

    def set_source(self, netns: str, source: str, active: bool) -> None:
        with self.lock:
            self.source_up[(netns, source)] = active

    def add_lost(self, netns: str, what: str, n: int) -> None:
        if n > 0:
            with self.lock:
                k = (netns, what)
                self.lost[k] = self.lost.get(k, 0) + n

    def reload(self) -> None:
        """SIGHUP: forget SAs that are gone and the incident memory (the next drop opens anew)."""
        with self.lock:
            for key, e in list(self.sas.items()):
                if not e.installed:
                    del self.sas[key]
            self._active.clear()
            self.candidates.clear()
            self._waiting.clear()
