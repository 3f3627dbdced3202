"""Open one capture's bundle for the report: the packets, the events log and the keys beside it
(ipsec_capture.bundle.Bundle names them), each optional except the packets, with what is missing
said in words so the report can tell the user what it could not do.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipsec_capture.bundle import Bundle
from ipsec_capture.errors import UserError
from ipsec_capture.models import Event, Record


@dataclass(slots=True)
class Inputs:
    """What one analysis reads. `records()` and `events()` open a fresh stream each call, so the
    notebook API can iterate a bundle more than once without holding it in memory."""

    name: str
    records: Callable[[], Iterable[Record]]
    events: Callable[[], Iterable[Event]]
    header: dict[str, Any] = field(default_factory=dict)
    sas: list[Any] = field(default_factory=list)
    capture_path: str | None = None
    events_path: str | None = None
    keys_path: str | None = None
    missing: list[str] = field(default_factory=list)


def _read_records(path: str) -> Iterator[Record]:
    try:
        from ipsec_capture.capture.pcapread import read_records
    except ModuleNotFoundError as err:
        raise UserError("this build has no capture reader (ipsec_capture.capture.pcapread): "
                        "update ipsec-capture") from err
    return read_records(path)


def open_bundle(capture: str | os.PathLike[str], events: str | os.PathLike[str] | None = None,
                keys: str | os.PathLike[str] | None = None) -> Inputs:
    """The capture plus its companions; explicit `events`/`keys` paths must exist, the default
    ones beside the capture may be absent (the report then says what it could not tell)."""
    from ipsec_capture.bpf.eventlog import read_events

    cap = Path(capture)
    if not cap.is_file():
        raise UserError(f"capture {cap} not found (give the .pcapng written by `ipsec-capture start`)")
    b = Bundle.for_capture(cap)
    ev_path = Path(events) if events is not None else b.events
    key_path = Path(keys) if keys is not None else b.keys
    missing: list[str] = []
    for given, path, what in ((events, ev_path, "events log"), (keys, key_path, "key file")):
        if given is not None and not path.is_file():
            raise UserError(f"{what} {path} not found")
    header: dict[str, Any] = {}
    events_path: str | None = None  # what Inputs names: the log when there is one
    if ev_path.is_file():
        events_path = os.fspath(ev_path)
        header, it = read_events(ev_path)
        close = getattr(it, "close", None)
        if close is not None:
            close()

        def event_stream() -> Iterable[Event]:
            return read_events(ev_path)[1]
    else:
        missing.append(f"no events log ({ev_path.name}): kernel verdicts come only from cleartext matches")

        def event_stream() -> Iterable[Event]:
            return iter(())
    sas: list[Any] = []
    keys_path: str | None = None
    if key_path.is_file():
        keys_path = os.fspath(key_path)
        from ipsec_capture.xfrm.keyfile import load_sas

        sas = load_sas(key_path)
        if not sas:  # `start` on a host where no SA existed writes a table of comments only
            missing.append(f"{key_path.name} holds no SAs (no keys were known during the capture): "
                           "cleartext is matched by addresses, IP ID and time")
    else:
        missing.append(f"no key file ({key_path.name}): cleartext is matched by addresses, IP ID and time")
    cap_path = os.fspath(cap)
    return Inputs(name=cap.name, records=lambda: _read_records(cap_path), events=event_stream, header=header,
                  sas=sas, capture_path=cap_path, events_path=events_path, keys_path=keys_path,
                  missing=missing)


def open_parts(parts: list[str], events: str | os.PathLike[str] | None = None,
               keys: str | os.PathLike[str] | None = None) -> Inputs:
    """A rotated capture (capture/rotate.py: STEM-0000.pcapng, -0001, ...) as one Inputs: the
    parts' packets and events one after the other, the union of their keys. One part is
    `open_bundle`; explicit `events`/`keys` replace the parts' own, as there."""
    if len(parts) == 1:
        return open_bundle(parts[0], events, keys)
    opened = [open_bundle(p, events if i == 0 else None, keys if i == 0 else None)
              for i, p in enumerate(parts)]
    first = opened[0]
    sas: dict[Any, Any] = {}
    for inp in opened:
        for sa in inp.sas:
            sas.setdefault(getattr(sa, "key_id", id(sa)), sa)
    missing = list(dict.fromkeys(m for inp in opened for m in inp.missing))

    def records() -> Iterator[Record]:
        for inp in opened:
            yield from inp.records()

    def event_stream() -> Iterator[Event]:
        for inp in opened if events is None else opened[:1]:
            yield from inp.events()

    return Inputs(name=f"{first.name} (+{len(parts) - 1} rotated parts)", records=records,
                  events=event_stream, header=first.header, sas=list(sas.values()),
                  capture_path=first.capture_path, events_path=first.events_path,
                  keys_path=first.keys_path, missing=missing)
