"""`start -C MB / -G SECONDS / -W COUNT`: a capture as a set of bundle parts, like tcpdump's
rotation, and reading such a set back as one capture.

`-w out.pcapng -C 100` writes out-0000.pcapng, out-0001.pcapng, ... each a whole bundle part: a
pcapng with its own section header and interface blocks, its own events log part (the log header
again, then an SA snapshot so the part alone knows which SA held each SPI) and its own key file
(every SA known so far, mode 0600). -C rotates once a part reaches MB (10^6 bytes, as tcpdump),
-G every SECONDS (checked at every flush, so an idle capture rotates too), both together at
whichever comes first; -W COUNT keeps only the newest COUNT parts, removing the oldest part's
three files (a ring, as tcpdump's -C -W).

A set is recognised by its names (STEM-NNNN.pcapng) and, where the events logs exist, by the
`rotation.set` id in every part's header, so two captures that merely share a stem are not mixed.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipsec_capture.bundle import CAPTURE_SUFFIXES, Bundle
from ipsec_capture.errors import UserError
from ipsec_capture.models import Record

from .pcapng import PcapngWriter

MB = 1_000_000  # tcpdump's -C unit
PART = re.compile(r"^(?P<stem>.+)-(?P<index>\d{4,})(?P<suffix>\.pcapng|\.pcap|\.cap)$")


@dataclass(slots=True)
class Rotation:
    size_mb: float = 0.0
    seconds: float = 0.0
    count: int = 0
    set_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def active(self) -> bool:
        return bool(self.size_mb or self.seconds)

    def validate(self) -> None:
        if self.size_mb < 0 or self.seconds < 0 or self.count < 0:
            raise UserError("-C, -G and -W take 0 (off) or a positive number")
        if self.count and not self.active:
            raise UserError("-W COUNT needs -C MB or -G SECONDS: it bounds the number of rotated parts")
        if self.size_mb and self.size_mb * MB < 65536:
            raise UserError(f"-C {self.size_mb:g}: a part must hold at least 64 KB (-C 0.07)")


def part_path(write: str | os.PathLike[str], index: int) -> str:
    """out.pcapng, 3 -> out-0003.pcapng (the suffix kept, beside the named file)."""
    p = Path(write)
    suffix = p.suffix if p.suffix in CAPTURE_SUFFIXES else ".pcapng"
    stem = p.with_suffix("") if p.suffix in CAPTURE_SUFFIXES else p
    return f"{stem}-{index:04d}{suffix}"


def remove_part(path: str) -> None:
    b = Bundle.for_capture(path)
    for f in (b.capture, b.events, b.keys):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f)


class RotatingWriter:
    """A PcapngWriter in front (write, flush, interface, size, committed) that moves on to the next
    part when -C or -G says so; `on_rotate(index, part_path)` lets the companions follow."""

    def __init__(self, write: str, rotation: Rotation, open_part: Callable[[str], PcapngWriter],
                 on_rotate: list[Callable[[int, str], None]] | None = None) -> None:
        self.rotation = rotation
        self.write_path = write
        self._open_part = open_part
        self.on_rotate = on_rotate if on_rotate is not None else []  # shared: companions join later
        self.limit = int(rotation.size_mb * MB)
        self.index = 0
        self.parts = [part_path(write, 0)]
        self._ifaces: list[tuple[str, str]] = []
        self._done_bytes = 0
        self._done_packets = 0
        self._cur = open_part(self.parts[0])
        self._deadline = time.monotonic() + rotation.seconds if rotation.seconds else None

    def interface(self, name: str, description: str = "", emit: bool = True) -> int:
        self._ifaces.append((name, description))
        return self._cur.interface(name, description, emit)

    def write(self, record: Record, comment: str | None = None) -> None:
        cur = self._cur
        cur.write(record, comment)
        if self.limit and cur.committed + cur._used >= self.limit:
            self.rotate()

    def flush(self) -> None:
        self._cur.flush()
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self.rotate()

    def rotate(self) -> None:
        old = self._cur
        old.close()
        self._done_bytes += old.committed
        self._done_packets += old.packets_committed
        self.index += 1
        path = part_path(self.write_path, self.index)
        self._cur = self._open_part(path)
        for name, description in self._ifaces:
            self._cur.interface(name, description)
        self.parts.append(path)
        if self.rotation.seconds:
            self._deadline = time.monotonic() + self.rotation.seconds
        for hook in self.on_rotate:
            hook(self.index, path)
        if self.rotation.count and len(self.parts) > self.rotation.count:
            for gone in self.parts[:-self.rotation.count]:
                remove_part(gone)
            self.parts = self.parts[-self.rotation.count:]

    @property
    def size(self) -> int:
        return self._done_bytes + self._cur.size

    @property
    def committed(self) -> int:
        return self._done_bytes + self._cur.committed

    @property
    def packets_committed(self) -> int:
        return self._done_packets + self._cur.packets_committed

    def close(self) -> None:
        self._cur.close()

    def __enter__(self) -> RotatingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PartedEventLog:
    """An events log that moves to the next part when told (`rotate`): same header (with
    `rotation.part`), then an SA snapshot, then the events that follow. Thread-safe: the sources
    write from their own threads."""

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any], rotation: Rotation,
                 snapshot: Callable[[], list[Any]]) -> None:
        from ipsec_capture.bpf.eventlog import EventLogWriter

        self._writer_class = EventLogWriter
        self.rotation = rotation
        self._snapshot = snapshot
        self._base = dict(header)
        self._lock = threading.Lock()
        self._done = 0
        self._cur = EventLogWriter(path, self._header(0))
        self.header = self._cur.header
        self.path = self._cur.path

    def _header(self, index: int) -> dict[str, Any]:
        return {**self._base, "rotation": {"set": self.rotation.set_id, "part": index}}

    def write(self, ev: Any) -> None:
        with self._lock:
            self._cur.write(ev)

    def flush(self) -> None:
        with self._lock:
            self._cur.flush()

    @property
    def count(self) -> int:
        return self._done + self._cur.count

    def rotate(self, index: int, path: str | os.PathLike[str]) -> None:
        new = self._writer_class(path, self._header(index))
        try:
            for ev in self._snapshot():
                new.write(ev)
        except Exception:  # a part without its snapshot still holds its events
            pass
        with self._lock:
            old, self._cur = self._cur, new
            self.path = new.path
        self._done += old.count
        old.close()

    def close(self) -> None:
        with self._lock:
            self._cur.close()


# -- reading a set back ----------------------------------------------------------------------------

def _rotation_of(capture: str) -> dict[str, Any] | None:
    ev = Bundle.for_capture(capture).events
    try:
        with open(ev, encoding="utf-8") as f:
            head = json.loads(f.readline() or "{}")
    except (OSError, ValueError):
        return None
    rot = head.get("rotation")
    return rot if isinstance(rot, dict) else None


def expand(args: Iterable[str]) -> list[list[str]]:
    """Command-line captures -> captures, each a list of parts in order.

    A quoted glob is expanded here (`'out-*.pcapng'`); parts of one rotated set (same stem, same
    `rotation.set` where known) become one capture, in part order, wherever they were named.
    Anything else is a capture of its own, in the order given.
    """
    names: list[str] = []
    for a in args:
        if any(ch in a for ch in "*?[") and not os.path.exists(a):
            found = sorted(glob.glob(a))
            if not found:
                raise UserError(f"{a}: no file matches")
            names.extend(found)
        else:
            names.append(a)
    out: list[list[str]] = []
    sets: dict[tuple[str, str, str], list[tuple[int, str]]] = {}
    order: list[tuple[str, str, str] | int] = []
    for name in names:
        m = PART.match(os.path.basename(name))
        rot = _rotation_of(name) if m else None
        if m is None or (rot is None and not _has_siblings(name, m)):
            order.append(len(out))
            out.append([name])
            continue
        key = (os.path.join(os.path.dirname(name), m["stem"]), m["suffix"], str((rot or {}).get("set", "")))
        if key not in sets:
            sets[key] = []
            order.append(key)
        index = int(m["index"])
        if all(i != index for i, _ in sets[key]):
            sets[key].append((index, name))
    result: list[list[str]] = []
    for item in order:
        if isinstance(item, int):
            result.append(out[item])
        else:
            result.append([n for _i, n in sorted(sets[item])])
    return result


def _has_siblings(name: str, m: re.Match[str]) -> bool:
    """A STEM-NNNN name without an events log is taken as a part when other parts sit beside it."""
    stem = glob.escape(m["stem"])
    pattern = os.path.join(os.path.dirname(name), f"{stem}-[0-9][0-9][0-9][0-9]*{m['suffix']}")
    return len(glob.glob(pattern)) > 1


def chain_records(parts: list[str], read: Callable[[str], Iterable[Record]]) -> Iterator[Record]:
    for part in parts:
        yield from read(part)
