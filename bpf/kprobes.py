"""The bcc kprobe source: per-packet xfrm_input / xfrm_output with SPI, seq and return code, the
xfrm_audit_state_* anchors and skb:kfree_skb, all as one event struct (xfrm_probes.c, mirrored by
probe_event.EVENT: change both together). The fallback where the CO-RE object (core.py) cannot
load: a kernel without BTF but with headers.

"kprobe" is the source's name, not always its mechanism: where the kernel has BTF and BPF
trampolines the functions are entered by fentry/fexit (no breakpoint, no return-address
hijack, fields loaded without helper calls), elsewhere by kprobe/kretprobe; drops come from the
skb:kfree_skb raw tracepoint either way. `attached` lists what was used.

bcc is a system package (python3-bpfcc) and compiles against the running kernel's headers: under
emulation that takes 40-120 s, so start() says so on stderr. Kernel probe events are stamped with
CLOCK_MONOTONIC and converted to wall clock with the events log's offset. Drops are emitted with
source "kfree_skb" (as the tracefs source does), every other probe with source "kprobe".
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipsec_capture.errors import UserError
from ipsec_capture.models import EncodedEvent, Event

from .kallsyms import Kallsyms
from .kfree_skb import EVENT_DIR, NOT_IPSEC_REASONS, Tracefs, is_xfrm_drop, reason_names
from .probe_event import EVENT, EVENT_SIZE, KINDS, SOURCE, decode, encode_packet_event

__all__ = ["EVENT", "KINDS", "decode", "encode_packet_event"]  # the event shape, re-exported

PROGRAM = Path(__file__).with_name("xfrm_probes.c")

MECHANISMS = ("auto", "fentry", "kprobe")
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"  # the kernel has kprobes (CONFIG_KPROBES)
# The kernel wakes the reader once per WAKEUP_EVENTS events per CPU, not per event: each wakeup is
# an irq_work on the CPU carrying the packets and a cross-CPU wake-up of the reader. Below that
# count the reader collects what is there every POLL_MS, so an event reaches the log within that.
WAKEUP_EVENTS = 32
POLL_MS = 200
# the audit anchors: they may be missing (CONFIG_AUDITSYSCALL off) -> their kprobe function names
ANCHORS = {
    "xfrm_audit_state_notfound": "kp_notfound",
    "xfrm_audit_state_notfound_simple": "kp_notfound_simple",
    "xfrm_audit_state_icvfail": "kp_icvfail",
    "xfrm_audit_state_replay": "kp_replay",
    "xfrm_audit_state_replay_overflow": "kp_replay_overflow",
}
DROP_TRACEPOINT = "kfree_skb"  # a raw tracepoint: the program gets the arguments, no trace record is built
DROP_FN = "raw_tracepoint__kfree_skb"  # the name bcc gives RAW_TRACEPOINT_PROBE(kfree_skb)


# Probe.kind -> bcc's BPF.attach_* / detach_* method
_BCC_NAMES = {"fentry": "kfunc", "fexit": "kretfunc", "kprobe": "kprobe", "kretprobe": "kretprobe"}


@dataclass(frozen=True)
class Probe:
    """One BPF program on one kernel function; `kind` names the mechanism as `start` reports it."""

    kind: str  # kprobe | kretprobe | fentry | fexit
    target: str  # the kernel function
    fn: str  # the BPF function in xfrm_probes.c (under fentry: the name bcc's KFUNC_PROBE gives it)
    required: bool

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.target}"

    def attach(self, bpf: Any) -> None:
        getattr(bpf, f"attach_{_BCC_NAMES[self.kind]}")(**self._where())

    def detach(self, bpf: Any) -> None:
        getattr(bpf, f"detach_{_BCC_NAMES[self.kind]}")(**self._where())

    def _where(self) -> dict[str, str]:
        """bcc's arguments: a trampoline program names its function itself (kfunc__NAME)."""
        if self.kind in ("fentry", "fexit"):
            return {"fn_name": self.fn}
        return {"event": self.target, "fn_name": self.fn}


def probes(mechanism: str) -> list[Probe]:
    """The programs xfrm_probes.c defines for `mechanism` (fentry or kprobe), each entry before
    its return (a return program attached alone sees returns without entries)."""
    if mechanism == "fentry":
        main = [Probe(kind, fn, f"{'kfunc' if kind == 'fentry' else 'kretfunc'}__{fn}", True)
                for fn in ("xfrm_input", "xfrm_output") for kind in ("fentry", "fexit")]
        return main + [Probe("fentry", a, f"kfunc__{a}", False) for a in ANCHORS]
    main = [Probe(kind, fn, f"{'kp' if kind == 'kprobe' else 'kr'}_{fn}", True)
            for fn in ("xfrm_input", "xfrm_output") for kind in ("kprobe", "kretprobe")]
    return main + [Probe("kprobe", a, fn, False) for a, fn in ANCHORS.items()]


def manual_bpf(BPF: Any) -> Any:
    """bcc's BPF class without its attach-on-load of programs named by prefix (kfunc__*,
    raw_tracepoint__*): we attach each program ourselves and can tell which one failed."""

    class ManualBPF(BPF):
        def _trace_autoload(self) -> None:
            return None

    return ManualBPF


def load_bcc() -> Any:
    try:
        from bcc import BPF
    except ImportError as err:
        raise UserError("bcc is not installed: apt-get install python3-bpfcc "
                        "linux-headers-$(uname -r)") from err
    return BPF


class KprobeSource:
    """Compiles and attaches xfrm_probes.c; a thread polls the perf buffer into Events.

    `mechanism`: "fentry" (BPF trampolines: the cheapest way in, needs kernel BTF), "kprobe", or
    "auto": fentry where bcc says the kernel supports it, kprobes otherwise or if fentry fails
    to load (the reason goes to `progress` and `fallback`). Either way the source is named
    "kprobe" (our xfrm probes); `mechanism` and `attached` say what was actually used."""

    name = SOURCE

    def __init__(self, wall_minus_mono_ns: int, netns_inode: int | None = None, keep_all_drops: bool = False,
                 progress: Callable[[str], None] | None = None, page_cnt: int = 256,
                 mechanism: str = "auto", wakeup_events: int = WAKEUP_EVENTS) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism {mechanism!r} not in {MECHANISMS}")
        self.offset = wall_minus_mono_ns
        self.netns_inode = netns_inode
        self.keep_all_drops = keep_all_drops
        self.progress = progress or (lambda _msg: None)
        self.page_cnt = page_cnt
        self.wakeup_events = wakeup_events
        self.wanted_mechanism = mechanism
        self.mechanism = ""  # fentry | kprobe once attached
        self.fallback = ""  # why auto did not get fentry
        self.probes: list[Probe] = []
        self.count = 0
        self.lost = 0
        self.per_kind: dict[str, int] = {}
        self.attached: list[str] = []
        self.missing: list[str] = []
        self.compile_s = 0.0
        self.bpf: Any = None
        self._emit: Callable[[Event | EncodedEvent], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drains: list[threading.Event] = []
        self._reasons: dict[int, str] = {}
        self._ksyms: Kallsyms | None = None

    def attach(self) -> None:
        BPF = load_bcc()
        tracefs = Tracefs()
        try:
            self._reasons = reason_names(tracefs.read(os.path.join(EVENT_DIR, "format")))
        finally:
            tracefs.close()
        self._ksyms = Kallsyms()
        mechanism = self.wanted_mechanism
        if mechanism == "auto":
            mechanism = "fentry" if BPF.support_kfunc() else "kprobe"
            if mechanism == "kprobe":
                self.fallback = "no fentry/fexit here (needs x86-64, kernel BTF, BPF trampolines)"
        self.progress(f"compiling the kernel probes ({mechanism}) with bcc "
                      "(40-120 s under emulation, a few s on hardware)")
        try:
            self._load(BPF, mechanism)
        except UserError as err:
            if self.wanted_mechanism != "auto" or mechanism != "fentry":
                raise
            self.fallback = f"fentry failed: {err}"
            self.progress(f"{self.fallback}; compiling kprobes instead")
            self._load(BPF, "kprobe")
        self.bpf["events"].open_perf_buffer(self._on_sample, page_cnt=self.page_cnt, lost_cb=self._on_lost,
                                            wakeup_events=self.wakeup_events)

    def _load(self, BPF: Any, mechanism: str) -> None:
        """Compile for `mechanism` and attach each program ourselves, so that a missing anchor
        costs only its own program (bcc would attach fentry programs while loading, all or none)."""
        cflags = [f"-DNETNS_FILTER={self.netns_inode or 0}"]
        if mechanism == "fentry":
            cflags.append("-DUSE_FENTRY=1")
        t0 = time.monotonic()
        try:
            bpf = manual_bpf(BPF)(src_file=str(PROGRAM).encode(), cflags=cflags)
        except Exception as err:  # bcc raises plain Exception on compile/load errors
            raise UserError(f"cannot compile the kernel probes ({mechanism}): {err} (are the kernel "
                            f"headers for {os.uname().release} installed? apt-get install "
                            "linux-headers-$(uname -r))") from err
        self.compile_s += time.monotonic() - t0
        if not self.keep_all_drops:
            skip = bpf["skip_reason"]
            for number, name in self._reasons.items():
                if 0 <= number < len(skip) and name.startswith(NOT_IPSEC_REASONS):
                    skip[ctypes.c_int(number)] = ctypes.c_ubyte(1)
        self.probes, self.attached, self.missing = [], [], []
        for probe in probes(mechanism):
            try:
                probe.attach(bpf)
            except Exception as err:
                if probe.required:
                    bpf.cleanup()
                    raise UserError(f"cannot attach {probe.label}: {err}") from err
                self.missing.append(probe.target)
                continue
            self.probes.append(probe)
            self.attached.append(probe.label)
        try:
            bpf.attach_raw_tracepoint(tp=DROP_TRACEPOINT, fn_name=DROP_FN)
        except Exception as err:
            bpf.cleanup()
            raise UserError(f"cannot attach raw_tracepoint:{DROP_TRACEPOINT}: {err}") from err
        self.attached.append(f"raw_tracepoint:{DROP_TRACEPOINT}")
        self.bpf, self.mechanism = bpf, mechanism

    def _on_lost(self, n: int) -> None:
        self.lost += n

    def _on_sample(self, _cpu: int, data: Any, size: int) -> None:
        raw = ctypes.string_at(data, min(size, EVENT_SIZE))
        if len(raw) < EVENT_SIZE:
            return
        ev: Event | EncodedEvent | None = encode_packet_event(raw, self.offset)  # nearly every sample
        if ev is None:
            full = decode(raw, self.offset, self._reasons, self._ksyms)
            if full.kind == "drop" and not self.keep_all_drops and \
                    not is_xfrm_drop(full.reason, full.detail["location"]):
                return
            ev = full
        assert self._emit is not None
        self._emit(ev)
        self.count += 1
        self.per_kind[ev.kind] = self.per_kind.get(ev.kind, 0) + 1

    def start(self, emit: Callable[[Event | EncodedEvent], None]) -> None:
        self._emit = emit
        if self.bpf is None:
            self.attach()
        self._thread = threading.Thread(target=self._run, name="kprobe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            asked, self._drains = self._drains, []
            self.bpf.perf_buffer_poll(timeout=POLL_MS)  # returns when a CPU's buffer has wakeup_events
            self.bpf.perf_buffer_consume()  # and the rest, below that, at least every POLL_MS
            for done in asked:
                done.set()

    def poll(self) -> None:
        """Return once what the kernel had queued is emitted (tests call it between phases).
        bcc's reader is not for two threads at once: with the polling thread running, this asks
        it for one more full pass and waits for it (at most about 2 * POLL_MS)."""
        if self._thread is None:
            self.bpf.perf_buffer_consume()
            return
        done = threading.Event()
        self._drains.append(done)
        done.wait(timeout=5 * POLL_MS / 1000)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.bpf is not None:
            self.bpf.perf_buffer_consume()  # drain
            if self.lost and self._emit is not None:
                self._emit(Event(time_ns=time.time_ns(), source=SOURCE, kind="lost",
                                 detail={"count": self.lost, "why": "perf buffer full"}))
            self.bpf.cleanup()
            self.bpf = None
