"""The live loop (Capture._loop) writes the same pcapng bytes whether it takes its fast branch
(no --host/--spi filter, no --count) or the per-record one, for kernel-shaped NFLOG batches of
several points, devices and a message without a prefix; and counts what it wrote per point."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ipsec_capture.capture import nflog, start
from ipsec_capture.capture.nflog_tlv import BodyParser, build_body
from ipsec_capture.capture.pcapng import PcapngWriter
from ipsec_capture.models import Record

POINTS = ("raw-pre-esp", "raw-out-ike", "filter-in", "")


class CannedSocket:
    """recv() hands out the batches, then says "nothing queued" (BlockingIOError) for ever."""

    def __init__(self, batches: list[bytes]) -> None:
        self.batches = list(batches)

    def recv(self, size: int) -> bytes:
        if not self.batches:
            raise BlockingIOError
        return self.batches.pop(0)


def batches(packets: list[tuple[int, int, int]], per: int) -> list[bytes]:
    """Kernel-shaped batches of NFLOG messages (nlmsghdr + body), `per` messages each."""
    msgs = []
    for seq, (point, dev, size) in enumerate(packets):
        rec = Record(1_700_000_000_000_000_000 + seq * 1000, POINTS[point],
                     b"\x45" + bytes(19) + bytes([seq & 0xFF]) * size, 2, hook=0, indev=dev,
                     uid=0, gid=0, seq=seq, seq_global=seq)
        body = build_body(rec, 7)
        msg = struct.pack("=IHHII", 16 + len(body), nflog.MSG_PACKET, 0, 0, 0) + body
        msgs.append(msg + b"\0" * (-len(msg) % 4))
    return [b"".join(msgs[i:i + per]) for i in range(0, len(msgs), per)]


def run_loop(tmp: Path, name: str, data: list[bytes], count: int) -> tuple[bytes, dict[str, int]]:
    reader = nflog.NflogReader.__new__(nflog.NflogReader)  # the real read_batch on a canned socket
    reader.stats, reader._next_seq, reader._parse, reader.netns_inode = nflog.ReaderStats(), None, \
        BodyParser().parse, 1
    reader._sock = CannedSocket(data)
    rfd, wfd = os.pipe()
    os.write(wfd, b"x")  # always readable: poll never waits
    reader.fileno = lambda: rfd  # type: ignore[method-assign]
    cap = start.Capture(start.StartOptions(group=7, write=str(tmp / name), quiet=True, rules=False,
                                           count=count))
    read = reader.read_batch

    def read_then_stop(*args: int) -> list:
        got = read(*args)
        if not got and not reader._sock.batches:
            cap._stop = "count"
        return got

    reader.read_batch = read_then_stop  # type: ignore[method-assign]
    path = tmp / name
    try:
        with PcapngWriter(path, ifname=lambda i: f"if{i}") as w:
            cap._loop(w, reader)
    finally:
        os.close(rfd)
        os.close(wfd)
    return path.read_bytes(), dict(cap.stats.points)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(POINTS) - 1), st.integers(1, 3), st.integers(0, 80)),
                min_size=1, max_size=120), st.integers(1, 70))
def test_fast_branch_writes_the_same_bytes(tmp_path_factory, packets, per) -> None:
    tmp = tmp_path_factory.mktemp("loop")
    data = batches(packets, per)
    fast, fast_points = run_loop(tmp, "fast.pcapng", data, count=0)
    slow, slow_points = run_loop(tmp, "slow.pcapng", data, count=10 ** 9)  # --count: the other branch
    assert fast == slow
    assert fast_points == slow_points
    assert sum(fast_points.values()) == len(packets)
    assert fast_points.get("nflog-7", 0) == sum(1 for p, _, _ in packets if POINTS[p] == "")
