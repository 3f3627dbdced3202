"""The bcc kprobe source: per-packet xfrm_input / xfrm_output with SPI, seq and return code, the
xfrm_audit_state_* anchors and skb:kfree_skb, all as one event struct (xfrm_probes.c, mirrored by
EVENT below: change both together).

bcc is a system package (python3-bpfcc) and compiles against the running kernel's headers: under
emulation that takes 80-120 s, so start() says so on stderr. Kernel probe events are stamped with
CLOCK_MONOTONIC and converted to wall clock with the events log's offset. Drops are emitted with
source "kfree_skb" (as the tracefs source does), every other probe with source "kprobe".
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ipsec_capture.bpf.kallsyms import Kallsyms
from ipsec_capture.bpf.kfree_skb import EVENT_DIR, NOT_IPSEC_REASONS, Tracefs, is_xfrm_drop, reason_names

from ipsec_capture.errors import UserError
from ipsec_capture.models import Event

SOURCE = "kprobe"
PROGRAM = Path(__file__).with_name("xfrm_probes.c")

# struct ipsec_event in xfrm_probes.c, field for field
EVENT = struct.Struct("<QQQqIIIIIIIIIiHHBBBB16s16s16s16s")
EVENT_SIZE = 144
assert EVENT.size == EVENT_SIZE

# enum in xfrm_probes.c -> Event.kind
KINDS = {1: "xfrm_input", 2: "xfrm_output", 3: "notfound", 4: "icvfail", 5: "replay",
         6: "replay-overflow", 7: "drop"}
F_RESUMED = 1
F_ESN = 2
AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
IPPROTO_ESP = 50  # <netinet/in.h>
MODES = {0: "transport", 1: "tunnel", 2: "ro", 3: "in_trigger", 4: "beet"}  # <linux/xfrm.h> XFRM_MODE_*

# (event, BPF function, return probe, required): anchors may be missing (CONFIG_AUDITSYSCALL off)
PROBES = (
    ("xfrm_input", "kp_xfrm_input", False, True),
    ("xfrm_input", "kr_xfrm_input", True, True),
    ("xfrm_output", "kp_xfrm_output", False, True),
    ("xfrm_output", "kr_xfrm_output", True, True),
    ("xfrm_audit_state_notfound", "kp_notfound", False, False),
    ("xfrm_audit_state_notfound_simple", "kp_notfound_simple", False, False),
    ("xfrm_audit_state_icvfail", "kp_icvfail", False, False),
    ("xfrm_audit_state_replay", "kp_replay", False, False),
    ("xfrm_audit_state_replay_overflow", "kp_replay_overflow", False, False),
)


_addrs: dict[tuple[int, bytes], str | None] = {}


def _addr(family: int, raw: bytes) -> str | None:
    """An address as text; remembered, since a tunnel's few addresses come in every event."""
    key = (family, raw)
    text = _addrs.get(key, False)
    if text is False:
        if family == AF_INET:
            text = str(ipaddress.IPv4Address(raw[:4]))
        elif family == AF_INET6:
            text = str(ipaddress.IPv6Address(raw))
        else:
            text = None
        if len(_addrs) < 4096:
            _addrs[key] = text
    return text  # type: ignore[return-value]


def decode(raw: bytes, wall_minus_mono: int, reasons: dict[int, str],
           ksyms: Kallsyms | None) -> Event:
    """One perf sample -> Event (pure: the lab test feeds it real samples, unit tests fake ones)."""
    (ts, skb, location, ret, kind, netns, ifindex, mark, spi, seq, seq_hi, reason, length, encap,
     family, protocol, l4proto, mode, sa_family, flags, saddr, daddr, sa_saddr, sa_daddr) = \
        EVENT.unpack_from(raw)
    name = KINDS.get(kind, f"kind-{kind}")
    detail: dict[str, Any] = {"skb": f"0x{skb:x}", "ifindex": ifindex, "mark": mark}
    ev = Event(time_ns=ts + wall_minus_mono, source=SOURCE, kind=name, netns=netns or None, detail=detail)
    if name == "drop":
        ev.source = "kfree_skb"
        ev.reason = reasons.get(reason, str(reason))
        detail.update(location=ksyms.symbolize(location) if ksyms else f"0x{location:x}",
                      protocol=protocol, skbaddr=f"0x{skb:x}", via="bpf")
        del detail["skb"]
        return ev
    pkt = {"src": _addr(family, saddr), "dst": _addr(family, daddr), "proto": l4proto} if family else None
    sa = {"src": _addr(sa_family, sa_saddr), "dst": _addr(sa_family, sa_daddr), "proto": IPPROTO_ESP} \
        if sa_family and any(sa_daddr) else None
    ev.spi = socket.ntohl(spi) or None
    ev.seq = None if flags & F_RESUMED else seq
    detail["len"] = length
    if flags & F_ESN:
        detail["seq_hi"] = seq_hi
    if name == "xfrm_input":
        ev.ret = ret
        ev.tuple = pkt
        detail["encap"] = encap
        if flags & F_RESUMED:
            detail["resumed"] = True  # after async crypto: the first pass had the SPI and seq
    elif name == "xfrm_output":
        ev.ret = ret
        ev.tuple, ev.inner = sa, pkt
        detail["mode"] = MODES.get(mode, str(mode))
    elif name == "notfound":
        ev.tuple = pkt
    else:  # icvfail, replay, replay-overflow: the SA names the tunnel
        ev.tuple = sa or pkt
        if name == "replay-overflow":
            ev.inner = pkt
    return ev


def _load_bcc() -> Any:
    try:
        from bcc import BPF
    except ImportError as err:
        raise UserError("bcc is not installed: apt-get install python3-bpfcc "
                        "linux-headers-$(uname -r)") from err
    return BPF


class KprobeSource:
    """Compiles and attaches xfrm_probes.c; a thread polls the perf buffer into Events."""

    name = SOURCE

    def __init__(self, wall_minus_mono_ns: int, netns_inode: int | None = None, keep_all_drops: bool = False,
                 progress: Callable[[str], None] | None = None, page_cnt: int = 256) -> None:
        self.offset = wall_minus_mono_ns
        self.netns_inode = netns_inode
        self.keep_all_drops = keep_all_drops
        self.progress = progress or (lambda _msg: None)
        self.page_cnt = page_cnt
        self.count = 0
        self.lost = 0
        self.per_kind: dict[str, int] = {}
        self.attached: list[str] = []
        self.missing: list[str] = []
        self.compile_s = 0.0
        self.bpf: Any = None
        self._emit: Callable[[Event], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reasons: dict[int, str] = {}
        self._ksyms: Kallsyms | None = None

    def attach(self) -> None:
        BPF = _load_bcc()
        tracefs = Tracefs()
        try:
            self._reasons = reason_names(tracefs.read(os.path.join(EVENT_DIR, "format")))
        finally:
            tracefs.close()
        self._ksyms = Kallsyms()
        cflags = [f"-DNETNS_FILTER={self.netns_inode or 0}"]
        self.progress("compiling the kernel probes with bcc (80-120 s under emulation, a few s on hardware)")
        t0 = time.monotonic()
        try:
            self.bpf = BPF(src_file=str(PROGRAM).encode(), cflags=cflags)
        except Exception as err:  # bcc raises plain Exception on compile/load errors
            raise UserError(f"cannot compile the kernel probes: {err} (are the kernel headers for "
                            f"{os.uname().release} installed? apt-get install linux-headers-$(uname -r))") \
                from err
        self.compile_s = time.monotonic() - t0
        for event, fn, ret, required in PROBES:
            try:
                if ret:
                    self.bpf.attach_kretprobe(event=event, fn_name=fn)
                else:
                    self.bpf.attach_kprobe(event=event, fn_name=fn)
                self.attached.append(f"{'kretprobe' if ret else 'kprobe'}:{event}")
            except Exception as err:
                if required:
                    self.bpf.cleanup()
                    raise UserError(f"cannot attach a kprobe to {event}: {err}") from err
                self.missing.append(event)
        if not self.keep_all_drops:
            skip = self.bpf["skip_reason"]
            for number, name in self._reasons.items():
                if 0 <= number < len(skip) and name.startswith(NOT_IPSEC_REASONS):
                    skip[ctypes.c_int(number)] = ctypes.c_ubyte(1)
        self.bpf["events"].open_perf_buffer(self._on_sample, page_cnt=self.page_cnt, lost_cb=self._on_lost)

    def _on_lost(self, n: int) -> None:
        self.lost += n

    def _on_sample(self, _cpu: int, data: Any, size: int) -> None:
        raw = ctypes.string_at(data, min(size, EVENT_SIZE))
        if len(raw) < EVENT_SIZE:
            return
        ev = decode(raw, self.offset, self._reasons, self._ksyms)
        if ev.kind == "drop" and not self.keep_all_drops and \
                not is_xfrm_drop(ev.reason, ev.detail["location"]):
            return
        assert self._emit is not None
        self._emit(ev)
        self.count += 1
        self.per_kind[ev.kind] = self.per_kind.get(ev.kind, 0) + 1

    def start(self, emit: Callable[[Event], None]) -> None:
        self._emit = emit
        if self.bpf is None:
            self.attach()
        self._thread = threading.Thread(target=self._run, name="kprobe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.bpf.perf_buffer_poll(timeout=200)

    def poll(self) -> None:
        """Drain what the kernel has queued (tests call it between phases)."""
        self.bpf.perf_buffer_poll(timeout=0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.bpf is not None:
            self.bpf.perf_buffer_poll(timeout=100)  # drain
            if self.lost and self._emit is not None:
                self._emit(Event(time_ns=time.time_ns(), source=SOURCE, kind="lost",
                                 detail={"count": self.lost, "why": "perf buffer full"}))
            self.bpf.cleanup()
            self.bpf = None
