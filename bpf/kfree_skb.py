"""skb:kfree_skb drops through a tracefs instance of our own: no BPF, no kprobes, no headers.

An instance (`instances/ipsec_capture_<pid>`) has its own ring buffer, clock and enabled events, so
we never touch the global trace buffer another tool may be using. Its trace_clock is `boot`
(CLOCK_BOOTTIME), converted to wall clock with the events log's clock offsets. On kernels whose
format prints the location as %p (6.1), the instance is created with pointers unhashed (see
Tracefs.pointers_unhashed) so `location` can be symbolized through /proc/kallsyms; newer kernels
print it already symbolized (%pS).
The tracepoint is global: drops carry no namespace (Event.netns None).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import select
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

from ipsec_capture.errors import UserError
from ipsec_capture.models import Event

from .kallsyms import Kallsyms

SOURCE = "kfree_skb"
INSTANCE_PREFIX = "ipsec_capture_"
MOUNT_PREFIX = "ipsec_capture_tracefs_"  # + <pid>_<random>: a private tracefs mount point under /tmp
# bcc's kprobe events when it falls back to tracefs' kprobe_events: `p:kprobes/p_xfrm_input_bcc_<pid>`
_BCC_KPROBE = re.compile(r"^[pr]:(\S+/)?([pr]_(xfrm_\w+)_bcc_(\d+))\s", re.M)
EVENT_DIR = "events/skb/kfree_skb"
TRACE_CLOCK = "boot"
# functions whose drops are IPsec's business (location symbol prefixes)
XFRM_FUNCS = ("xfrm", "__xfrm", "esp", "ah", "ipcomp", "ah4", "ah6", "esp4", "esp6")
# `__print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, ...)` in the tracepoint's print fmt
_SYMBOLIC = re.compile(r'\{\s*(\d+)\s*,\s*"([A-Z0-9_]+)"\s*\}')
# `  ping-123  [001] ..s1.  4567.123456: kfree_skb: skbaddr=... location=... reason: XFRM_POLICY`
# Numbers are bounded in length (a CPU, seconds since boot, a fraction, an ethertype): a damaged
# line of thousands of digits must not reach int(), which refuses more than 4300.
_LINE = re.compile(
    rb"\[(\d{1,6})\]\s+\S*\s*(\d{1,12})\.(\d{1,9}): kfree_skb: skbaddr=(\S+)(?: rx_sk=\S+)?"
    rb" protocol=(\d{1,10}) location=(\S+)(?: reason: (\w+))?"
)


_ADDRESS = re.compile(r"(?:0x)?[0-9a-f]{8,16}")


def reason_names(format_text: str) -> dict[int, str]:
    """skb_drop_reason number -> name, from this kernel's tracepoint format (the enum changes
    between kernels: XFRM_POLICY is 18 on 6.18, another number on 6.1)."""
    return {int(n): name for n, name in _SYMBOLIC.findall(format_text)}


# Drop reasons (name prefixes) raised by socket, transport, neighbour and qdisc code, never by
# xfrm/esp/ah code: such a drop is never one is_xfrm_drop keeps, so the kprobe program can
# leave them in the kernel (a receiver with a full socket buffer drops every packet).
NOT_IPSEC_REASONS = ("SOCKET_", "TCP_", "UDP_", "NO_SOCKET", "OTHERHOST", "QDISC_", "NEIGH_", "PROTO_MEM")


def is_xfrm_drop(reason: str | None, location: str) -> bool:
    """A drop IPsec explains: an XFRM* reason, or freed inside xfrm/esp/ah code."""
    if reason and reason.startswith("XFRM"):
        return True
    return location.startswith(XFRM_FUNCS)


# The event filter (events/skb/kfree_skb/filter): the kernel then discards, before any trace line
# is written, what is_xfrm_drop would discard (a host's background drops cost nothing here). The
# write must stay under a page (the kernel refuses longer filters), so the xfrm functions' address
# ranges are coalesced across their smallest gaps: the filter lets through a superset (functions
# between xfrm ones), which is_xfrm_drop still sorts out.
FILTER_MAX = 4000
_RANGE = "location>=0x{:x}&&location<0x{:x}"
# XFRM_FUNCS without the names another one already starts (esp4 is under esp), as kallsyms text
# symbols ("<addr> t <name>" / "T"): found with bytes.find, ~10x faster than a line regex on 5 MB.
_NEEDLES = tuple(f" {kind} {p}".encode() for p in XFRM_FUNCS
                 if not any(p != q and p.startswith(q) for q in XFRM_FUNCS) for kind in "tT")
_MODULE_SPAN = 0x10000  # end bound for a function whose next kallsyms line is not above it


def xfrm_ranges(kallsyms: bytes) -> list[tuple[int, int]]:
    """[start, end) of every text symbol named like XFRM_FUNCS, merged where they touch; the end
    is the next kallsyms line's address (in address order inside vmlinux and inside a module)."""
    spans = []
    for needle in _NEEDLES:
        at = kallsyms.find(needle)
        while at >= 0:
            line = kallsyms.rfind(b"\n", 0, at) + 1
            nxt = kallsyms.find(b"\n", at) + 1
            start = int(kallsyms[line:at], 16)
            end = int(kallsyms[nxt:kallsyms.find(b" ", nxt)] or b"0", 16) if nxt else 0
            if start:
                spans.append((start, end if end > start else start + _MODULE_SPAN))
            at = kallsyms.find(needle, at + 1)
    spans.sort()
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def coalesce(ranges: list[tuple[int, int]], most: int) -> list[tuple[int, int]]:
    """At most `most` ranges covering `ranges`, by bridging the smallest gaps between them."""
    if len(ranges) <= most:
        return ranges
    gaps = sorted(range(1, len(ranges)), key=lambda i: ranges[i][0] - ranges[i - 1][1])
    keep = sorted(gaps[len(gaps) - (most - 1):]) if most > 1 else []
    out, first = [], 0
    for i in [*keep, len(ranges)]:
        out.append((ranges[first][0], ranges[i - 1][1]))
        first = i
    return out


def event_filter(format_text: str, kallsyms: bytes) -> str:
    """The tracefs filter that keeps what is_xfrm_drop keeps: an XFRM* reason of this kernel, or a
    location in an xfrm/esp/ah/ipcomp function. "" when the locations are unknown (kallsyms
    unreadable): then nothing is filtered in the kernel rather than losing drops."""
    ranges = xfrm_ranges(kallsyms)
    if not ranges:
        return ""
    reasons = "||".join(f"reason=={n}" for n, name in sorted(reason_names(format_text).items())
                        if name.startswith("XFRM"))
    room = FILTER_MAX - len(reasons) - 2
    per = len(_RANGE.format(ranges[-1][1], ranges[-1][1])) + 2
    spans = "||".join(_RANGE.format(lo, hi) for lo, hi in coalesce(ranges, max(room // per, 1)))
    return f"{reasons}||{spans}" if reasons else spans


FILTER_CACHE = "/run/ipsec-capture/kfree_skb.filter"


def _kernel_key(format_text: str) -> str:
    """What the filter depends on: this boot (KASLR moves every address), the modules loaded and
    where (/proc/modules), and the tracepoint's reason numbers."""
    h = hashlib.sha256(format_text.encode())
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/modules"):  # no modules: no file
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
            h.update(path.encode() + f.read())
    return h.hexdigest()


def cached_event_filter(format_text: str, cache: str = FILTER_CACHE) -> str:
    """event_filter from /proc/kallsyms, kept in `cache` for the next start on the same boot with
    the same modules: reading and scanning 5 MB of kallsyms costs ~60 ms of CPU, more than a short
    capture's whole start-up otherwise. Any failure of the cache only costs that time again."""
    key = _kernel_key(format_text)
    with contextlib.suppress(OSError, ValueError):
        with open(cache) as f:
            stored, text = f.read().split("\n", 1)
        if stored == key:
            return text
    with open("/proc/kallsyms", "rb") as f:
        text = event_filter(format_text, f.read())
    if text:
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(cache), mode=0o700, exist_ok=True)
            tmp = f"{cache}.{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{key}\n{text}")
            os.replace(tmp, cache)
    return text


def _mounted_tracefs() -> str | None:
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "tracefs":
                return parts[1]
    return None


class Tracefs:
    """A tracefs root: the mounted one, or a private mount of ours (removed on close) when the
    system has none mounted, so we leave the host's mounts as we found them."""

    def __init__(self) -> None:
        self.owned = False
        path = _mounted_tracefs()
        if path is None:
            path = tempfile.mkdtemp(prefix=f"{MOUNT_PREFIX}{os.getpid()}_")  # the pid: for cleanup
            proc = subprocess.run(["mount", "-t", "tracefs", "nodev", path], capture_output=True, text=True)
            if proc.returncode != 0:
                os.rmdir(path)
                raise UserError(f"cannot mount tracefs: {proc.stderr.strip()} "
                                "(needs root and CONFIG_TRACING)")
            self.owned = True
        self.path = path

    def close(self) -> None:
        if self.owned:
            subprocess.run(["umount", self.path], capture_output=True)
            with contextlib.suppress(OSError):
                os.rmdir(self.path)
            self.owned = False

    def has_kfree_skb(self) -> bool:
        return os.path.exists(os.path.join(self.path, EVENT_DIR, "format"))

    def read(self, rel: str) -> str:
        with open(os.path.join(self.path, rel)) as f:
            return f.read()

    @contextlib.contextmanager
    def pointers_unhashed(self) -> Iterator[None]:
        """Create instances inside this block and they print pointers as they are.

        `hash-ptr` is a top-level-only option (an instance has no options/hash-ptr of its own) that a
        new instance copies from the top level when it is created. On kernels that print the drop
        location as %p (6.1) a hashed pointer cannot be symbolized, so the top-level option is off
        for the moment of the mkdir and put back at once: the global buffer's output is left as
        it was, and our instance keeps raw pointers.
        """
        opt = os.path.join(self.path, "options", "hash-ptr")
        try:
            with open(opt) as f:
                old = f.read().strip()
        except OSError:  # kernels without the option never hash
            yield
            return
        if old == "0":
            yield
            return
        with open(opt, "w") as f:
            f.write("0")
        try:
            yield
        finally:
            with open(opt, "w") as f:
                f.write(old)


def _gone(pid: str) -> bool:
    return pid.isdigit() and not os.path.exists(f"/proc/{pid}")


def remove_stale_instances(tracefs: Tracefs) -> list[str]:
    """rmdir instances left by ipsec-capture processes that died (kill -9)."""
    removed = []
    base = os.path.join(tracefs.path, "instances")
    for name in os.listdir(base) if os.path.isdir(base) else []:
        if name.startswith(INSTANCE_PREFIX) and _gone(name.removeprefix(INSTANCE_PREFIX)):
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(base, name))
                removed.append(name)
    return removed


def stale_bcc_kprobes(kprobe_events: str) -> list[str]:
    """`group/event` of bcc's kprobe events on xfrm functions whose process is gone (bcc names
    them `p_<func>_bcc_<pid>`; it writes them into kprobe_events only where the kernel lacks the
    perf kprobe PMU, and a killed process cannot take them out)."""
    return [f"{m[1] or ''}{m[2]}" for m in _BCC_KPROBE.finditer(kprobe_events) if _gone(m[4])]


def _remove_kprobes(tracefs: Tracefs) -> list[str]:
    path = os.path.join(tracefs.path, "kprobe_events")
    try:
        with open(path) as f:
            stale = stale_bcc_kprobes(f.read())
    except OSError:  # no kprobes in this kernel
        return []
    removed = []
    for event in stale:
        with contextlib.suppress(OSError), open(path, "a") as f:
            f.write(f"-:{event}\n")
            removed.append(f"kprobe event {event}")
    return removed


def _our_mount_points() -> list[tuple[str, str]]:
    """(path, owner pid or "") of the private mount point directories of ours under the temp dir."""
    base = tempfile.gettempdir()
    try:
        names = os.listdir(base)
    except OSError:
        return []
    out = []
    for name in names:
        if name.startswith(MOUNT_PREFIX) and os.path.isdir(os.path.join(base, name)):
            pid = name.removeprefix(MOUNT_PREFIX).split("_", 1)[0]
            out.append((os.path.join(base, name), pid if pid.isdigit() else ""))
    return out


def _mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(len(parts) >= 2 and parts[1] == path for parts in (line.split() for line in f))


def cleanup_leftovers() -> list[str]:
    """Everything a killed capture leaves on the tracefs side, removed: its instance
    `ipsec_capture_<pid>`, bcc's kprobe events of its pid, and the private tracefs mount it made
    under /tmp (unmounted, then its directory). Only what belongs to processes that are gone;
    a mount point of an older ipsec-capture (no pid in its name) is removed only when nothing is
    mounted on it. Returns one line per thing removed."""
    removed: list[str] = []
    try:
        tracefs = Tracefs()
    except (UserError, OSError):
        tracefs = None
    if tracefs is not None:
        try:
            removed += [f"tracefs instance {name}" for name in remove_stale_instances(tracefs)]
            removed += _remove_kprobes(tracefs)
        finally:
            tracefs.close()
    for path, pid in _our_mount_points():
        if pid and not _gone(pid):
            continue
        if _mounted(path):
            if not pid:
                continue  # an older capture's: no owner to ask, so it stays while mounted
            if subprocess.run(["umount", path], capture_output=True).returncode != 0:
                continue  # busy: someone uses it
        with contextlib.suppress(OSError):
            os.rmdir(path)
            removed.append(f"tracefs mount point {path}")
    return removed


@dataclass(slots=True)
class Drop:
    """One parsed trace line (kept separate from Event so the filter runs before any Event)."""

    boot_ns: int
    cpu: int
    skbaddr: str
    protocol: int
    location: str
    reason: str | None


def parse_line(line: bytes, ksyms: Kallsyms | None = None) -> Drop | None:
    m = _LINE.search(line)
    if m is None:
        return None
    cpu, sec, frac, skb, proto, loc, reason = m.groups()
    # %pS prints `func+0xoff/0xsize`: drop the size. The kernel prints ASCII; anything else is
    # a damaged line, kept readable rather than refused.
    location = loc.decode("utf-8", "replace").split("/", 1)[0]
    if ksyms is not None and _ADDRESS.fullmatch(location):  # %p unhashed (6.1): bare hex, no 0x
        location = ksyms.symbolize(int(location, 16))
    skbaddr = skb.decode("utf-8", "replace")
    if not skbaddr.startswith("0x"):
        skbaddr = "0x" + skbaddr
    frac_s = frac.decode()
    boot_ns = int(sec) * 1_000_000_000 + int(frac_s) * 10 ** (9 - len(frac_s))
    return Drop(boot_ns, int(cpu), skbaddr, int(proto), location,
                reason.decode("utf-8", "replace") if reason else None)


class KfreeSkbSource:
    """Reads our instance's trace_pipe in a thread and emits `drop` Events."""

    name = SOURCE

    def __init__(self, wall_minus_boot_ns: int, keep_all: bool = False, buffer_kb: int = 2048) -> None:
        self.offset = wall_minus_boot_ns
        self.keep_all = keep_all
        self.count = 0
        self.seen = 0
        self.tracefs = Tracefs()
        self.instance = ""
        self._buffer_kb = buffer_kb
        self._ksyms: Kallsyms | None = None
        self._fd = -1
        self.kernel_filter = ""  # the event filter in force ("" none: every drop comes to us)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._emit: Callable[[Event], None] | None = None

    def _write(self, rel: str, value: str) -> None:
        with open(os.path.join(self.instance, rel), "w") as f:
            f.write(value)

    def attach(self) -> None:
        """Create and arm the instance (separate from start() so tests can see it exist)."""
        if not self.tracefs.has_kfree_skb():
            self.tracefs.close()
            raise UserError("this kernel has no skb:kfree_skb tracepoint in tracefs")
        remove_stale_instances(self.tracefs)
        self.instance = os.path.join(self.tracefs.path, "instances", f"{INSTANCE_PREFIX}{os.getpid()}")
        symbolized = "location=%pS" in self.tracefs.read(os.path.join(EVENT_DIR, "format"))
        try:
            with nullcontext() if symbolized else self.tracefs.pointers_unhashed():
                os.mkdir(self.instance)
        except FileExistsError:
            pass
        except OSError as err:
            self.tracefs.close()
            raise UserError(f"cannot create tracefs instance {self.instance}: {err.strerror}") from err
        try:
            self._write("trace_clock", TRACE_CLOCK)
            self._write("buffer_size_kb", str(self._buffer_kb))
            if not symbolized:
                self._ksyms = Kallsyms()
            self._fd = os.open(os.path.join(self.instance, "trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
            # Only where the filter was seen to work: on the lab's 6.1 (location printed as %p)
            # it also held back the XFRM_POLICY drops it should pass (cause not found yet), so
            # there every line still comes to us and is_xfrm_drop sorts them, as before.
            if not self.keep_all and symbolized:
                self._set_filter()
            self._write(os.path.join(EVENT_DIR, "enable"), "1")
        except BaseException:
            self._remove()
            raise

    def _set_filter(self) -> None:
        """Let the kernel drop the trace lines _handle would drop; a kernel that refuses the filter
        costs speed only (every line then comes to us and is filtered here)."""
        text = cached_event_filter(self.tracefs.read(os.path.join(EVENT_DIR, "format")))
        if not text:
            return
        try:
            self._write(os.path.join(EVENT_DIR, "filter"), text)
        except OSError:
            return
        self.kernel_filter = text

    def start(self, emit: Callable[[Event], None]) -> None:
        if not self.instance:
            self.attach()
        self._emit = emit
        self._thread = threading.Thread(target=self._run, name="kfree_skb", daemon=True)
        self._thread.start()

    def _handle(self, line: bytes) -> None:
        drop = parse_line(line, self._ksyms)
        if drop is None:
            return
        self.seen += 1
        if not self.keep_all and not is_xfrm_drop(drop.reason, drop.location):
            return
        assert self._emit is not None
        self._emit(Event(time_ns=drop.boot_ns + self.offset, source=SOURCE, kind="drop", reason=drop.reason,
                         detail={"location": drop.location, "protocol": drop.protocol,
                                 "skbaddr": drop.skbaddr, "cpu": drop.cpu}))
        self.count += 1

    def _drain(self, pending: bytes) -> bytes:
        while True:
            try:
                chunk = os.read(self._fd, 1 << 16)
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EINTR):
                    return pending
                raise
            if not chunk:
                return pending
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._handle(line)

    def _run(self) -> None:
        pending = b""
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.2)
            if ready:
                pending = self._drain(pending)
        pending = self._drain(pending)
        if pending:
            self._handle(pending)

    def _remove(self) -> None:
        if self.instance:
            with contextlib.suppress(OSError):
                self._write(os.path.join(EVENT_DIR, "enable"), "0")
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.instance:
            with contextlib.suppress(OSError):
                os.rmdir(self.instance)
            self.instance = ""
        self.tracefs.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._remove()


def tracefs_available() -> tuple[bool, str]:
    """Whether the kfree_skb tracefs source can run here, and why (for plan_sources)."""
    if os.geteuid() != 0:
        return False, "needs root for tracefs"
    if shutil.which("mount") is None and _mounted_tracefs() is None:
        return False, "tracefs is not mounted and `mount` is missing"
    try:
        tracefs = Tracefs()
    except UserError as err:
        return False, str(err)
    try:
        if not tracefs.has_kfree_skb():
            return False, "no skb:kfree_skb tracepoint in tracefs"
        return True, f"tracefs instance at {tracefs.path if not tracefs.owned else 'a private tracefs mount'}"
    finally:
        tracefs.close()
