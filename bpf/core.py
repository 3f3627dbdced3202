"""The CO-RE source: xfrm_probes.bpf.o, built once (build.py) and shipped, loaded by libbpf.

No compiler and no kernel headers on the machine that runs it: libbpf relocates the object's
field reads to the running kernel's BTF (/sys/kernel/btf/vmlinux) at load, in a fraction of a
second (bcc compiles for 40-120 s under emulation). The same probes, event shape and events-log
lines as the bcc source (kprobes.py): decoding is probe_event's.

Mechanisms: fentry/fexit (BPF trampolines) and kprobe/kretprobe, tried in that order under
"auto"; "none" loads the skb:kfree_skb raw tracepoint program alone, for kernels where neither
may attach (this host: no kprobes, tracing programs refused): then it is a drop source, named
"kfree_skb" as the tracefs one is, rather than the per-packet "kprobe" source. One object holds
both program sets; autoload picks one before load.

Filters live in the kernel, set as data: the namespaces whose events leave it (a map: one loaded
object serves every namespace `watch` asks for, add_netns/remove_netns), and for kfree_skb the
reasons (numbered as this kernel numbers them, named from its BTF) and the text ranges of the
functions whose drops we report (kallsyms): a closed port's drops never wake user space.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ipsec_capture.errors import UserError
from ipsec_capture.models import EncodedEvent, Event

from . import libbpf
from .kallsyms import Kallsyms
from .kfree_skb import XFRM_FUNCS, is_xfrm_drop
from .kprobes import ANCHORS, KPROBE_PMU, POLL_MS, WAKEUP_EVENTS, Probe
from .probe_event import EVENT_SIZE, SOURCE, decode, encode_packet_event

OBJECT = Path(__file__).with_name("xfrm_probes.bpf.o")
KERNEL_BTF = "/sys/kernel/btf/vmlinux"
MECHANISMS = ("auto", "fentry", "kprobe", "none")  # none: the kfree_skb tracepoint program alone
DROP_PROGRAM = "kfree_skb"
REASON_PREFIX = "SKB_DROP_REASON_"
RING_BYTES = 1 << 21  # a power of two (BPF ring buffer): ~14k events of slack for the reader
MAX_RANGES = 1024  # drop_ranges' size in xfrm_probes.bpf.c
MAX_REASONS = 1024
MAX_CPUS = 256  # counters' rows in xfrm_probes.bpf.c
C_LOST, C_DROPS_SEEN, C_DROPS_SENT = 0, 1, 2
_U32 = struct.Struct("<I")
_RANGE = struct.Struct("<QQ")


def core_probes(mechanism: str) -> list[Probe]:
    """The programs of xfrm_probes.bpf.c for `mechanism` (fentry or kprobe), entries before their
    returns; anchors are optional (a kernel built without them still gets the rest)."""
    ret = {"fentry": "fexit", "kprobe": "kretprobe"}[mechanism]
    main = [Probe(kind, fn, f"{kind}_{fn}", True) for fn in ("xfrm_input", "xfrm_output")
            for kind in (mechanism, ret)]
    return main + [Probe(mechanism, a, f"{mechanism}_{a.removeprefix('xfrm_audit_state_')}", False)
                   for a in ANCHORS]


def status() -> tuple[bool, str]:
    """Whether the CO-RE object can load here, and why not (no load is tried)."""
    if not os.path.exists(KERNEL_BTF):
        return False, f"this kernel has no BTF ({KERNEL_BTF}): CO-RE needs CONFIG_DEBUG_INFO_BTF"
    if not OBJECT.exists():
        return False, f"{OBJECT.name} is not built (./dev.sh setup builds it; the package ships it)"
    ok, why = libbpf.available()
    if not ok:
        return False, why
    if os.geteuid() != 0:
        return False, "needs root to load BPF programs"
    return True, f"{OBJECT.name} with libbpf"


def drop_ranges(ksyms: Kallsyms, limit: int = MAX_RANGES) -> list[tuple[int, int]]:
    """The text ranges whose kfree_skb drops we report (is_xfrm_drop's functions), at most
    `limit`: beyond it the nearest neighbours are merged (a wider range only lets a few more
    drops reach is_xfrm_drop, which still decides)."""
    ranges = ksyms.extents(lambda name: name.startswith(XFRM_FUNCS))
    if len(ranges) <= limit:
        return ranges
    # closing every gap up to the (n - limit)th smallest closes at least n - limit of them
    cut = sorted(b[0] - a[1] for a, b in itertools.pairwise(ranges))[len(ranges) - limit - 1]
    merged = [ranges[0]]
    for start, end in ranges[1:]:
        if start - merged[-1][1] <= cut:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def reason_names(btf: libbpf.Btf) -> dict[int, str]:
    """skb_drop_reason number -> name as the tracepoint prints it (NOT_SPECIFIED), from this
    kernel's BTF: the numbering changes between kernels (NOT_SPECIFIED is 1 on 6.1, 2 on 6.12)."""
    return {v: n.removeprefix(REASON_PREFIX) for v, n in btf.enum("skb_drop_reason").items()}


def _map_counters(obj: libbpf.BpfObject) -> memoryview:
    """The kernel's own `counters` (in .bss) mapped read-only into our memory: read with no
    syscall, so also after `start` has dropped root. (libbpf 1.1 maps .bss only for skeletons.)"""
    offset, size = obj.btf.section_vars(".bss")["counters"]
    if size != MAX_CPUS * 8 * 8:
        raise libbpf.LibbpfError(0, f"counters is {size} bytes, not {MAX_CPUS} x 8 x 8")
    bss = obj.map(".bss")
    length = -(-(offset + size) // mmap.PAGESIZE) * mmap.PAGESIZE
    try:
        area = mmap.mmap(bss.fd, length, mmap.MAP_SHARED, mmap.PROT_READ)
    except OSError as err:
        raise libbpf.LibbpfError(err.errno or 0, f"cannot map the object's .bss: {err.strerror}") from err
    return memoryview(area)[offset:offset + size].cast("Q")  # the mapping lives as long as the view


class CoreSource:
    """Loads and attaches xfrm_probes.bpf.o; a thread reads its ring buffer into Events.

    `netns`: the namespace inodes whose events leave the kernel (None: all). `mechanism`: one of
    MECHANISMS; "auto" takes the first that loads and attaches, and says in `fallback` why the
    others did not. `name` is "kprobe" with per-packet probes, "kfree_skb" with drops alone."""

    def __init__(self, wall_minus_mono_ns: int, netns: Iterable[int] | None = None,
                 keep_all_drops: bool = False, progress: Callable[[str], None] | None = None,
                 mechanism: str = "auto", ring_bytes: int = RING_BYTES, wakeup_events: int = WAKEUP_EVENTS,
                 obj: Path = OBJECT) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism {mechanism!r} not in {MECHANISMS}")
        self.offset = wall_minus_mono_ns
        self.netns = None if netns is None else sorted(set(netns))
        self.keep_all_drops = keep_all_drops
        self.progress = progress or (lambda _msg: None)
        self.wanted_mechanism = mechanism
        self.ring_bytes = ring_bytes
        self.wakeup_events = wakeup_events
        self.path = obj
        self.name = SOURCE
        self.mechanism = ""
        self.fallback = ""
        self.attached: list[str] = []
        self.missing: list[str] = []
        self.load_s = 0.0
        self.count = 0
        self._final: dict[int, int] = {}  # the kernel counters as they were at stop
        self.per_kind: dict[str, int] = {}
        self._obj: libbpf.BpfObject | None = None
        self._links: list[libbpf.Link] = []
        self._ring: libbpf.RingBuffer | None = None
        self._netns_map: libbpf.Map | None = None
        self._counters: memoryview | None = None
        self._reasons: dict[int, str] = {}
        self._ksyms: Kallsyms | None = None
        self._emit: Callable[[Event | EncodedEvent], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drains: list[threading.Event] = []
        self._lock = threading.Lock()  # one reader of the ring at a time

    # ------------------------------------------------------------------ loading
    def _order(self) -> list[str]:
        if self.wanted_mechanism != "auto":
            return [self.wanted_mechanism]
        return ["fentry", "kprobe"] if os.path.isdir(KPROBE_PMU) else ["fentry"]

    def attach(self) -> None:
        """Load and attach (raises UserError if no mechanism works); nothing is read yet."""
        t0 = time.monotonic()
        try:
            with libbpf.Btf.vmlinux() as btf:
                self._reasons = reason_names(btf)
                present = {a for a in ANCHORS if btf.has_func(a)}
            self._ksyms = Kallsyms()
        except libbpf.LibbpfError as err:
            raise UserError(f"CO-RE: {err}") from err
        if not self._ksyms.readable:
            raise UserError("CO-RE: /proc/kallsyms hides addresses (needs root): drops cannot be filtered")
        failures = []
        for mechanism in self._order():
            try:
                self._load(mechanism, present)
            except libbpf.LibbpfError as err:
                failures.append(f"{mechanism}: {err.strerror}")
                continue
            break
        else:
            tried = "; ".join(failures) + ("" if os.path.isdir(KPROBE_PMU) or self.wanted_mechanism != "auto"
                                           else "; no kprobes in this kernel")
            raise UserError(tried)
        self.fallback = "; ".join(failures)
        self.load_s = time.monotonic() - t0

    def _load(self, mechanism: str, anchors_present: set[str]) -> None:
        obj = libbpf.BpfObject(self.path)
        try:
            wanted = core_probes(mechanism) if mechanism != "none" else []
            loading = {p.fn for p in wanted if p.required or p.target in anchors_present}
            for name, prog in obj.programs.items():
                prog.set_autoload(name in loading or name == DROP_PROGRAM)
            obj.set_rodata("all_netns", ctypes.c_uint32, int(self.netns is None))
            obj.set_rodata("keep_all_drops", ctypes.c_uint32, int(self.keep_all_drops))
            ranges = drop_ranges(self._ksyms) if self._ksyms is not None else []
            obj.set_rodata("nr_ranges", ctypes.c_uint32, len(ranges))
            obj.set_rodata("wakeup_bytes", ctypes.c_uint64, self.wakeup_events * (EVENT_SIZE + 8))
            ring = obj.map("events")
            if libbpf.lib().bpf_map__set_max_entries(ring.ptr, self.ring_bytes):
                raise libbpf.LibbpfError(22, f"ring buffer size {self.ring_bytes} refused")
            obj.load()
            netns_map = obj.map("netns_filter")
            for inode in self.netns or ():
                netns_map.update(_U32.pack(inode), b"\x01")
            reasons = obj.map("drop_reasons")
            for number, name in self._reasons.items():
                if 0 <= number < MAX_REASONS and name.startswith("XFRM"):
                    reasons.update(_U32.pack(number), b"\x01")
            where = obj.map("drop_ranges")
            for i, (start, end) in enumerate(ranges):
                where.update(_U32.pack(i), _RANGE.pack(start, end))
            counters = _map_counters(obj)
            links, attached, missing = [], [], sorted(set(ANCHORS) - anchors_present) if wanted else []
            try:
                for probe in wanted:
                    if probe.fn not in loading:
                        continue
                    try:
                        links.append(obj.programs[probe.fn].attach())
                        attached.append(probe.label)
                    except libbpf.LibbpfError:
                        if probe.required:
                            raise
                        missing.append(probe.target)
                links.append(obj.programs[DROP_PROGRAM].attach())
                attached.append(f"raw_tracepoint:{DROP_PROGRAM}")
                self._ring = libbpf.RingBuffer(ring, self._on_sample)
            except BaseException:
                for link in links:
                    link.destroy()
                raise
        except BaseException:
            obj.close()
            raise
        self._obj, self._links, self._netns_map, self._counters = obj, links, netns_map, counters
        self.mechanism, self.attached, self.missing = mechanism, attached, missing
        self.name = SOURCE if mechanism != "none" else "kfree_skb"  # as the tracefs drop source

    # ------------------------------------------------------------------ namespaces
    def add_netns(self, inode: int) -> None:
        """Let `inode`'s events out too (the object stays loaded: `watch` over many namespaces)."""
        if self._netns_map is None or self.netns is None:
            raise UserError("add_netns: the source is not loaded, or already passes every namespace")
        self._netns_map.update(_U32.pack(inode), b"\x01")
        self.netns = sorted({*self.netns, inode})

    def remove_netns(self, inode: int) -> None:
        if self._netns_map is not None and self.netns is not None and inode in self.netns:
            self._netns_map.delete(_U32.pack(inode))
            self.netns.remove(inode)

    # ------------------------------------------------------------------ reading
    def _on_sample(self, data: int, size: int) -> None:
        if size < EVENT_SIZE:
            return
        raw = ctypes.string_at(data, EVENT_SIZE)
        ev: Event | EncodedEvent | None = encode_packet_event(raw, self.offset)  # nearly every sample
        if ev is None:
            full = decode(raw, self.offset, self._reasons, self._ksyms)
            if full.kind == "drop" and not self.keep_all_drops and \
                    not is_xfrm_drop(full.reason, full.detail["location"]):
                return  # a merged range let a neighbour's drop through
            ev = full
        assert self._emit is not None
        self._emit(ev)
        self.count += 1
        self.per_kind[ev.kind] = self.per_kind.get(ev.kind, 0) + 1

    def counter(self, which: int) -> int:
        """Sum over CPUs of a kernel-side counter (C_LOST, C_DROPS_SEEN, C_DROPS_SENT)."""
        if self._counters is None:
            return self._final.get(which, 0)
        return sum(self._counters[which::8])

    @property
    def lost(self) -> int:
        return self.counter(C_LOST)

    @property
    def drops_seen(self) -> int:
        """kfree_skb calls the program saw (every drop on the machine) ..."""
        return self.counter(C_DROPS_SEEN)

    @property
    def drops_sent(self) -> int:
        """... and the ones its filters let out to us."""
        return self.counter(C_DROPS_SENT)

    def start(self, emit: Callable[[Event | EncodedEvent], None]) -> None:
        self._emit = emit
        if self._obj is None:
            self.attach()
        self._thread = threading.Thread(target=self._run, name=f"core-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ring = self._ring
        assert ring is not None
        while not self._stop.is_set():
            asked, self._drains = self._drains, []
            with self._lock:
                ring.poll(POLL_MS)  # returns when wakeup_bytes wait, or after POLL_MS
                ring.consume()  # and what is there below that
            for done in asked:
                done.set()

    def poll(self) -> None:
        """Return once what the kernel had queued is emitted (tests call it between phases)."""
        if self._ring is None:
            return
        if self._thread is None:
            with self._lock:
                self._ring.consume()
            return
        done = threading.Event()
        self._drains.append(done)
        done.wait(timeout=5 * POLL_MS / 1000)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for link in self._links:
            link.destroy()
        self._links = []
        if self._ring is not None:
            self._ring.consume()  # what came before the detach
            lost = self.lost
            if lost and self._emit is not None:
                self._emit(Event(time_ns=time.time_ns(), source=SOURCE, kind="lost",
                                 detail={"count": lost, "why": "ring buffer full"}))
            self._ring.free()
            self._ring = None
        self._final = {c: self.counter(c) for c in (C_LOST, C_DROPS_SEEN, C_DROPS_SENT)}
        if self._counters is not None:
            self._counters.release()
            self._counters = None
        if self._obj is not None:
            self._obj.close()
            self._obj = None
