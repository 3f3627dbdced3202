"""`ipsec-capture watch`: the long-running service. Sources in, WatchState updated, metrics out,
one JSON line per incident on stdout.

Per watched namespace it runs the kernel event sources `start` uses (bpf/sources.py: kprobe or the
skb:kfree_skb tracepoint, /proc/net/xfrm_stat deltas, the XFRM monitor), an SA dump every
--interval (and at once when a counter moves, so a per-SA counter is read before the namespace's
counter is blamed on nobody), and the ESP tap: one NFLOG rule at raw-pre-esp copying only the
headers, which names the SPI of ESP that arrives for an SA the kernel has not got (the no-state
case, which no kernel counter attributes). With --ring the tap becomes the flight recorder's
capture (every point, whole packets).

Order, as `start`: validate; listen; rules in (rules/guard.py removes them on every exit path);
sources attached; `ready` on stderr; loop until SIGTERM/SIGINT; sources stopped (their tracefs
instance removed); rules out. SIGHUP reloads: the SA tables are read anew, gone SAs and the
incident memory are dropped, and `reloaded` goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import queue
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from ipsec_capture.bpf.eventlog import clock_offsets
from ipsec_capture.bpf.sources import KernelEvents, SourceStatus, describe, plan_sources
from ipsec_capture.capture.esp_header import locate
from ipsec_capture.capture.nflog import stamp_late_ns
from ipsec_capture.errors import UserError, require_root
from ipsec_capture.models import EncodedEvent, Event
from ipsec_capture.netns import entered, netns_inode, netns_path

from .exporter import serve
from .state import Incident, WatchState, local_address_test

HOST = "host"  # the netns label of the initial namespace
TAP_POINT = "raw-pre-esp"
TAP_SNAPLEN = 96  # outer IPv6 + UDP + ESP header fit; the tap needs no more without --ring
# The tap's NFLOG batches flush every 100 ms (start's 10 ms is for prompt files): a tenth of the
# wake-ups at low rates; a no-state move waits for its packets (WatchState.no_state_grace).
TAP_TIMEOUT_CS = 10
DEFAULT_GROUP = 9477
DEFAULT_LISTEN = "127.0.0.1:9477"
STOP = (signal.SIGINT, signal.SIGTERM)


@dataclass(slots=True)
class WatchOptions:
    netns: list[str | None] = field(default_factory=lambda: [None])
    listen: str = DEFAULT_LISTEN
    dir: str = "."
    group: int = DEFAULT_GROUP
    kernel_events: str = "auto"
    backend: str = "auto"
    interval: float = 5.0  # SA dump period, seconds
    stat_interval: float = 0.5  # xfrm_stat poll period
    forget: float = 300.0
    quiet_after: float = 60.0
    tap: bool = True
    ring_mb: float = 0.0
    ring_before: float = 5.0
    ring_after: float = 5.0
    ring_max_bundles: int = 20
    ring_min_gap: float = 30.0


def label(netns: str | None) -> str:
    return netns or HOST


class EventSink:
    """What KernelEvents writes to (it expects an events-log writer): Events go onto the queue."""

    def __init__(self, netns: str, out: queue.SimpleQueue[tuple[str, Event]], clock: dict[str, int]) -> None:
        self.netns = netns
        self.out = out
        self.header = {"clock": clock}
        self.count = 0

    def write(self, ev: Event | EncodedEvent) -> None:
        if isinstance(ev, EncodedEvent):
            return  # per-packet xfrm_input/xfrm_output: the kernel's per-SA counters say as much
        self.count += 1
        self.out.put((self.netns, ev))

    def flush(self) -> None:
        pass


class EspTap:
    """Reads one namespace's NFLOG group: ESP for a (dst, SPI) without an SA becomes a no-state
    candidate; every record also goes to `also` (the flight recorder) when given."""

    def __init__(self, netns: str | None, group: int, snaplen: int, state: WatchState,
                 also: Callable[[str, list[Any]], None] | None = None) -> None:
        from ipsec_capture.capture.nflog import NflogReader

        self.netns = netns
        self.name = label(netns)
        self.state = state
        self.also = also
        self.reader = NflogReader(group, snaplen=snaplen, netns=netns, timeout_cs=TAP_TIMEOUT_CS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tap-{self.name}", daemon=True)
        self._lost_seen = 0

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        import socket as so

        poller = select.poll()
        poller.register(self.reader.fileno(), select.POLLIN)
        state, name, also = self.state, self.name, self.also
        live = state.live_packed
        ntop = so.inet_ntop
        while not self._stop.is_set():
            batch = self.reader.read_batch()
            if not batch:
                poller.poll(100)
                continue
            if also is not None:
                also(name, batch)
            for rec in batch:
                if rec.point and rec.point != TAP_POINT:
                    continue
                p = rec.payload
                found = locate(p)
                if found is None:
                    continue
                family, d0, d1, pos = found[0], found[1], found[2], found[3]
                spi = int.from_bytes(p[pos:pos + 4], "big")
                packed = bytes(p[d0:d1])
                if (packed, spi) in live.get(name, ()):
                    continue  # nearly every packet: an SA takes it, no string is made
                src = ntop(family, bytes(p[2 * d0 - d1:d0]))
                state.add_candidate(name, ntop(family, packed), spi, src, 1, "esp-tap")
            st = self.reader.stats
            lost = st.lost + st.enobufs
            if lost > self._lost_seen:
                state.add_lost(name, "nflog", lost - self._lost_seen)
                self._lost_seen = lost

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self.reader.close()


class Watch:
    """The service (see the module docstring); `run()` returns the exit status."""

    def __init__(self, opts: WatchOptions, out: TextIO = sys.stdout,
                 say: Callable[[str], None] | None = None) -> None:
        self.opts = opts
        self.out = out
        self._say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self._validate()
        self.state = WatchState(local_address_test(entered), forget_after=opts.forget,
                                quiet_after=opts.quiet_after)
        self.events: queue.SimpleQueue[tuple[str, Event]] = queue.SimpleQueue()
        self._stop: str | None = None
        self._reload = False
        self.recorder: Any = None
        self.bound: tuple[str, int] | None = None

    def _validate(self) -> None:
        o = self.opts
        if not o.netns:
            o.netns = [None]
        names = [label(n) for n in o.netns]
        if len(set(names)) != len(names):
            raise UserError("--netns names a namespace twice")
        for n in o.netns:
            netns_path(n)
        if o.interval <= 0 or o.stat_interval <= 0:
            raise UserError("--interval must be more than 0 seconds")
        if o.ring_mb < 0:
            raise UserError("--ring must be 0 (off) or more MB")
        if not 0 <= o.group <= 0xFFFF:
            raise UserError(f"--group {o.group} out of range: use 0..65535")

    def _on_stop(self, signum: int, frame: object) -> None:
        self._stop = signal.Signals(signum).name

    def _on_hup(self, signum: int, frame: object) -> None:
        self._reload = True

    def plans(self) -> dict[str | None, list[SourceStatus]]:
        """Sources per namespace. skb:kfree_skb is global (one tracefs instance per process), so
        only the first namespace runs it; kprobes filter one namespace, so several namespaces fall
        back to the tracepoint."""
        o = self.opts
        mode = o.kernel_events
        if len(o.netns) > 1 and mode == "kprobe":
            raise UserError("--kernel-events kprobe watches one namespace: give one --netns or "
                            "use --kernel-events tracepoint")
        out: dict[str | None, list[SourceStatus]] = {}
        for i, ns in enumerate(o.netns):
            plan = plan_sources("tracepoint" if len(o.netns) > 1 and mode == "auto" else mode, ns)
            if i > 0:
                plan = [SourceStatus(s.name, False, "runs once, in the first --netns") if s.name in
                        ("tracepoint", "kprobe") and s.active else s for s in plan]
            out[ns] = plan
        return out

    def run(self) -> int:
        require_root("ipsec-capture watch")
        o = self.opts
        plans = self.plans()
        clock = clock_offsets()
        with contextlib.ExitStack() as stack:
            registry, server, self.bound = serve(self.state, o.listen)
            stack.callback(server.shutdown)
            stack.callback(server.server_close)
            self.registry = registry
            if o.ring_mb:
                from .recorder import FlightRecorder

                self.recorder = FlightRecorder(o, self.state, clock, stamp_late_ns(TAP_TIMEOUT_CS))
                stack.callback(self.recorder.close)
            if o.tap or o.ring_mb:
                self._tap(stack)
            old = {sig: signal.signal(sig, self._on_stop) for sig in STOP}
            old[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hup)
            stack.callback(lambda: [signal.signal(s, h) for s, h in old.items()])
            kernels: list[KernelEvents] = []
            stack.callback(lambda: [k.stop() for k in reversed(kernels)])
            for ns, plan in plans.items():
                name = label(ns)
                self._say(f"ipsec-capture: {name}: {describe(plan)}")
                for s in plan:
                    self.state.set_source(name, s.name, False)
                if self.recorder is not None:
                    self.recorder.sources[name] = [s.to_dict() for s in plan]
                    self.recorder.inodes[name] = netns_inode(ns)
                k = KernelEvents(EventSink(name, self.events, clock), o.kernel_events, ns,  # type: ignore[arg-type]
                                 poll_interval=o.stat_interval, progress=self._progress, plan=plan)
                k.start()
                kernels.append(k)
                for s in plan:
                    self.state.set_source(name, s.name, s.active)
                if self._stop:
                    return 0
            for ns in o.netns:
                self._baseline(ns)
                self._refresh(ns)
            where = ", ".join(label(n) for n in o.netns)
            host, port = self.bound
            ring = (f"; flight recorder {o.ring_mb:g} MB, bundles into {o.dir}" if o.ring_mb else "")
            self.state.ready = True
            self._say(f"ready: watching {where}; metrics on http://{host}:{port}/metrics{ring}")
            self._loop()
        self._say(f"ipsec-capture: watch stopped by {self._stop}")
        return 0

    def _progress(self, msg: str) -> None:
        self._say(f"ipsec-capture: {msg}")

    def _tap(self, stack: contextlib.ExitStack) -> None:
        """The NFLOG rules and readers: the tap point alone, or every point for the ring."""
        from ipsec_capture.rules.guard import installed
        from ipsec_capture.rules.manager import build

        o = self.opts
        points = None if o.ring_mb else [TAP_POINT]
        snaplen = 262144 if o.ring_mb else TAP_SNAPLEN
        also = self.recorder.add if self.recorder is not None else None
        for ns in o.netns:
            tap = EspTap(ns, o.group, snaplen, self.state, also)
            stack.callback(tap.reader.close)
            rs = build(o.group, points, o.backend, ns)
            stack.enter_context(installed(rs))
            if self.recorder is not None:
                self.recorder.points[label(ns)] = list(rs.points)
            tap.start()
            stack.callback(tap.stop)
            self.state.set_source(label(ns), "esp_tap", True)

    def _baseline(self, ns: str | None) -> None:
        from ipsec_capture.bpf.xfrm_stat import XfrmStatReader

        try:
            reader = XfrmStatReader(ns)
        except UserError:
            return  # no CONFIG_XFRM_STATISTICS: source_up says xfrm_stat is off
        try:
            self.state.set_counters(label(ns), reader.read())
        finally:
            reader.close()

    def _refresh(self, ns: str | None) -> list[Incident]:
        from ipsec_capture.xfrm.netlink import dump_states

        try:
            sas = dump_states(ns)
        except (OSError, UserError) as err:
            self._progress(f"{label(ns)}: SA dump failed: {err}")
            return []
        if self.recorder is not None:
            self.recorder.remember_sas(label(ns), sas)
        return self.state.sync_sas(label(ns), sas)

    def _loop(self) -> None:
        o = self.opts
        by_label = {label(n): n for n in o.netns}
        next_dump = time.monotonic() + o.interval
        while self._stop is None:
            if self._reload:
                self._reload = False
                self.state.reload()
                for ns in o.netns:
                    self._emit(self._refresh(ns))
                if self.recorder is not None:
                    self.recorder.reload()
                self._say("ipsec-capture: reloaded (SA tables read anew, gone SAs and incidents forgotten)")
            timeout = max(0.0, min(0.2, next_dump - time.monotonic()))
            try:
                name, ev = self.events.get(timeout=timeout)
            except queue.Empty:
                name, ev = "", None
            if ev is not None:
                if self.recorder is not None:
                    self.recorder.add_event(name, ev)
                if ev.source == "xfrm_stat" and ev.kind == "counter":
                    self._emit(self._refresh(by_label.get(name)))  # per-SA counters first
                self._emit(self.state.on_event(ev, name))
            if time.monotonic() >= next_dump:
                next_dump = time.monotonic() + o.interval
                for ns in o.netns:
                    self._emit(self._refresh(ns))
            self._emit(self.state.settle())
            if self.recorder is not None:
                self.recorder.tick()

    def _emit(self, incidents: list[Incident]) -> None:
        for inc in incidents:
            d = inc.to_dict()
            if self.recorder is not None:
                d["bundle"] = self.recorder.trigger(inc)
            self.out.write(json.dumps(d, sort_keys=True) + "\n")
            self.out.flush()
