"""`ipsec-capture start`: rules in, reader bound, packets to pcapng, everything out again.

Order of a capture, and why:
  1. validate, check root, create the output file (an unwritable path fails before any rule);
  2. bind the NFLOG group (a group read by tcpdump fails here, still before any rule);
  3. install the rules (rules/guard.py removes them on every exit path);
  4. start the companions (key-file keeper, kernel event sources), then print `ready`;
  5. read until a stop signal, --count or --duration; drain; stop companions; rules out; close.
Stop signals only set a flag, so a stop never lands in the middle of a write: the file always
ends on a whole block. Lost packets (ENOBUFS, sequence gaps) make the exit status non-zero.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from ipsec_capture.errors import UserError, require_root
from ipsec_capture.netns import entered, netns_path

from . import privdrop
from .filters import build_filter
from .nflog import NflogReader
from .pcapng import PcapngWriter
from .status import StatusLine, human_bytes

EXIT_LOST = 3  # the capture finished but the kernel dropped packets we never saw
POLL_MS = 100
DRAIN_S = 0.05  # > the nflog batch timeout (10 ms)
DRAIN_POLL_MS = 10
FLUSH_EVERY = 0.2  # seconds: what a crash can lose at most (the file stays whole-block)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Companion(Protocol):
    """Something that runs beside a capture (esp_sa keeper, kernel event source).

    `start` is called after the rules are in and before `ready` is printed; `stop` after the reader
    stopped, and returns a JSON-serialisable summary that goes into the capture's summary. `path`
    is the file it writes: removed with the pcapng when the capture fails before `ready`.
    """

    name: str
    path: str

    def start(self) -> None: ...

    def stop(self) -> dict: ...


@dataclass(slots=True)
class StartOptions:
    group: int
    write: str
    points: Sequence[str] | None = None
    backend: str = "auto"
    count: int = 0
    duration: float = 0.0
    snaplen: int = 262144
    netns: str | None = None
    rules: bool = True
    host: str | None = None
    spi: int | None = None  # parsed: ipsec_capture.spi.parse_spi
    linktype: str = "nflog"
    quiet: bool = False
    rcvbuf: int | None = None
    rotation: Any = None  # capture/rotate.py Rotation: -C/-G/-W (None: one file)
    user: str | None = None  # the reader's user (privdrop.resolve: default the sudo caller, else nobody)
    drop: bool = True  # False: the reader stays root (--no-drop)


@dataclass(slots=True)
class CaptureStats:
    points: dict[str, int] = field(default_factory=dict)  # packets written per capture point
    written: int = 0
    filtered_out: int = 0
    received: int = 0
    lost: int = 0
    enobufs: int = 0
    bytes: int = 0
    started: float = 0.0  # wall clock
    elapsed: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """For the summary and the events log (source `capture`)."""
        return {"points": dict(self.points), "packets": self.written, "received": self.received,
                "filtered_out": self.filtered_out, "lost": self.lost, "enobufs": self.enobufs,
                "bytes": self.bytes, "duration_s": round(self.elapsed, 3),
                "rate_pps": round(self.written / self.elapsed, 1) if self.elapsed > 0 else 0.0}


def _ifname_in(netns: str | None) -> Callable[[int], str]:
    """ifindex -> name as the capture's namespace sees it (cached; looked up there on a miss).
    Every interface there now is looked up at once: an unprivileged reader cannot enter the
    namespace later (setns needs CAP_SYS_ADMIN), so only interfaces made during the capture
    may show as ifN."""
    names: dict[int, str] = {}
    with contextlib.suppress(OSError, UserError), entered(netns):
        names.update(socket.if_nameindex())

    def lookup(index: int) -> str:
        name = names.get(index)
        if name is None:
            try:
                with entered(netns):
                    name = socket.if_indextoname(index)
            except (OSError, UserError):
                name = f"if{index}"
            names[index] = name
        return name

    return lookup


class Capture:
    def __init__(self, opts: StartOptions, companions: Sequence[Companion] = (),
                 ready: Callable[[str], None] | None = None) -> None:
        self.opts = opts
        self.companions = list(companions)
        self.stats = CaptureStats()
        self.stopped_by = ""
        self.backend = "none" if not opts.rules else opts.backend
        self._ready = ready or (lambda line: print(line, file=sys.stderr, flush=True))
        self._stop: str | None = None
        self._announced = False
        self._created = False
        self._bytes = 0
        self._filter = build_filter(opts.host, opts.spi)
        self.rotate_hooks: list[Callable[[int, str], None]] = []  # companions following the parts
        self.parts: list[str] = []
        self._target: privdrop.Target | None = None
        self._owner = privdrop.file_owner()
        self._validate()

    def _validate(self) -> None:
        o = self.opts
        if not 0 <= o.group <= 0xFFFF:
            raise UserError(f"NFLOG group {o.group} out of range: use 0..65535")
        if o.count < 0:
            raise UserError("-c/--count must be 0 (no limit) or more")
        if o.duration < 0:
            raise UserError("--duration must be 0 (no limit) or more seconds")
        if not 1 <= o.snaplen <= 262144:
            raise UserError(f"-s/--snaplen {o.snaplen} out of range: use 1..262144")
        if o.netns is not None:
            netns_path(o.netns)

    def _only(self) -> Any:
        """--host/--spi as the rules' match (rules.only.Only), from the filter validated above."""
        import ipaddress

        from ipsec_capture.rules.only import Only

        f = self._filter
        if f is None:
            return Only()
        return Only(None if f.host is None else ipaddress.ip_address(f.host), f.spi)

    def stats_dict(self) -> dict[str, Any]:
        return self.stats.as_dict()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop = signal.Signals(signum).name

    def _stop_signal(self) -> int | None:
        """The stop signal this process got, for its reader (none: --count/--duration are the
        reader's own)."""
        return signal.Signals[self._stop] if self._stop and self._stop.startswith("SIG") else None

    def run(self) -> dict[str, Any]:
        """Capture until stopped; returns the summary. Raises UserError for what the user can fix."""
        o = self.opts
        require_root("ipsec-capture start")
        self._target = privdrop.resolve(o.user, o.drop)  # a bad --user fails before any rule
        if self._target is not None and o.rotation is not None and o.rotation.active:
            # The companions (events log, key file) follow each new part from this process; a
            # forked reader cannot tell them, so a rotating capture reads as this process does.
            print("ipsec-capture: -C/-G rotation: packets are read by this process (no --user "
                  "reader yet for rotated captures)", file=sys.stderr)
            self._target = None
        rs = None
        if o.rules:
            from ipsec_capture.rules.manager import build
            rs = build(o.group, o.points, o.backend, o.netns, only=self._only())
            self.backend = rs.backend
            self._filter = None  # the rules match --host/--spi: the kernel copies only what we keep
        try:
            self._run(rs)
        except BaseException:
            if self._created and not self._announced:  # failed before `ready`: leave no empty bundle behind
                first = [] if o.rotation is None or not o.rotation.active else [self._first_part()]
                for path in (o.write, *first, *(c.path for c in self.companions)):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
            raise
        self.stats.bytes = self._bytes  # after close: the whole file
        return self.summary()

    def _first_part(self) -> str:
        from .rotate import part_path

        return part_path(self.opts.write, 0)

    def _run(self, rs: Any) -> None:
        o = self.opts
        note = f"ipsec-capture start --group {o.group}" + (f" --netns {o.netns}" if o.netns else "")
        with (self._open_writer(note) as writer,
              self._created_flag(),
              self._given(o.write),
              NflogReader(o.group, snaplen=o.snaplen, netns=o.netns, rcvbuf=o.rcvbuf) as reader):
            guard: AbstractContextManager[Any] = nullcontext()
            if rs is not None:
                from ipsec_capture.rules.guard import installed
                from ipsec_capture.rules.points import POINTS
                guard = installed(rs)
                for name in rs.points:
                    writer.interface(name, POINTS[name].description)
            with guard:
                self._capture(writer, reader, rs.points if rs else ())
        self._bytes = writer.committed
        self.parts = list(getattr(writer, "parts", ()))

    def _open_writer(self, note: str) -> PcapngWriter:
        """One pcapng file, or with -C/-G a set of bundle parts (capture/rotate.py)."""
        o = self.opts

        def open_part(path: str) -> PcapngWriter:
            return PcapngWriter(path, linktype=o.linktype, snaplen=o.snaplen, ifname=_ifname_in(o.netns),
                                comment=note)

        if o.rotation is None or not o.rotation.active:
            return open_part(o.write)
        from .rotate import RotatingWriter

        # duck-typed: RotatingWriter has the PcapngWriter methods the capture uses (rotate.py), not its class
        return RotatingWriter(o.write, o.rotation, open_part, self.rotate_hooks)  # type: ignore[return-value]

    @contextlib.contextmanager
    def _given(self, path: str) -> Iterator[None]:
        """The file just created goes to the user who ran sudo (mode 0600 stays)."""
        privdrop.give(path, self._owner)
        yield

    @contextlib.contextmanager
    def _created_flag(self) -> Iterator[None]:
        self._created = True  # the writer made the file: ours to remove if we fail before `ready`
        yield

    def _capture(self, writer: PcapngWriter, reader: NflogReader, points: Sequence[str]) -> None:
        o = self.opts
        old = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        started: list[Companion] = []
        child = None
        try:
            child = self._fork_reader(writer, reader)
            for comp in self.companions:
                comp.start()
                started.append(comp)
                privdrop.give(comp.path, self._owner)
            where = f" in netns {o.netns}" if o.netns else ""
            what = (f"{self.backend} rules at {len(points)} points" if points
                    else "no rules of ours (--no-rules)")
            who = f"; packets read by pid {child.pid} as {child.target.name}" if child else ""
            self._announced = True
            self._ready(f"ready: capturing NFLOG group {o.group}{where} ({what}) into {o.write}{who}")
            if child is None:
                self._loop(writer, reader)
            else:
                self._adopt(child.wait(self._stop_signal), writer)
        finally:
            if child is not None:
                child.end()
            summaries = {}
            for comp in started:
                try:
                    summaries[comp.name] = comp.stop()
                except Exception as err:  # one failing companion must not cost the capture
                    summaries[comp.name] = {"error": str(err)}
                privdrop.give(comp.path, self._owner)  # again: a rewrite (the key file's) is a new file
            self.companion_summaries = summaries
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _fork_reader(self, writer: PcapngWriter, reader: NflogReader) -> privdrop.Reader | None:
        """With a user to drop to: the read/write loop goes to a child of that user (see
        privdrop.py), forked here before any companion thread exists; this process keeps root
        for the companions and the rules' removal."""
        if self._target is None:
            return None
        try:
            writer.flush()  # the section and interface blocks on disk: the child writes after them
        except OSError as err:
            raise UserError(f"cannot write {self.opts.write}: {err.strerror}") from None
        child = privdrop.Reader(self._target, lambda: self._reader_main(writer, reader))
        writer.hand_off()
        return child

    def _reader_main(self, writer: PcapngWriter, reader: NflogReader) -> dict[str, Any]:
        """The forked reader's whole life: the loop, the file closed, the figures for the parent."""
        try:
            self._loop(writer, reader)
        finally:
            writer.close()
        return {"stats": dataclasses.asdict(self.stats), "stopped_by": self.stopped_by,
                "committed": writer.committed, "packets_committed": writer.packets_committed}

    def _adopt(self, result: dict[str, Any], writer: PcapngWriter) -> None:
        """The reader's figures as if this process had read."""
        self.stats = CaptureStats(**result["stats"])
        self.stopped_by = result["stopped_by"]
        writer.committed, writer.packets_committed = result["committed"], result["packets_committed"]

    def _loop(self, writer: PcapngWriter, reader: NflogReader) -> None:
        o = self.opts
        st = self.stats
        rstats = reader.stats
        counts = st.points
        keep = self._filter
        write = writer.write
        default_point = f"nflog-{o.group}"
        status = None if o.quiet else StatusLine()
        poller = select.poll()
        poller.register(reader.fileno(), select.POLLIN)
        t0 = time.monotonic()
        st.started = time.time()
        deadline = t0 + o.duration if o.duration else None
        last_flush = t0
        limit = o.count
        try:
            drain_until = None
            batch: Sequence[Any]  # a read's records; () once written on the common path
            while True:
                if self._stop is not None:
                    if self._stop == "count":
                        break
                    # Packets logged just before the stop are still in the kernel's batch (flushed
                    # after TIMEOUT_CS): read them too, so "sent before Ctrl-C" means "in the file".
                    now = time.monotonic()
                    if drain_until is None:
                        drain_until = now + DRAIN_S
                    elif now >= drain_until:
                        break
                batch = reader.read_batch()
                if not batch:
                    poller.poll(DRAIN_POLL_MS if drain_until else POLL_MS)
                if keep is None and not limit:  # the common case: every record is written
                    for rec in batch:
                        point = rec.point
                        if not point:
                            rec.point = point = default_point
                        write(rec)
                        counts[point] = counts.get(point, 0) + 1
                    st.written += len(batch)
                    batch = ()
                for rec in batch:
                    if keep is not None and not keep(rec.payload):
                        st.filtered_out += 1
                        continue
                    point = rec.point
                    if not point:
                        rec.point = point = default_point
                    write(rec)
                    counts[point] = counts.get(point, 0) + 1
                    st.written += 1
                    if limit and st.written >= limit:
                        self._stop = "count"
                        break
                now = time.monotonic()
                if deadline is not None and now >= deadline and self._stop is None:
                    self._stop = "duration"
                if now - last_flush >= FLUSH_EVERY:
                    writer.flush()
                    last_flush = now
                if status is not None and status.due(now):
                    status.show(now, counts, st.written, rstats.lost + rstats.enobufs, writer.size)
            writer.flush()
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise UserError(
                    f"cannot write {o.write}: {err.strerror}; capture stopped, rules removed; the "
                    f"file is complete up to the last whole block ({writer.packets_committed} packets)"
                ) from None
            if err.filename is None and err.errno in (errno.EIO, errno.EROFS):
                raise UserError(f"cannot write {o.write}: {err.strerror}; capture stopped, rules "
                                f"removed") from None
            raise
        finally:
            self.stopped_by = self._stop or "error"
            st.elapsed = time.monotonic() - t0
            st.received, st.lost, st.enobufs = rstats.received, rstats.lost, rstats.enobufs
            st.bytes = writer.size
            if status is not None:
                status.clear()

    def summary(self) -> dict[str, Any]:
        o = self.opts
        return {"file": o.write, "group": o.group, "netns": o.netns, "backend": self.backend,
                "linktype": o.linktype, "stopped_by": self.stopped_by, **self.stats.as_dict(),
                "companions": getattr(self, "companion_summaries", {}), **self._parts_summary(),
                "complete": self.stats.lost == 0 and self.stats.enobufs == 0}


    def _parts_summary(self) -> dict[str, Any]:
        return {"parts": self.parts} if self.parts else {}


def companion_line(comp: dict[str, Any]) -> str:
    """One summary line for a companion's own summary (events log, key file, or anything else)."""
    if "error" in comp:
        return f"FAILED: {comp['error']}"
    if "written" in comp:
        active = ", ".join(comp.get("sources", ())) or "none"
        errors = f"; ERRORS: {'; '.join(comp['errors'])}" if comp.get("errors") else ""
        return f"{comp['written']} events in {comp['path']} (sources: {active}){errors}"
    if "sas_written" in comp:
        unkeyed = comp.get("getspi_never_keyed", 0)
        reserved = (f", {unkeyed} reserved SPI{'s' if unkeyed != 1 else ''} (GETSPI) never got keys"
                    if unkeyed else "")
        return (f"{comp['sas_written']} ESP SAs in {comp['path']} ({comp['rekeys_seen']} new during "
                f"the capture, counted when usable, {comp['deletes_seen']} deleted{reserved})")
    return json.dumps(comp, sort_keys=True)


def format_summary(s: dict[str, Any]) -> str:
    where = (f"{len(s['parts'])} parts {s['parts'][0]} .. {s['parts'][-1]}" if s.get("parts")
             else s["file"])
    lines = [f"{s['packets']} packets written to {where} ({human_bytes(s['bytes'])}) in "
             f"{s['duration_s']:.1f} s, stopped by {s['stopped_by']}"]
    for name, n in s["points"].items():
        lines.append(f"  {name:<16} {n}")
    if s["filtered_out"]:
        lines.append(f"  not matching --host/--spi: {s['filtered_out']}")
    if s["complete"]:
        lines.append("no packets lost")
    else:
        lines.append(f"PACKETS LOST: {s['lost']} missing from the NFLOG sequence, {s['enobufs']} times the "
                     f"kernel reported its queue to us full (ENOBUFS): the file is incomplete; use "
                     f"--points, --snaplen or --host/--spi to capture less")
    for name, comp in s["companions"].items():
        lines.append(f"  {name}: {companion_line(comp)}")
    return "\n".join(lines)


def run_start(opts: StartOptions, json_out: bool = False,
              companions: Callable[[Capture], Sequence[Companion]] | None = None) -> int:
    """Run a capture; `companions` builds what runs beside it (it may read the capture's stats)."""
    capture = Capture(opts)
    if companions is not None:
        capture.companions = list(companions(capture))
    summary = capture.run()
    if json_out:
        print(json.dumps(summary, sort_keys=True))
    if not opts.quiet or not summary["complete"]:
        print(format_summary(summary), file=sys.stderr)
    return 0 if summary["complete"] else EXIT_LOST
