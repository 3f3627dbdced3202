"""Hypothesis: pcap and pcapng from anyone, malformed at random, for every link type we read.

Properties: the reader raises nothing but UserError (one line for the user), never hangs, never
allocates what a length field claims; whatever it accepts, both our writers (NFLOG and raw IP)
write, and the file they write reads back to the same packets. Bounded: fixed max_examples,
derandomized, so the suite stays fast and the same on every run.
"""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipsec_capture.capture import pcapread
from ipsec_capture.capture.pcapng import PcapngWriter
from ipsec_capture.capture.pcapread import Share, read_records
from ipsec_capture.decrypt.decoder import EspDecoder
from ipsec_capture.decrypt.pipeline import DecryptSummary, decrypt_to_writer
from ipsec_capture.errors import UserError
from ipsec_capture.models import Record
from tests.support.fuzzing import (
    FUZZ,
    LINKTYPES,
    mutate,
    mutations,
    nflog_body,
    pcap_file,
    pcapng_file,
    seed_frames,
)
from tests.support.synthetic import gcm_sa

# the seeds' SPI with the key they were sealed with: mutated ESP goes deep into the decoder
_DECODER = EspDecoder([gcm_sa(0xC0FFEE01, "192.0.2.1", "192.0.2.2", bytes(range(20)))])


def read_all(path: Path) -> list[Record] | UserError:
    """Every record, or the one UserError the reader gave: any other exception fails the test."""
    warnings: list[str] = []
    try:
        return list(read_records(str(path), warnings.append))
    except UserError as err:
        assert str(err) and "\n" not in str(err), repr(err)
        return err


def write_back(records: list[Record], tmp: Path) -> None:
    """What the reader accepted, through both writers, and read again: same count, same bytes."""
    for linktype in ("nflog", "raw"):
        out = tmp / f"back-{linktype}.pcapng"
        with PcapngWriter(out, linktype=linktype, ifname=lambda i: f"if{i}") as w:
            for rec in records:
                w.write(rec, comment=rec.comment)
        again = read_all(out)
        assert not isinstance(again, UserError), f"our own {linktype} file: {again}"
        assert len(again) == len(records)
        assert [bytes(r.payload) for r in again] == [bytes(r.payload)[:w.snaplen] for r in records]


def other_readings(path: Path, records: list[Record]) -> None:
    """decrypt's ways of reading the same file: borrowed records, and -j shares (their union is
    the whole file); then the decrypting writer over what was read."""
    want = [bytes(r.payload) for r in records]
    assert [bytes(r.payload) for r in read_records(str(path), lambda m: None, borrow=True)] == want
    jobs, block = 3, 2
    parts: dict[int, bytes] = {}
    for k in range(jobs):
        share = Share(k, jobs, block)
        got = [bytes(r.payload) for r in read_records(str(path), lambda m: None, share=share)]
        if not share.skips:
            got = [p for i, p in enumerate(got) if i // block % jobs == k]
        starts = [i for i in range(len(want)) if i // block % jobs == k]
        assert got == [want[i] for i in starts]
        parts.update(zip(starts, got, strict=True))
    assert [parts[i] for i in range(len(want))] == want
    summary = DecryptSummary()
    with PcapngWriter(path.with_suffix(".dec"), linktype="raw") as w:
        decrypt_to_writer(iter(records), _DECODER, summary, w)
    assert summary.packets == len(records)


def check(data: bytes, tmp: Path) -> None:
    path = tmp / "in.cap"
    path.write_bytes(data)
    got = read_all(path)
    if not isinstance(got, UserError):
        other_readings(path, got)
        write_back(got, tmp)


@pytest.mark.parametrize("linktype", sorted(LINKTYPES))
def test_seeds_read_whole(tmp_path: Path, linktype: int) -> None:
    """The seeds the mutations start from are read in full, so the mutations begin deep inside."""
    frames = seed_frames(linktype)
    for data, extra in ((pcap_file(linktype, frames), 0),
                        (pcap_file(linktype, frames, order=">", nsec=True), 0),
                        (pcapng_file(linktype, frames), 1), (pcapng_file(linktype, frames, order=">"), 1)):
        path = tmp_path / "seed.cap"
        path.write_bytes(data)
        got = read_all(path)
        assert not isinstance(got, UserError), got
        assert len(got) == len(frames) + extra  # pcapng: the simple packet block repeats frame 0
        write_back(got, tmp_path)


@FUZZ
@given(st.sampled_from(sorted(LINKTYPES)), st.booleans(), st.sampled_from("<>"), st.data())
def test_mutated_files(tmp_path: Path, linktype: int, ng: bool, order: str, data: st.DataObject) -> None:
    frames = seed_frames(linktype)
    seed = pcapng_file(linktype, frames, order=order) if ng else pcap_file(linktype, frames, order=order)
    check(mutate(seed, data.draw(mutations(len(seed)))), tmp_path)


@FUZZ
@given(st.sampled_from(sorted(LINKTYPES)), st.booleans(),
       st.lists(st.binary(max_size=80), max_size=6))
def test_arbitrary_frames(tmp_path: Path, linktype: int, ng: bool, frames: list[bytes]) -> None:
    """Well-formed files around frames of any bytes: the link layer parsers and NFLOG TLVs."""
    check(pcapng_file(linktype, frames) if ng else pcap_file(linktype, frames), tmp_path)


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes(tmp_path: Path, raw: bytes) -> None:
    for head in (b"", struct.pack("<I", 0x0A0D0D0A), struct.pack("<I", 0xA1B2C3D4)):
        check(head + raw, tmp_path)


@FUZZ
@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
       st.integers(0, 255), st.integers(-(1 << 63), (1 << 63) - 1), st.booleans())
def test_extreme_stamps_and_lengths(tmp_path: Path, hi: int, lo: int, orig: int, tsresol: int,
                                    tsoffset: int, nflog: bool) -> None:
    """Stamps and original lengths anywhere in their fields' range: the writers must still write
    them (they once raised struct.error on a stamp or length the reader accepted)."""
    linktype = 239 if nflog else 101
    frame = nflog_body(b"\x45" + bytes(27)) if nflog else b"\x45" + bytes(27)
    data = pcapng_file(linktype, [frame], stamps=[(hi, lo)], origs=[orig], tsresol=tsresol,
                       tsoffset=tsoffset)
    check(data, tmp_path)
    check(pcap_file(linktype, [frame], stamps=[(hi, lo)], origs=[orig]), tmp_path)


@pytest.mark.parametrize("ng", [False, True])
@pytest.mark.parametrize("claim", [0xFFFFFFFC, 0x3FFFFFC, 0x100000])
def test_absurd_length_allocates_little(tmp_path: Path, ng: bool, claim: int) -> None:
    """A record or block that claims up to 4 GiB in a file of a few bytes: read with memory in
    proportion to the file, not to the claim (and a clear line or a cut-short warning)."""
    frames = seed_frames(101)
    if ng:
        data = bytearray(pcapng_file(101, frames))
        at = data.rindex(struct.pack("<I", 6))  # the last packet block's type
        data[at + 4:at + 8] = struct.pack("<I", claim)
    else:
        data = bytearray(pcap_file(101, frames))
        data[24 + 8:24 + 12] = struct.pack("<I", claim)  # the first record's captured length
    path = tmp_path / "claim.cap"
    path.write_bytes(bytes(data))
    warnings: list[str] = []
    tracemalloc.start()
    try:
        try:
            list(read_records(str(path), warnings.append))
        except UserError as err:
            assert "length" in str(err)
        else:
            assert warnings and "cut short" in warnings[-1]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * pcapread.CHUNK + 64 * len(data), f"peak {peak} bytes for a {len(data)}-byte file"


def test_unsupported_link_type_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "bt.pcap"
    path.write_bytes(pcap_file(201, [b"\x01\x02\x03"]))  # LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR
    err = read_all(path)
    assert isinstance(err, UserError)
    assert str(err).startswith(f"{path}: link type 201 ") and "NFLOG" in str(err)
