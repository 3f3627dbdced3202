"""The events log: `out.events.jsonl` beside `out.pcapng`.

Line 1 is a header object describing where and when the facts were collected (host, kernel,
clocks, which sources were active and why not, the namespace); every further line is one
`Event.to_json()`. JSON lines so a crash loses at most the last, half-written line, and so
`report` can stream a file of any size. Several sources (threads) write into one writer.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import threading
import time
from collections.abc import Iterator
from typing import IO, Any, TypeGuard

from ipsec_capture.errors import UserError
from ipsec_capture.models import EncodedEvent, Event

FORMAT_KEY = "ipsec_capture_events"
FORMAT_VERSION = 1
_SAMPLES = 25
MAX_LINE = 1 << 24  # characters: no event is near this long; a longer line is damage, not data


def _offset(clock: int) -> int:
    """wall - `clock` in ns, from the tightest of several (clock, wall, clock) samples."""
    best_width, best = None, 0
    for _ in range(_SAMPLES):
        before = time.clock_gettime_ns(clock)
        wall = time.time_ns()
        after = time.clock_gettime_ns(clock)
        width = after - before
        if best_width is None or width < best_width:
            best_width, best = width, wall - (before + after) // 2
    return best


STAMP_LATE_KEY = "packet_stamp_late_ns"


def clock_offsets() -> dict[str, int]:
    """Offsets that turn monotonic / boottime stamps (BPF, tracefs) into wall-clock ns.

    wall = mono + wall_minus_mono_ns; wall = boot + wall_minus_boot_ns. Measured now: an NTP step
    later shifts the wall clock but not these, so the header keeps the values used.
    """
    return {
        "wall_minus_mono_ns": _offset(time.CLOCK_MONOTONIC),
        "wall_minus_boot_ns": _offset(time.CLOCK_BOOTTIME),
    }


def make_header(sources: list[dict[str, Any]] | None = None, netns: dict[str, Any] | None = None,
                clock: dict[str, int] | None = None, stamp_late_ns: int = 0) -> dict[str, Any]:
    """A header with the host facts filled in; callers add sources and the namespace.

    `stamp_late_ns`: how late a packet's stamp in the capture beside this log may be. The kernel
    stamps an NFLOG packet only on some hooks; the rest are stamped when their batch is read, up
    to the group's flush timeout after the kernel saw them, which can be after the counter poll
    that counted their drop. The join widens a poll's window by this much."""
    return {
        FORMAT_KEY: FORMAT_VERSION,
        "host": socket.gethostname(),
        "kernel": platform.release(),
        "created_ns": time.time_ns(),
        "clock": clock if clock is not None else clock_offsets(),
        "sources": sources or [],
        "netns": netns or {"name": None, "inode": None},
        STAMP_LATE_KEY: stamp_late_ns,
    }


class EventLogWriter:
    """Appends Events to a JSONL file (mode 0600: SA snapshots may name peers); thread-safe.

    The header is written at open, so a log is readable while it grows. `header` must carry
    FORMAT_KEY (use `make_header`); missing host facts are filled in.
    """

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any]) -> None:
        self.path = os.fspath(path)
        full = make_header()
        full.update(header)
        full[FORMAT_KEY] = FORMAT_VERSION
        self.header = full
        self.count = 0
        self._lock = threading.Lock()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # an existing file keeps its old mode otherwise
        except OSError as err:
            raise UserError(f"cannot write events log {self.path}: {err.strerror}") from err
        self._file: IO[str] | None = os.fdopen(fd, "w", encoding="utf-8", buffering=1 << 16)
        self._file.write(json.dumps(full, separators=(",", ":"), sort_keys=True) + "\n")
        self._file.flush()

    def write(self, event: Event | EncodedEvent) -> None:
        line = event.to_json() + "\n"
        with self._lock:
            if self._file is None:
                raise ValueError("events log is closed")
            self._file.write(line)
            self.count += 1

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                finally:
                    self._file = None

    def __enter__(self) -> EventLogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_header(line: str, path: str) -> dict[str, Any]:
    try:
        header = json.loads(line)
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict) or FORMAT_KEY not in header:
        raise UserError(f"{path}:1: not an ipsec-capture events log (no header line)")
    if header[FORMAT_KEY] != FORMAT_VERSION:
        raise UserError(f"{path}:1: events log version {str(header[FORMAT_KEY])[:20]} is not supported "
                        f"(this ipsec-capture reads version {FORMAT_VERSION}): upgrade ipsec-capture")
    problem = _header_problem(header)
    if problem:
        raise UserError(f"{path}:1: bad header line ({problem}): the events log is damaged")
    return header


def _header_problem(h: dict[str, Any]) -> str | None:
    """What in a header is not as make_header writes it (the reports read these fields)."""
    for name in ("host", "kernel"):
        if h.get(name) is not None and not isinstance(h[name], str):
            return f"{name} is not a string"
    sources = h.get("sources", [])
    if not isinstance(sources, list) or not all(
            isinstance(x, dict) and isinstance(x.get("name", ""), str) for x in sources):
        return "sources is not a list of objects with a name"
    clock = h.get("clock", {})
    if not isinstance(clock, dict) or not all(_is_int(v) and abs(v) <= _MAX_U64 for v in clock.values()):
        return "clock is not an object of nanosecond offsets"
    late = h.get(STAMP_LATE_KEY, 0)
    if not _is_int(late) or not 0 <= late <= _MAX_U64:
        return f"{STAMP_LATE_KEY} is not a count of nanoseconds"
    if h.get("netns") is not None and not isinstance(h["netns"], dict):
        return "netns is not an object"
    return None


_INT_FIELDS = ("netns", "spi", "seq", "ret")
_MAX_U64 = (1 << 64) - 1
# detail entries the join reads by name, and what they must be (the rest is shown as it is)
_DETAIL_TYPES: dict[str, tuple[type, ...]] = {
    "skb": (int, str), "skbaddr": (int, str), "delta": (int,), "value": (int,), "sa": (dict,),
    "policy": (dict,), "location": (str,), "hard": (bool, int),
}


def _is_int(v: Any) -> TypeGuard[int]:
    return type(v) is int  # bool is an int subclass: true/false is not a number here


def checked_event(d: Any) -> Event:
    """An Event from one parsed line, or ValueError naming the field that is not what the writer
    writes: readers past this point (the join, the reports) may trust the types and ranges."""
    if not isinstance(d, dict):
        raise ValueError("not an object")
    t = d.get("time_ns")
    if not _is_int(t) or not 0 <= t <= _MAX_U64:
        raise ValueError(f"time_ns {t!r} is not a time in nanoseconds")
    for name in ("source", "kind"):
        if not isinstance(d.get(name), str):
            raise ValueError(f"{name} {d.get(name)!r} is not a string")
    for name in _INT_FIELDS:
        v = d.get(name)
        if v is not None and not (_is_int(v) and -_MAX_U64 <= v <= _MAX_U64):
            raise ValueError(f"{name} {v!r} is not a number")
    if d.get("spi") is not None and not 0 <= d["spi"] <= 0xFFFFFFFF:
        raise ValueError(f"spi {d['spi']} is not 32 bits")
    if d.get("reason") is not None and not isinstance(d["reason"], str):
        raise ValueError(f"reason {d['reason']!r} is not a string")
    for name in ("tuple", "inner"):
        v = d.get(name)
        if v is not None and not (isinstance(v, dict) and all(
                x is None or isinstance(x, str) or _is_int(x) for x in v.values())):
            raise ValueError(f"{name} {v!r} is not an object of addresses and numbers")
    detail = d.get("detail", {})
    if not isinstance(detail, dict):
        raise ValueError(f"detail {detail!r} is not an object")
    for name, types in _DETAIL_TYPES.items():
        v = detail.get(name)
        if v is not None and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
            raise ValueError(f"detail.{name} {v!r} is not a {' or '.join(t.__name__ for t in types)}")
    return Event.from_dict(d)


def _short(err: Exception) -> str:
    """An error's text on one short line (it may quote a damaged value of any length)."""
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:200] + "..."


def _events(f: IO[str], path: str) -> Iterator[Event]:
    lineno = 1
    try:
        while line := f.readline(MAX_LINE):
            lineno += 1
            if not line.strip():
                continue
            complete = line.endswith("\n")
            if not complete and len(line) == MAX_LINE:
                raise UserError(f"{path}:{lineno}: line longer than {MAX_LINE >> 20} MiB: the events log "
                                "is damaged")
            try:
                event = checked_event(json.loads(line))
            except (ValueError, TypeError, RecursionError) as err:
                if not complete:  # the writer died mid-line: the file ends here, that is fine
                    return
                raise UserError(f"{path}:{lineno}: bad event line ({_short(err)}): the events log is "
                                "damaged") from None
            yield event
    finally:
        f.close()


def read_events(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Iterator[Event]]:
    """(header, lazy iterator of Events). UserError names the file and line of a bad line;
    a truncated last line (writer killed) is skipped silently."""
    p = os.fspath(path)
    try:
        # undecodable bytes become U+FFFD, so they fail as a bad line with its number
        f = open(p, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by the iterator
    except OSError as err:
        raise UserError(f"cannot read events log {p}: {err.strerror}") from err
    try:
        header = _parse_header(f.readline(MAX_LINE), p)
    except UserError:
        f.close()
        raise
    return header, _events(f, p)
