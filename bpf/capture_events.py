"""The events log of a live capture (`out.events.jsonl` beside `out.pcapng`) or of `events`.

`start` gets one companion that owns the whole log, so the log tells one story in order:
a header (host, kernel, clocks, the sources that attached and why the others did not: the
kernel sources are attached before the header is written), the SA snapshot taken
before `ready` (so the correlation knows which SA held each SPI when the capture began, even
with no monitor event for it), then the kernel events as the sources produce them, and last
the capture's own statistics (source `capture`: packets per point, lost, ENOBUFS), because a
report that explains drops must also know which packets the capture itself missed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from ipsec_capture.errors import UserError
from ipsec_capture.models import Event
from ipsec_capture.netns import netns_inode

from .eventlog import EventLogWriter, clock_offsets, make_header
from .sources import KernelEvents, describe, plan_sources


def sa_snapshot_events(netns: str | None, inode: int | None, now: int | None = None) -> list[Event]:
    """One `sa_snapshot` Event per SA in the namespace now (keys never leave the process)."""
    from ipsec_capture.xfrm.netlink import dump_states

    now = time.time_ns() if now is None else now
    return [Event(time_ns=now, source="sa_snapshot", kind="sa", netns=inode, spi=sa.spi,
                  tuple={"src": sa.src, "dst": sa.dst, "proto": sa.proto},
                  detail={"sa": sa.to_dict(keys=False)})
            for sa in dump_states(netns)]


class CaptureEvents:
    """Companion for `start`: writes the events log from `start()` (before `ready`) to `stop()`.

    `stats` is called at stop for the capture's own counters (the `capture` event). If `start()`
    fails the log is removed again: a failed start leaves no half bundle behind.
    """

    name = "events"

    def __init__(self, path: str | os.PathLike[str], mode: str = "auto", netns: str | None = None,
                 stats: Callable[[], dict[str, Any]] | None = None, quiet: bool = False,
                 poll_interval: float = 0.5, keep_all_drops: bool = False,
                 writer: Callable[[str, dict[str, Any]], EventLogWriter] = EventLogWriter,
                 stamp_late_ns: int = 0) -> None:
        self.path = os.fspath(path)
        self._open = writer  # capture/rotate.py gives one that moves on to the next bundle part
        self.mode = mode
        self.netns = netns
        self.stats = stats
        self.quiet = quiet
        self.poll_interval = poll_interval
        self.keep_all_drops = keep_all_drops
        self.stamp_late_ns = stamp_late_ns  # the header says it (make_header)
        self.plan = plan_sources(mode, netns)  # bad mode / netns fail before anything is created
        self._writer: EventLogWriter | None = None
        self._kernel: KernelEvents | None = None
        self._inode = netns_inode(netns)
        self.count = 0

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(f"ipsec-capture: {msg}", file=sys.stderr, flush=True)

    def start(self) -> None:
        clock = clock_offsets()
        self._kernel = KernelEvents(None, self.mode, self.netns, self.poll_interval,
                                    keep_all_drops=self.keep_all_drops, progress=self._say,
                                    plan=self.plan, clock=clock)
        self.plan = self._kernel.attach()  # what attached, before the header says so
        self._say(describe(self.plan))
        try:
            header = make_header(sources=[s.to_dict() for s in self.plan], clock=clock,
                                 netns={"name": self.netns, "inode": self._inode},
                                 stamp_late_ns=self.stamp_late_ns)
            self._writer = self._open(self.path, header)
        except BaseException:
            self._kernel.stop()
            raise
        try:
            snapshot = sa_snapshot_events(self.netns, self._inode)
            for ev in snapshot:
                self._writer.write(ev)
            self._kernel.start(self._writer)
            self._writer.flush()
        except BaseException:
            self._kernel.stop()
            self._writer.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self._writer = None
            raise

    def stop(self) -> dict[str, Any]:
        if self._writer is None:
            raise UserError("events log was never started")
        summary: dict[str, Any] = {"path": self.path}
        try:
            if self._kernel is not None:
                summary.update(self._kernel.stop())
            if self.stats is not None:
                self._writer.write(Event(time_ns=time.time_ns(), source="capture", kind="stats",
                                         netns=self._inode, detail=self.stats()))
            summary["written"] = self.count = self._writer.count
        finally:
            self._writer.close()
        summary["sources"] = [s.name for s in self.plan if s.active]
        return summary
