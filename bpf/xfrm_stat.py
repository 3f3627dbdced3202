"""XFRM error counters (/proc/net/xfrm_stat) of one network namespace, polled into delta Events.

The counters are per netns, and /proc/net follows the *process's* namespace, not the thread's: we
open /proc/thread-self/net/xfrm_stat while this thread is inside the target namespace, and the open
file stays bound to that namespace, so every later pread() reads its counters wherever we run.
Counter names and meanings: the kernel's Documentation/networking/xfrm_proc.rst.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from ipsec_capture.errors import UserError
from ipsec_capture.models import Event
from ipsec_capture.netns import entered, netns_inode

SOURCE = "xfrm_stat"
PROC_PATH = "/proc/thread-self/net/xfrm_stat"

# Documentation/networking/xfrm_proc.rst: what each counter means, for reports and --help
MEANINGS = {
    "XfrmInError": "all errors not matched by other inbound counters",
    "XfrmInBufferError": "no buffer is left",
    "XfrmInHdrError": "header error",
    "XfrmInNoStates": "no state found (wrong SPI or address, or the SA was deleted)",
    "XfrmInStateProtoError": "transformation protocol specific error (e.g. SA key is wrong)",
    "XfrmInStateModeError": "transformation mode specific error",
    "XfrmInStateSeqError": "sequence error (sequence number is out of window)",
    "XfrmInStateExpired": "state is expired",
    "XfrmInStateMismatch": "state has mismatch option (e.g. UDP encapsulation type)",
    "XfrmInStateInvalid": "state is invalid",
    "XfrmInTmplMismatch": (
        "no matching template for states (e.g. inbound SAs are correct but SP rule is wrong)"),
    "XfrmInNoPols": "no policy is found for states (e.g. inbound SAs are correct but no SP is found)",
    "XfrmInPolBlock": "policy discards",
    "XfrmInPolError": "policy error",
    "XfrmAcquireError": "state hasn't been fully acquired before use",
    "XfrmFwdHdrError": "forward routing of a packet is not allowed",
    "XfrmInStateDirError": "state direction mismatch (lookup found an output state on the input path)",
    "XfrmInIptfsError": "IP-TFS inbound error",
    "XfrmOutError": "all errors not matched by other outbound counters",
    "XfrmOutBundleGenError": "bundle generation error",
    "XfrmOutBundleCheckError": "bundle check error",
    "XfrmOutNoStates": "no state is found (an acquire was sent to the IKE daemon)",
    "XfrmOutStateProtoError": "transformation protocol specific error",
    "XfrmOutStateModeError": "transformation mode specific error",
    "XfrmOutStateSeqError": "sequence error (sequence number overflow)",
    "XfrmOutStateExpired": "state is expired",
    "XfrmOutPolBlock": "policy discards",
    "XfrmOutPolDead": "policy is dead",
    "XfrmOutPolError": "policy error",
    "XfrmOutStateInvalid": "state is invalid, perhaps expired",
    "XfrmOutStateDirError": "state direction mismatch (lookup found an input state on the output path)",
    "XfrmOutNoQueueSpace": "no space left in the queue for packets waiting for a state",
}


def parse(text: bytes) -> dict[str, int]:
    """`Name<spaces/tab>value` lines -> {name: value}; unknown names are kept (newer kernels)."""
    out: dict[str, int] = {}
    for line in text.split(b"\n"):
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0].decode()] = int(parts[1])
    return out


class XfrmStatReader:
    """An open handle on one namespace's counters; `read()` returns them now."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.inode = netns_inode(netns)
        try:
            with entered(netns):
                self._fd = os.open(PROC_PATH, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise UserError("/proc/net/xfrm_stat is missing: "
                            "the kernel lacks CONFIG_XFRM_STATISTICS") from err

    def read(self) -> dict[str, int]:
        return parse(os.pread(self._fd, 1 << 16, 0))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def deltas(before: dict[str, int], after: dict[str, int], time_ns: int, netns: int | None) -> list[Event]:
    """One counter Event per counter that moved (a counter that appears counts from 0)."""
    events = []
    for name, value in after.items():
        delta = value - before.get(name, 0)
        if delta:
            events.append(Event(time_ns=time_ns, source=SOURCE, kind="counter", netns=netns, reason=name,
                                detail={"delta": delta, "value": value}))
    return events


class XfrmStatSource:
    """Polls the counters in a thread and emits deltas; `stop()` takes a last sample so a fault
    seen just before the end is not lost. The first sample is the baseline (no Event)."""

    name = SOURCE

    def __init__(self, netns: str | None = None, interval: float = 0.5) -> None:
        self.interval = interval
        self.reader = XfrmStatReader(netns)
        self.count = 0
        self._emit: Callable[[Event], None] | None = None
        self._last: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, emit: Callable[[Event], None]) -> None:
        self._emit = emit
        self._last = self.reader.read()
        self._thread = threading.Thread(target=self._run, name="xfrm_stat", daemon=True)
        self._thread.start()

    def poll(self) -> int:
        """Sample now and emit the deltas; returns how many counters moved."""
        with self._lock:
            if self._emit is None or self.reader._fd < 0:
                return 0
            now = self.reader.read()
            events = deltas(self._last, now, time.time_ns(), self.reader.inode)
            self._last = now
            for ev in events:
                self._emit(ev)
            self.count += len(events)
            return len(events)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll()
        with self._lock:
            self.reader.close()
