"""Which kernel event sources this machine allows, and running them together into one events log.

`auto` takes the richest the kernel offers: the bcc kprobe source (per packet: xfrm_input /
xfrm_output with SPI, seq and return code, the audit anchors and skb:kfree_skb from BPF) when the
kernel has kprobes and bcc and headers are installed; otherwise skb:kfree_skb through a tracefs
instance. /proc/net/xfrm_stat deltas and XFRM monitor events run in both cases. Every source
reports why it is on or off, and that list goes into the log header and onto stderr.
"kprobe" names our xfrm probes, however attached: fentry/fexit (BPF trampolines, cheaper) where
the kernel has BTF and trampolines, kprobe/kretprobe otherwise; the attach line says which.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ipsec_capture.errors import UserError
from ipsec_capture.models import EncodedEvent, Event
from ipsec_capture.netns import netns_inode, netns_path

from .eventlog import EventLogWriter

MODES = ("auto", "kprobe", "tracepoint", "off")
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"
BCC_INSTALL = "apt-get install python3-bpfcc linux-headers-$(uname -r)"


@dataclass(slots=True)
class SourceStatus:
    name: str  # kprobe | tracepoint | xfrm_stat | xfrm_monitor
    active: bool
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "active": self.active, "why": self.why}


class Source(Protocol):
    name: str
    count: int

    def start(self, emit: Callable[[Event | EncodedEvent], None]) -> None: ...
    def stop(self) -> None: ...


def kprobe_status() -> SourceStatus:
    """kprobes in the kernel, bcc importable, headers for bcc's compiler, root."""
    if not os.path.isdir(KPROBE_PMU):
        return SourceStatus("kprobe", False, "this kernel has no kprobes (CONFIG_KPROBES off)")
    if importlib.util.find_spec("bcc") is None:
        return SourceStatus("kprobe", False, f"bcc is not installed: {BCC_INSTALL}")
    build = f"/lib/modules/{platform.release()}/build"
    if not os.path.isdir(build):
        return SourceStatus("kprobe", False, f"no kernel headers at {build}: {BCC_INSTALL}")
    if os.geteuid() != 0:
        return SourceStatus("kprobe", False, "needs root to load BPF programs")
    return SourceStatus("kprobe", True, "bcc probes on xfrm_input/xfrm_output and the audit anchors "
                        "(fentry/fexit where the kernel has BPF trampolines, else kprobes), skb:kfree_skb")


def tracepoint_status() -> SourceStatus:
    from .kfree_skb import tracefs_available

    ok, why = tracefs_available()
    return SourceStatus("tracepoint", ok, f"skb:kfree_skb via {why}" if ok else why)


def xfrm_stat_status(netns: str | None) -> SourceStatus:
    from .xfrm_stat import XfrmStatReader

    try:
        XfrmStatReader(netns).close()
    except UserError as err:
        return SourceStatus("xfrm_stat", False, str(err))
    return SourceStatus("xfrm_stat", True, "/proc/net/xfrm_stat deltas")


def xfrm_monitor_status() -> SourceStatus:
    try:
        module = importlib.import_module("ipsec_capture.xfrm.monitor")
    except ImportError as err:
        return SourceStatus("xfrm_monitor", False, f"XFRM monitor not available in this build ({err})")
    if not hasattr(module, "XfrmMonitor"):
        return SourceStatus("xfrm_monitor", False, "XFRM monitor not available in this build")
    return SourceStatus("xfrm_monitor", True, "XFRM netlink monitor: SA/policy changes, acquire, expire")


def plan_sources(mode: str = "auto", netns: str | None = None) -> list[SourceStatus]:
    """What the kernel allows for `mode`, each source with active and why (nothing is started)."""
    if mode not in MODES:
        raise UserError(f"--kernel-events must be one of {', '.join(MODES)}, not {mode!r}")
    netns_path(netns)  # a bad name fails here, with the remedy
    if mode == "off":
        return [SourceStatus(n, False, "--kernel-events off")
                for n in ("kprobe", "tracepoint", "xfrm_stat", "xfrm_monitor")]
    kp = kprobe_status()
    if mode == "tracepoint" and kp.active:
        kp = SourceStatus("kprobe", False, "not asked for (--kernel-events tracepoint)")
    if kp.active:
        tp = SourceStatus("tracepoint", False, "skb:kfree_skb comes from the kprobe source's BPF tracepoint")
    else:
        tp = tracepoint_status()
    return [kp, tp, xfrm_stat_status(netns), xfrm_monitor_status()]


class MonitorSource:
    """Adapter: the xfrm room's XfrmMonitor (an iterator of Events) as a threaded source."""

    name = "xfrm_monitor"

    def __init__(self, netns: str | None) -> None:
        from ipsec_capture.xfrm.monitor import XfrmMonitor

        self.monitor = XfrmMonitor(netns)
        self.count = 0
        self._thread: threading.Thread | None = None

    def start(self, emit: Callable[[Event], None]) -> None:
        def run() -> None:
            try:
                for ev in self.monitor.events():
                    emit(ev)
                    self.count += 1
            except (OSError, ValueError):  # socket closed under us by stop()
                pass

        self._thread = threading.Thread(target=run, name="xfrm_monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.monitor.close()
        if self._thread is not None:
            self._thread.join(timeout=2)


def _progress(msg: str) -> None:
    print(f"ipsec-capture: {msg}", file=sys.stderr, flush=True)


class KernelEvents:
    """The capture's companion that writes kernel events: `start()` returns once every planned
    source is attached (write the `ready` line after it), `stop()` flushes the last counter deltas."""

    name = "events"

    def __init__(self, writer: EventLogWriter, mode: str = "auto", netns: str | None = None,
                 poll_interval: float = 0.5, keep_all_drops: bool = False,
                 progress: Callable[[str], None] = _progress,
                 plan: list[SourceStatus] | None = None) -> None:
        self.writer = writer
        self.mode = mode
        self.netns = netns
        self.poll_interval = poll_interval
        self.keep_all_drops = keep_all_drops
        self.progress = progress
        self.sources: list[SourceStatus] = plan if plan is not None else plan_sources(mode, netns)
        self.running: list[Source] = []
        clock = writer.header.get("clock") or {}
        self._wall_minus_boot = int(clock.get("wall_minus_boot_ns", 0))
        self._wall_minus_mono = int(clock.get("wall_minus_mono_ns", 0))

    def _build(self, status: SourceStatus) -> Source:
        if status.name == "kprobe":
            from .kprobes import KprobeSource

            return KprobeSource(self._wall_minus_mono, netns_inode(self.netns) if self.netns else None,
                                keep_all_drops=self.keep_all_drops, progress=self.progress)
        if status.name == "tracepoint":
            from .kfree_skb import KfreeSkbSource

            return KfreeSkbSource(self._wall_minus_boot, keep_all=self.keep_all_drops)
        if status.name == "xfrm_stat":
            from .xfrm_stat import XfrmStatSource

            return XfrmStatSource(self.netns, self.poll_interval)
        return MonitorSource(self.netns)

    def start(self) -> None:
        if self.mode in ("kprobe", "tracepoint"):
            main = next(s for s in self.sources if s.name == self.mode)
            if not main.active:
                raise UserError(f"--kernel-events {self.mode}: {main.why} (try --kernel-events auto)")
        try:
            for status in self.sources:
                if not status.active:
                    continue
                t0 = time.monotonic()
                src = self._build(status)
                src.start(self.writer.write)
                self.running.append(src)
                spent = time.monotonic() - t0
                attached = getattr(src, "attached", None)
                if attached:  # what the kprobe source really used: fentry/fexit or kprobes
                    fallback = getattr(src, "fallback", "")
                    self.progress(f"{status.name} source attached in {spent:.1f} s: {', '.join(attached)}"
                                  + (f" ({fallback})" if fallback else ""))
                elif spent > 1:
                    self.progress(f"{status.name} source attached in {spent:.1f} s")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> dict[str, Any]:
        """Stop every source (last counter sample included), flush; {"events": {source: n}}."""
        counts: dict[str, int] = {}
        errors: list[str] = []
        while self.running:
            src = self.running.pop()
            try:
                src.stop()
            except Exception as err:  # one failing source must not leave the others attached
                errors.append(f"{src.name}: {err}")
            counts[src.name] = src.count
        self.writer.flush()
        summary: dict[str, Any] = {"events": counts,
                                   "sources": [s.to_dict() for s in self.sources]}
        if errors:
            summary["errors"] = errors
        return summary


def describe(statuses: list[SourceStatus]) -> str:
    """One stderr line: `kernel events: kprobe off (why); tracepoint on; ...`."""
    return "kernel events: " + "; ".join(
        f"{s.name} {'on' if s.active else 'off'} ({s.why})" for s in statuses)
