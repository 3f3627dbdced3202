"""The events log round trip: header, events, damaged files (no root needed)."""

from __future__ import annotations

import json
import os
import stat
import threading
import time

import pytest

from ipsec_capture.bpf.eventlog import (
    FORMAT_KEY,
    STAMP_LATE_KEY,
    EventLogWriter,
    clock_offsets,
    make_header,
    read_events,
)
from ipsec_capture.errors import UserError
from ipsec_capture.models import Event


def _events(n: int) -> list[Event]:
    return [Event(time_ns=1_700_000_000_000_000_000 + i, source="xfrm_stat", kind="counter", netns=4026531840,
                  reason="XfrmInNoStates", detail={"delta": i + 1, "value": 10 + i}) for i in range(n)]


def test_round_trip_header_and_events(tmp_path):
    path = tmp_path / "out.events.jsonl"
    sources = [{"name": "xfrm_stat", "active": True, "why": "proc"}]
    with EventLogWriter(path, make_header(sources=sources, netns={"name": "x", "inode": 5})) as w:
        for ev in _events(3):
            w.write(ev)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    header, events = read_events(path)
    assert header[FORMAT_KEY] == 1
    assert header["kernel"] == os.uname().release
    assert header["sources"] == sources
    assert header["netns"] == {"name": "x", "inode": 5}
    assert set(header["clock"]) == {"wall_minus_mono_ns", "wall_minus_boot_ns"}
    assert header[STAMP_LATE_KEY] == 0
    assert list(events) == _events(3)


@pytest.mark.parametrize("late", [-1, "10", 1.5, True])
def test_a_bad_stamp_lateness_is_refused(tmp_path, late):
    """The join widens counter windows by the header's stamp lateness: only a count of ns."""
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({**make_header(), STAMP_LATE_KEY: late}) + "\n")
    with pytest.raises(UserError, match=STAMP_LATE_KEY):
        read_events(path)


def test_existing_file_becomes_0600(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("old")
    os.chmod(path, 0o644)
    EventLogWriter(path, make_header()).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_truncated_last_line_is_tolerated(tmp_path):
    path = tmp_path / "e.jsonl"
    with EventLogWriter(path, make_header()) as w:
        for ev in _events(2):
            w.write(ev)
    with open(path, "a") as f:
        f.write('{"time_ns": 12, "sour')  # writer killed mid-line
    _, events = read_events(path)
    assert len(list(events)) == 2


def test_bad_line_names_its_number(tmp_path):
    path = tmp_path / "e.jsonl"
    with EventLogWriter(path, make_header()) as w:
        for ev in _events(2):
            w.write(ev)
    with open(path, "a") as f:
        f.write("garbage\n" + _events(1)[0].to_json() + "\n")
    _, events = read_events(path)
    with pytest.raises(UserError, match=r"e\.jsonl:4:"):
        list(events)


@pytest.mark.parametrize("content", [b"", b"hello\n", b'{"x": 1}\n', b"\xff\xfe\x00\n"])
def test_not_an_events_log(tmp_path, content):
    path = tmp_path / "e.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"e\.jsonl:1: not an ipsec-capture events log"):
        read_events(path)


def test_newer_version_is_refused(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({FORMAT_KEY: 99}) + "\n")
    with pytest.raises(UserError, match="version 99"):
        read_events(path)


def test_missing_file_and_unwritable_path(tmp_path):
    with pytest.raises(UserError, match="cannot read events log"):
        read_events(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="cannot write events log"):
        EventLogWriter(tmp_path / "no" / "dir.jsonl", make_header())


def test_concurrent_writers_lose_no_line(tmp_path):
    path = tmp_path / "e.jsonl"
    w = EventLogWriter(path, make_header())
    per_thread = 2000

    def pump(tag: int) -> None:
        for i in range(per_thread):
            w.write(Event(time_ns=i, source=f"s{tag}", kind="k", seq=i))

    threads = [threading.Thread(target=pump, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    _, events = read_events(path)
    seen = [(e.source, e.seq) for e in events]
    assert len(seen) == 4 * per_thread
    assert len(set(seen)) == 4 * per_thread


def test_clock_offsets_convert_monotonic_to_wall():
    off = clock_offsets()
    mono = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    wall = time.time_ns()
    # a few ms of scheduling noise on a busy 2-core machine, never seconds
    assert abs(mono + off["wall_minus_mono_ns"] - wall) < 50_000_000
    assert abs(boot + off["wall_minus_boot_ns"] - wall) < 50_000_000
    # boottime also counts suspend; each offset is sampled on its own, so allow sampling noise
    # (seen: the two differing by 6 ns the "wrong" way on a loaded machine)
    assert off["wall_minus_boot_ns"] <= off["wall_minus_mono_ns"] + 1_000_000
