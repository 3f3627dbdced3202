"""Loss from NFLOG sequence numbers, counted once a read (NflogReader._check_seq): the same
count as walking every number, for the kernel's increasing numbers with gaps anywhere, across the
wrap-around, and for records without one."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ipsec_capture.capture.nflog import NflogReader, ReaderStats
from ipsec_capture.models import Record


def reader() -> NflogReader:
    r = NflogReader.__new__(NflogReader)  # no socket: only the sequence bookkeeping is exercised
    r.stats = ReaderStats()
    r._next_seq = None
    return r


def walked(reads: list[list[int | None]]) -> int:
    """The plain per-record count: every forward gap between consecutive numbers."""
    lost, expect = 0, None
    for seq in (s for read in reads for s in read):
        if seq is None:
            continue
        if expect is not None and seq != expect:
            gap = (seq - expect) & 0xFFFFFFFF
            lost += gap if gap < 0x80000000 else 0
        expect = (seq + 1) & 0xFFFFFFFF
    return lost


def lost_by_reader(reads: list[list[int | None]]) -> int:
    r = reader()
    for read in reads:
        r._check_seq([Record(0, "p", b"", seq=s) for s in read])
    return r.stats.lost


def test_examples() -> None:
    assert lost_by_reader([[1, 2, 3], [4, 5]]) == 0
    assert lost_by_reader([[1, 2, 3], [7, 8]]) == 3  # gap between reads
    assert lost_by_reader([[1, 2, 5, 6]]) == 2  # gap inside a read
    assert lost_by_reader([[0xFFFFFFFE, 0xFFFFFFFF, 0, 1]]) == 0  # wrap-around
    assert lost_by_reader([[1, None, 2]]) == 0


@given(st.integers(0, 0xFFFFFFFF), st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=20), max_size=8))
def test_same_count_as_walking_every_number(start: int, steps: list[list[int]]) -> None:
    """The kernel numbers an instance's packets in increasing order (mod 2**32); here with gaps
    anywhere, inside reads and between them."""
    reads, seq = [], start
    for read_steps in steps:
        read = []
        for step in read_steps:
            seq = (seq + step) & 0xFFFFFFFF
            read.append(seq)
        reads.append(read)
    assert lost_by_reader(reads) == walked(reads)


@given(st.integers(0, 0xFFFFFFFF), st.lists(st.integers(1, 300), min_size=1, max_size=10),
       st.lists(st.integers(0, 3), min_size=10, max_size=10))
def test_runs_with_gaps(start: int, sizes: list[int], gaps: list[int]) -> None:
    reads, seq = [], start
    for size, gap in zip(sizes, gaps, strict=False):
        reads.append([(seq + i) & 0xFFFFFFFF for i in range(size)])
        seq += size + gap
    assert lost_by_reader(reads) == walked(reads) == sum(gaps[:len(sizes) - 1])
