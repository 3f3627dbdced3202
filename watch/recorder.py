"""The flight recorder: the last packets of every capture point in a bounded ring, and a normal
bundle (pcapng + events log + esp_sa, written by the same writers as `start`) around each incident,
so `ipsec-capture report` explains it later on any machine.

The ring holds NFLOG batches as the reader returned them (the Records point into the batch's own
bytes, so keeping a packet costs no copy); it is bounded by bytes, oldest batch out first. Events
of the same namespace are kept for the same span. An incident starts a bundle covering
[incident - before, incident + after]; it is written once `after` has passed. Bundles are
rate-limited (at most one per `min_gap` seconds; the ones skipped are counted) and bounded on
disk (the oldest incident bundles in DIR beyond `max_bundles` are removed, all three files).
Keys: every SA seen by the SA dumps is remembered with its keys until it has been gone for
--forget seconds, so a bundle still decrypts the packets of an SA deleted just before.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipsec_capture.bpf.eventlog import EventLogWriter, make_header
from ipsec_capture.bundle import Bundle
from ipsec_capture.models import Event, Record

from .state import Incident, WatchState

MB = 1 << 20
# What a kept packet costs beside its bytes, measured (CPython 3.11): the Record (160 B), its
# payload and nflog memoryviews (184 B each), its ints and its slot in the batch list. With 96 here
# the lab's 4 MB ring took 13 MB of RSS (bench/watch.py).
RECORD_OVERHEAD = 650
EVENTS_KEPT = 50_000  # per namespace, besides the time bound
NAME = re.compile(r"^incident-.*\.pcapng$")


class Ring:
    """Batches of Records, bounded by bytes (oldest first out)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.packets = 0
        self.evicted = 0
        self._batches: deque[tuple[int, list[Record], int]] = deque()

    def add(self, batch: list[Record]) -> None:
        size = 0
        for rec in batch:
            size += len(rec.nflog if rec.nflog is not None else rec.payload) + RECORD_OVERHEAD
        self._batches.append((batch[-1].time_ns, batch, size))
        self.size += size
        self.packets += len(batch)
        while self.size > self.limit and len(self._batches) > 1:
            _t, old, s = self._batches.popleft()
            self.size -= s
            self.packets -= len(old)
            self.evicted += len(old)

    def between(self, start_ns: int, end_ns: int) -> list[Record]:
        out: list[Record] = []
        for last, batch, _s in self._batches:
            if last < start_ns:
                continue
            out.extend(r for r in batch if start_ns <= r.time_ns <= end_ns)
        out.sort(key=lambda r: r.time_ns)
        return out


@dataclass(slots=True)
class Pending:
    """A bundle waiting for the end of its window."""

    netns: str
    incident: Incident
    start_ns: int
    end_ns: int
    path: Path


class FlightRecorder:
    def __init__(self, opts: Any, state: WatchState, clock: dict[str, int] | None = None,
                 stamp_late_ns: int = 0) -> None:
        from ipsec_capture.xfrm.esp_sa import columns_for

        self.opts = opts
        self.state = state
        self.dir = Path(opts.dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            from ipsec_capture.errors import UserError

            raise UserError(f"--dir {opts.dir}: {err.strerror}") from None
        self.before_ns = int(opts.ring_before * 1e9)
        self.after_ns = int(opts.ring_after * 1e9)
        per_ns = int(opts.ring_mb * MB) // max(1, len(opts.netns))
        self.rings: dict[str, Ring] = {}
        self._ring_limit = per_ns
        self.points: dict[str, list[str]] = {}
        self.events: dict[str, deque[Event]] = {}
        self.sas: dict[str, dict[tuple[Any, ...], tuple[float, Any]]] = {}
        self.sources: dict[str, list[dict[str, Any]]] = {}
        self.inodes: dict[str, int | None] = {}
        self.clock = clock
        self.stamp_late_ns = stamp_late_ns  # the taps' packets are stamped when read (header)
        self.columns = columns_for(None)
        self.pending: list[Pending] = []
        self.written: list[str] = []
        self.bundles = 0
        self.skipped = 0
        self._last_start = -1e18
        self._lock = threading.Lock()

    # -- feeding ---------------------------------------------------------------------------------
    def add(self, netns: str, batch: list[Record]) -> None:
        """From a tap thread: one NFLOG batch of `netns`."""
        with self._lock:
            ring = self.rings.get(netns)
            if ring is None:
                ring = self.rings[netns] = Ring(self._ring_limit)
            ring.add(batch)

    def add_event(self, netns: str, ev: Event) -> None:
        q = self.events.get(netns)
        if q is None:
            q = self.events[netns] = deque(maxlen=EVENTS_KEPT)
        q.append(ev)
        horizon = ev.time_ns - self.before_ns - self.after_ns - int(10e9)
        while q and q[0].time_ns < horizon:
            q.popleft()

    def remember_sas(self, netns: str, sas: list[Any]) -> None:
        """A fresh dump: SAs with keys, kept until gone for --forget seconds."""
        now = time.monotonic()
        known = self.sas.setdefault(netns, {})
        for sa in sas:
            known[(sa.src, *sa.key_id)] = (now, sa)  # same dst+SPI per peer (Cilium): src too
        for key, (seen, _sa) in list(known.items()):
            if now - seen > self.opts.forget:
                del known[key]

    # -- incidents -------------------------------------------------------------------------------
    def trigger(self, inc: Incident) -> str | None:
        """Start a bundle for this incident; its path, or None when rate-limited."""
        t = time.monotonic()
        if t - self._last_start < self.opts.ring_min_gap:
            self.skipped += 1
            self._publish()
            return None
        self._last_start = t
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(inc.time_ns / 1e9))
        spi = f"-{inc.sa.spi:08x}" if inc.sa else ""
        name = re.sub(r"[^A-Za-z0-9._-]", "_", f"incident-{stamp}-{inc.netns}-{inc.cause}{spi}")
        path = self.dir / f"{name}.pcapng"
        taken = {p.path for p in self.pending}
        n = 2
        while path in taken or path.exists():  # the same cause on the same SA within a second
            path = self.dir / f"{name}-{n}.pcapng"
            n += 1
        self.pending.append(Pending(inc.netns, inc, inc.time_ns - self.before_ns, inc.time_ns + self.after_ns,
                                    path))
        return str(path)

    def tick(self) -> None:
        """From the main loop: write the bundles whose `after` has passed."""
        now = time.time_ns()
        due = [p for p in self.pending if p.end_ns <= now]
        for p in due:
            self.pending.remove(p)
            self._write(p)
        self._publish()

    def _publish(self) -> None:
        with self._lock:
            size = sum(r.size for r in self.rings.values())
            packets = sum(r.packets for r in self.rings.values())
            evicted = sum(r.evicted for r in self.rings.values())
        self.state.set_recorder({"bundles": self.bundles, "skipped": self.skipped, "ring_bytes": size,
                                 "ring_packets": packets, "ring_evicted": evicted,
                                 "ring_limit_bytes": self._ring_limit * max(1, len(self.opts.netns))})

    def _write(self, p: Pending) -> None:
        from ipsec_capture.capture.pcapng import PcapngWriter
        from ipsec_capture.rules.points import POINTS
        from ipsec_capture.xfrm.esp_sa import write_esp_sa, write_private

        with self._lock:
            ring = self.rings.get(p.netns)
            records = ring.between(p.start_ns, p.end_ns) if ring else []
        bundle = Bundle.for_capture(p.path)
        inc = p.incident
        note = f"ipsec-capture watch flight recorder: incident {inc.cause} in {p.netns}"
        points: dict[str, int] = {}
        with PcapngWriter(bundle.capture, comment=note) as writer:
            for name in self.points.get(p.netns, ()):
                writer.interface(name, POINTS[name].description if name in POINTS else "")
            for rec in records:
                writer.write(rec)
                points[rec.point] = points.get(rec.point, 0) + 1
        header = make_header(sources=self.sources.get(p.netns, []),
                             netns={"name": None if p.netns == "host" else p.netns,
                                    "inode": self.inodes.get(p.netns)}, clock=self.clock,
                             stamp_late_ns=self.stamp_late_ns)
        header["flight_recorder"] = {"incident": inc.to_dict(), "start_ns": p.start_ns, "end_ns": p.end_ns}
        sas = [sa for _seen, sa in self.sas.get(p.netns, {}).values()]
        with EventLogWriter(bundle.events, header) as log:
            for sa in sas:
                log.write(Event(time_ns=p.start_ns, source="sa_snapshot", kind="sa",
                                netns=self.inodes.get(p.netns), spi=sa.spi,
                                tuple={"src": sa.src, "dst": sa.dst, "proto": sa.proto},
                                detail={"sa": sa.to_dict(keys=False)}))
            for ev in list(self.events.get(p.netns, ())):
                if p.start_ns <= ev.time_ns <= p.end_ns:
                    log.write(ev)
            log.write(Event(time_ns=p.end_ns, source="capture", kind="stats", netns=self.inodes.get(p.netns),
                            detail={"points": points, "packets": len(records), "lost": 0, "enobufs": 0,
                                    "flight_recorder": True}))
        write_private(bundle.keys, write_esp_sa(sas, self.columns))
        self.bundles += 1
        self.written.append(str(bundle.capture))
        self._prune()

    def _prune(self) -> None:
        """Keep the newest `max_bundles` incident bundles in DIR."""
        found = sorted((f for f in self.dir.iterdir() if NAME.match(f.name)), key=lambda f: f.stat().st_mtime)
        for old in found[:max(0, len(found) - self.opts.ring_max_bundles)]:
            b = Bundle.for_capture(old)
            for f in (b.capture, b.events, b.keys):
                with contextlib.suppress(OSError):
                    os.unlink(f)

    def reload(self) -> None:
        self._last_start = -1e18

    def close(self) -> None:
        """At stop: bundles still waiting for their `after` are written with what there is."""
        for p in list(self.pending):
            self.pending.remove(p)
            with contextlib.suppress(OSError):
                self._write(p)
