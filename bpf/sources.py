"""Which kernel event sources this machine allows, and running them together into one events log.

Two slots carry kernel verdicts, each filled by the first candidate that really attaches:
  kprobe      per packet: xfrm_input / xfrm_output with SPI, seq and return code, the audit
              anchors, and skb:kfree_skb from the same BPF object. Candidates: the CO-RE object
              (core.py: the kernel has BTF; shipped built, loads in well under a second) -> bcc
              (kprobes.py: no BTF but kernel headers; compiles for 40-120 s under emulation).
  tracepoint  skb:kfree_skb alone, where no per-packet probe attaches: the CO-RE object's
              tracepoint program (drops filtered in the kernel, with their namespace) -> a
              tracefs instance of our own (kfree_skb.py: no BPF at all).
/proc/net/xfrm_stat deltas and XFRM monitor events run beside them; with nothing else attached
those counters are what is left. A candidate that fails to compile, load or attach is never
fatal under `auto`: the next one is tried, and why the others did not attach is part of the
one line `start` prints (and of the events log header). "kprobe" names our xfrm probes however
they enter the functions (fentry/fexit or kprobes); `via` names the loader (core, bcc, tracefs).
Only the capture's network namespace leaves the kernel (the one `--netns` names, or the one the
capture runs in).
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

from .eventlog import EventLogWriter, clock_offsets
from .kprobes import KPROBE_PMU

# auto: the richest that attaches; kprobe: insist on per-packet probes (CO-RE, else bcc);
# bcc: per-packet probes through bcc only (the fallback, forced); tracepoint: drops only; off
MODES = ("auto", "kprobe", "bcc", "tracepoint", "tracefs", "off")
DROPS_ONLY = ("tracepoint", "tracefs")  # modes without per-packet probes (tracefs: no BPF at all)
BCC_INSTALL = "apt-get install python3-bpfcc linux-headers-$(uname -r)"
SLOTS = ("kprobe", "tracepoint", "xfrm_stat", "xfrm_monitor")


@dataclass(slots=True)
class SourceStatus:
    name: str  # kprobe | tracepoint | xfrm_stat | xfrm_monitor
    active: bool
    why: str
    via: str = ""  # who fills it: core | bcc (kprobe), core | tracefs (tracepoint)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "active": self.active, "why": self.why}
        if self.via and self.active:
            d["via"] = self.via
        return d


class Source(Protocol):
    name: str
    count: int

    def start(self, emit: Callable[[Event | EncodedEvent], None]) -> None: ...
    def stop(self) -> None: ...


def kprobe_status() -> SourceStatus:
    """bcc's kprobe source: kprobes in the kernel, bcc importable, headers for its compiler, root."""
    if not os.path.isdir(KPROBE_PMU):
        return SourceStatus("kprobe", False, "this kernel has no kprobes (CONFIG_KPROBES off)", "bcc")
    if importlib.util.find_spec("bcc") is None:
        return SourceStatus("kprobe", False, f"bcc is not installed: {BCC_INSTALL}", "bcc")
    build = f"/lib/modules/{platform.release()}/build"
    if not os.path.isdir(build):
        return SourceStatus("kprobe", False, f"no kernel headers at {build}: {BCC_INSTALL}", "bcc")
    if os.geteuid() != 0:
        return SourceStatus("kprobe", False, "needs root to load BPF programs", "bcc")
    return SourceStatus("kprobe", True, "bcc probes on xfrm_input/xfrm_output and the audit anchors "
                        "(fentry/fexit where the kernel has BPF trampolines, else kprobes), skb:kfree_skb",
                        via="bcc")


def core_status(name: str = "kprobe") -> SourceStatus:
    from .core import status

    ok, why = status()
    if ok:
        why = ("CO-RE probes on xfrm_input/xfrm_output and the audit anchors, skb:kfree_skb"
               if name == "kprobe" else "skb:kfree_skb via the CO-RE tracepoint program (drops filtered "
               "in the kernel)")
    return SourceStatus(name, ok, why, "core")


def tracepoint_status() -> SourceStatus:
    from .kfree_skb import tracefs_available

    ok, why = tracefs_available()
    return SourceStatus("tracepoint", ok, f"skb:kfree_skb via {why}" if ok else why, "tracefs")


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


def candidates(slot: str, mode: str) -> list[SourceStatus]:
    """The ways to fill `slot` under `mode`, in the order they are tried (active = may work here)."""
    if slot == "kprobe":
        if mode in DROPS_ONLY:
            return []
        return [kprobe_status()] if mode == "bcc" else [core_status("kprobe"), kprobe_status()]
    return [tracepoint_status()] if mode == "tracefs" else [core_status("tracepoint"), tracepoint_status()]


VIA = {"core": "CO-RE", "bcc": "bcc", "tracefs": "tracefs"}  # as the one line names them


def not_attached(slot: str, failures: list[tuple[str, str]]) -> SourceStatus:
    """The slot off, with every candidate's reason: `CO-RE: ...; bcc: ...`."""
    return SourceStatus(slot, False, "; ".join(f"{VIA.get(via, via)}: {why}" for via, why in failures))


def _first(slot: str, options: list[SourceStatus]) -> SourceStatus:
    for option in options:
        if option.active:
            return option
    return not_attached(slot, [(o.via, o.why) for o in options])


def plan_sources(mode: str = "auto", netns: str | None = None) -> list[SourceStatus]:
    """What the kernel allows for `mode`, each source with active and why (nothing is loaded:
    KernelEvents.attach() tries the candidates and turns this plan into what attached)."""
    if mode not in MODES:
        raise UserError(f"--kernel-events must be one of {', '.join(MODES)}, not {mode!r}")
    netns_path(netns)  # a bad name fails here, with the remedy
    if mode == "off":
        return [SourceStatus(n, False, "--kernel-events off") for n in SLOTS]
    if mode in DROPS_ONLY:
        kp = SourceStatus("kprobe", False, f"not asked for (--kernel-events {mode})")
    else:
        kp = _first("kprobe", candidates("kprobe", mode))
    if kp.active:
        tp = SourceStatus("tracepoint", False, "skb:kfree_skb comes from the kprobe source's BPF tracepoint")
    else:
        tp = _first("tracepoint", candidates("tracepoint", mode))
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
    """The capture's companion that writes kernel events: `attach()` fills each slot with the
    first candidate that attaches (and leaves `sources` saying what attached and why not the
    others), `start()` (attaching first if needed) returns once every source runs: write the
    `ready` line after it. `stop()` flushes the last counter deltas."""

    name = "events"

    def __init__(self, writer: EventLogWriter | None, mode: str = "auto", netns: str | None = None,
                 poll_interval: float = 0.5, keep_all_drops: bool = False,
                 progress: Callable[[str], None] = _progress,
                 plan: list[SourceStatus] | None = None, clock: dict[str, int] | None = None) -> None:
        self.writer = writer
        self.mode = mode
        self.netns = netns
        self.poll_interval = poll_interval
        self.keep_all_drops = keep_all_drops
        self.progress = progress
        self.sources: list[SourceStatus] = plan if plan is not None else plan_sources(mode, netns)
        self.running: list[Source] = []
        # the namespace whose events leave the kernel: --netns, else the one we run in
        self.inode = netns_inode(netns)
        clock = clock or (writer.header.get("clock") if writer is not None else None) or clock_offsets()
        self._wall_minus_boot = int(clock.get("wall_minus_boot_ns", 0))
        self._wall_minus_mono = int(clock.get("wall_minus_mono_ns", 0))
        self._attached = False

    def _make(self, slot: str, via: str) -> Source:
        if slot in ("kprobe", "tracepoint") and via == "core":
            from .core import CoreSource

            return CoreSource(self._wall_minus_mono, netns=[self.inode], keep_all_drops=self.keep_all_drops,
                              progress=self.progress, mechanism="auto" if slot == "kprobe" else "none")
        if slot == "kprobe":
            from .kprobes import KprobeSource

            return KprobeSource(self._wall_minus_mono, self.inode, keep_all_drops=self.keep_all_drops,
                                progress=self.progress)
        if slot == "tracepoint":
            from .kfree_skb import KfreeSkbSource

            return KfreeSkbSource(self._wall_minus_boot, keep_all=self.keep_all_drops)
        if slot == "xfrm_stat":
            from .xfrm_stat import XfrmStatSource

            return XfrmStatSource(self.netns, self.poll_interval)
        return MonitorSource(self.netns)

    def _fill(self, slot: str) -> SourceStatus:
        """Try `slot`'s candidates in order; the first that attaches stays in `running`."""
        failures: list[tuple[str, str]] = []
        for option in candidates(slot, self.mode):
            if not option.active:
                failures.append((option.via, option.why))
                continue
            t0 = time.monotonic()
            src = self._make(slot, option.via)
            try:
                src.attach()  # type: ignore[attr-defined]
            except (UserError, OSError) as err:  # a failed compile or load: the next candidate
                failures.append((option.via, str(err)))
                continue
            self.running.append(src)
            return SourceStatus(slot, True, _attached_why(src, option.via, time.monotonic() - t0, failures),
                                option.via)
        return not_attached(slot, failures)

    def attach(self) -> list[SourceStatus]:
        """Load and attach every planned source; UserError if the mode insists on one that cannot."""
        if self._attached:
            return self.sources
        plan = {s.name: s for s in self.sources}
        try:
            kp = plan["kprobe"]
            if self.mode not in (*DROPS_ONLY, "off"):
                kp = self._fill("kprobe")
                if not kp.active and self.mode in ("kprobe", "bcc"):
                    raise UserError(f"--kernel-events {self.mode}: {kp.why} (try --kernel-events auto)")
            tp = plan["tracepoint"]
            if kp.active:
                tp = SourceStatus("tracepoint", False, "skb:kfree_skb comes from the kprobe source's BPF "
                                  "program")
            elif self.mode != "off":
                tp = self._fill("tracepoint")
                if not tp.active and self.mode in DROPS_ONLY:
                    raise UserError(f"--kernel-events {self.mode}: {tp.why} (try --kernel-events auto)")
            rest = []
            for status in (plan["xfrm_stat"], plan["xfrm_monitor"]):
                if status.active:
                    self.running.append(self._make(status.name, ""))
                rest.append(status)
        except BaseException:
            self.stop()
            raise
        self.sources = [kp, tp, *rest]
        self._attached = True
        return self.sources

    def start(self, writer: EventLogWriter | None = None) -> None:
        if writer is not None:
            self.writer = writer
        if self.writer is None:
            raise ValueError("KernelEvents.start needs the events log writer")
        try:
            if not self._attached:
                self.attach()
                self.progress(describe(self.sources))
            for src in self.running:
                src.start(self.writer.write)
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
        if self.writer is not None:
            self.writer.flush()
        summary: dict[str, Any] = {"events": counts,
                                   "sources": [s.to_dict() for s in self.sources]}
        if errors:
            summary["errors"] = errors
        return summary


def _attached_why(src: Any, via: str, seconds: float, failures: list[tuple[str, str]]) -> str:
    """`CO-RE fentry/fexit in 0.3 s: fentry:xfrm_input, ...`, then why earlier candidates did not."""
    mech = {"fentry": "fentry/fexit", "kprobe": "kprobe/kretprobe", "none": "tracepoint"}.get(
        getattr(src, "mechanism", ""), "")
    what = ", ".join(getattr(src, "attached", []) or []) or getattr(src, "instance", "") or src.name
    text = f"{VIA.get(via, via)}{' ' + mech if mech else ''} in {seconds:.1f} s: {what}"
    notes = [f"{VIA.get(v, v)}: {why}" for v, why in failures]
    if getattr(src, "fallback", ""):
        notes.append(src.fallback)
    if getattr(src, "missing", None):
        notes.append(f"not in this kernel: {', '.join(src.missing)}")
    return text + (f" (not: {'; '.join(notes)})" if notes else "")


def describe(statuses: list[SourceStatus]) -> str:
    """One stderr line: `kernel events: kprobe off (why); tracepoint on; ...`."""
    return "kernel events: " + "; ".join(
        f"{s.name} {'on' if s.active else 'off'} ({s.why})" for s in statuses)
