"""The NFLOG body (TLV) parser and builder, and the --host/--spi filters: round trips against
hand-packed kernel layouts, malformed and truncated bodies, and a fuzz that only UserError escapes."""

from __future__ import annotations

import contextlib
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP

from ipsec_capture.capture.filters import build_filter, esp_spi
from ipsec_capture.capture.nflog_tlv import (
    NFULA_PAYLOAD,
    NFULA_PREFIX,
    NFULA_SEQ,
    TLV_BE,
    BodyParser,
    build_body,
    detect_tlv_order,
    parse_body,
)
from ipsec_capture.errors import UserError
from ipsec_capture.models import Record

ESP4 = bytes(IP(src="192.0.2.1", dst="192.0.2.2") / ESP(spi=0xC0FFEE01, seq=7) / (b"\x11" * 24))
NATT6 = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=4500, dport=4500)
              / struct.pack("!II", 0xAB, 3) / (b"\x22" * 16))
IKE4 = bytes(IP(src="192.0.2.2", dst="192.0.2.1") / UDP(sport=4500, dport=4500) / (b"\0" * 4 + b"ike!" * 8))


def kernel_body(prefix: bytes, payload: bytes, hook: int = 0, seq: int = 1) -> bytes:
    """Hand-packed like __build_packet_message: nfgenmsg, PACKET_HDR, PREFIX, INDEV, TIMESTAMP, SEQ,
    PAYLOAD; TLV headers in host order, values big endian, each padded to 4."""
    def tlv(t: int, v: bytes) -> bytes:
        return struct.pack("=HH", 4 + len(v), t) + v + b"\0" * (-len(v) % 4)
    return (struct.pack("!BBH", socket.AF_INET, 0, 5) + tlv(1, struct.pack("!HBB", 0x0800, hook, 0))
            + tlv(10, prefix + b"\0") + tlv(4, struct.pack("!I", 3))
            + tlv(3, struct.pack("!QQ", 1700000000, 250))
            + tlv(12, struct.pack("!I", seq)) + tlv(9, payload))


def test_parse_kernel_layout() -> None:
    rec = parse_body(kernel_body(b"raw-pre-esp", ESP4, hook=0, seq=41), recv_ns=99)
    assert (rec.point, rec.hook, rec.indev, rec.outdev, rec.seq, rec.family) == (
        "raw-pre-esp", 0, 3, None, 41, socket.AF_INET)
    assert rec.time_ns == 1700000000 * 10**9 + 250 * 1000
    assert bytes(rec.payload) == ESP4


def test_receive_time_without_timestamp() -> None:
    body = build_body(Record(0, "raw-out-esp", ESP4, hook=3, outdev=2))
    assert parse_body(body, recv_ns=12345).time_ns == 12345


def test_build_parse_round_trip() -> None:
    rec = Record(1_700_000_000_123_456_000, "filter-in", NATT6, hook=1, indev=2, outdev=None, mark=0x10,
                 uid=0, gid=0, seq=9, seq_global=77)
    back = parse_body(build_body(rec))
    for f in ("time_ns", "point", "hook", "indev", "mark", "uid", "gid", "seq", "seq_global"):
        assert getattr(back, f) == getattr(rec, f), f
    assert bytes(back.payload) == NATT6 and back.family == socket.AF_INET6


def big_endian(le: bytes) -> bytes:
    """A body as a big-endian host logs it: TLV headers swapped, values as they were."""
    be = bytearray(le[:4])
    off = 4
    while off < len(le):
        tlen, ttype = struct.unpack_from("<HH", le, off)
        be += struct.pack(">HH", tlen, ttype) + le[off + 4: off + tlen] + b"\0" * (-tlen % 4)
        off += (tlen + 3) & ~3
    return bytes(be)


def test_big_endian_tlv_headers_are_detected() -> None:
    be = big_endian(kernel_body(b"x", ESP4))
    assert detect_tlv_order(be) is TLV_BE
    assert bytes(parse_body(be, tlv=TLV_BE).payload) == ESP4


@pytest.mark.parametrize("cut", [1, 3, 5, 9, 17])
def test_truncated_body_is_a_user_error(cut: int) -> None:
    body = kernel_body(b"raw-pre-esp", ESP4)
    with pytest.raises(UserError, match=r"bad length|too short"):
        parse_body(body[: len(body) - cut] if cut > 4 else body[:cut])


def test_zero_length_tlv_is_a_user_error() -> None:
    with pytest.raises(UserError, match="offset 4"):
        parse_body(struct.pack("!BBH", 2, 0, 5) + struct.pack("=HH", 0, NFULA_PAYLOAD))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(UserError):
        parse_body(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 200), st.integers(0, 255))
def test_fuzz_mutated_kernel_body(pos: int, value: int) -> None:
    body = bytearray(kernel_body(b"raw-pre-esp", ESP4))
    body[pos % len(body)] = value
    with contextlib.suppress(UserError):
        parse_body(bytes(body))


def fields(rec: Record) -> tuple:
    return (rec.time_ns, rec.point, bytes(rec.payload), rec.family, rec.length, rec.hook, rec.indev,
            rec.outdev, rec.mark, rec.uid, rec.gid, rec.seq, rec.seq_global, rec.netns,
            None if rec.nflog is None else bytes(rec.nflog), rec.comment)


def parsed_both_ways(parser: BodyParser, body: bytes, recv_ns: int = 7,
                     tlv: struct.Struct | None = None) -> tuple:
    """The same body through parse_body and through `parser`: the same Record or the same error."""
    try:
        want = fields(parse_body(body, recv_ns, *(tlv,) if tlv else ()))
    except UserError as err:
        with pytest.raises(UserError) as got:
            parser.parse(memoryview(body), recv_ns)
        assert str(got.value) == str(err)
        return ()
    got = fields(parser.parse(memoryview(body), recv_ns))
    assert got == want
    return got


OPTIONAL = st.one_of(st.none(), st.integers(0, 0xFFFFFFFF))
RECORDS = st.builds(
    Record, time_ns=st.one_of(st.just(0), st.integers(1, 2**62)), point=st.sampled_from(
        ["raw-pre-esp", "raw-out-ike", "filter-in", "mangle-post-out", ""]),
    payload=st.sampled_from([ESP4, NATT6, IKE4, b""]), hook=st.one_of(st.none(), st.integers(0, 4)),
    indev=OPTIONAL, outdev=OPTIONAL, mark=OPTIONAL, uid=OPTIONAL, gid=OPTIONAL, seq=OPTIONAL,
    seq_global=OPTIONAL)


@settings(max_examples=200, deadline=None)
@given(st.lists(RECORDS, min_size=1, max_size=30))
def test_learned_shapes_parse_as_the_walk_does(records: list[Record]) -> None:
    """A stream of bodies (shapes repeating, values changing) through one BodyParser: every
    Record is the one parse_body gives, whether its shape was learned or not."""
    parser = BodyParser()
    for rec in records + records[::-1]:
        parsed_both_ways(parser, build_body(rec))


def test_a_learned_shape_skips_the_walk_and_keeps_every_field() -> None:
    parser = BodyParser()
    first = parsed_both_ways(parser, kernel_body(b"raw-pre-esp", ESP4, hook=0, seq=1))
    assert len(parser._layouts) == 1
    again = parsed_both_ways(parser, kernel_body(b"raw-pre-esp", NATT6, hook=0, seq=2))
    other = parsed_both_ways(parser, kernel_body(b"raw-pre-ike", IKE4, hook=0, seq=3))
    assert len(parser._layouts) == 2  # same TLVs, another prefix: another shape
    assert (first[1], first[11], again[2], again[11], other[1]) == ("raw-pre-esp", 1, NATT6, 2, "raw-pre-ike")
    assert first[0] == 1700000000 * 10**9 + 250 * 1000  # the kernel's timestamp, not the receive time


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 200), st.integers(0, 255), st.integers(0, 40))
def test_fuzz_mutated_or_cut_body_after_learning(pos: int, value: int, cut: int) -> None:
    """After its shape is learned, a corrupted or cut body gives what parse_body gives."""
    parser = BodyParser()
    good = kernel_body(b"raw-pre-esp", ESP4)
    parsed_both_ways(parser, good)
    body = bytearray(good)
    body[pos % len(body)] = value
    parsed_both_ways(parser, bytes(body[:len(body) - cut]))
    parsed_both_ways(parser, good)


def test_big_endian_headers_learned_too() -> None:
    parser = BodyParser(TLV_BE)
    be = big_endian(kernel_body(b"x", ESP4))
    for _ in range(2):
        assert parsed_both_ways(parser, be, tlv=TLV_BE)[2] == ESP4
    assert len(parser._layouts) == 1


def test_prefix_and_seq_attrs_with_netlink_flag_bits() -> None:
    """NLA_F_NET_BYTEORDER / NLA_F_NESTED bits on a type must not hide the attribute."""
    body = (struct.pack("!BBH", 2, 0, 5) + struct.pack("=HH", 8, NFULA_PREFIX | 0x4000) + b"abc\0"
            + struct.pack("=HH", 8, NFULA_SEQ | 0x4000) + struct.pack("!I", 5))
    rec = parse_body(body)
    assert (rec.point, rec.seq) == ("abc", 5)


def test_esp_spi_plain_natt_and_ike() -> None:
    assert esp_spi(ESP4) == 0xC0FFEE01
    assert esp_spi(NATT6) == 0xAB
    assert esp_spi(IKE4) is None  # non-ESP marker: IKE on 4500


def test_filters() -> None:
    assert build_filter(None, None) is None
    by_host = build_filter("2001:db8::2", None)
    assert by_host(NATT6) and not by_host(ESP4)
    by_spi = build_filter(None, 0xC0FFEE01)
    assert by_spi(ESP4) and not by_spi(NATT6) and not by_spi(IKE4)
    both = build_filter("192.0.2.1", 0xC0FFEE01)
    assert both(ESP4) and not both(IKE4)
    with pytest.raises(UserError):
        build_filter("nohost", None)
