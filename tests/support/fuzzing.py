"""Builders for the fuzz tests: pcap and pcapng files of every link type we read, written byte
by byte (not through our writer, so a test can put any value in any field), and the mutations
hypothesis applies to them: byte flips, cuts, inserted garbage, absurd length fields."""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from ipsec_capture.capture.nflog_tlv import build_body
from ipsec_capture.models import Record
from tests.support.synthetic import esp4, udp4

# The fuzz tests' budget: fixed and derandomized in the normal suite (fast, the same every run);
# IPSEC_CAPTURE_FUZZ_EXAMPLES=20000 for a long hunt, still derandomized unless ..._FUZZ_RANDOM=1.
EXAMPLES = int(os.environ.get("IPSEC_CAPTURE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                derandomize=not os.environ.get("IPSEC_CAPTURE_FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# link type -> what goes in front of an IP packet in a frame (pcap-linktype(7))
ETH = bytes(6) + bytes.fromhex("020000000001")
LINKTYPES: dict[int, bytes] = {
    239: b"",  # NFLOG: the frame is an NFLOG body, built below
    101: b"",  # raw IP
    228: b"",  # IPv4
    229: b"",  # IPv6 (our seeds are v4: the reader does not check)
    1: ETH + b"\x08\x00",  # Ethernet
    113: bytes(14) + b"\x08\x00",  # Linux cooked v1: protocol at 14
    276: b"\x08\x00" + bytes(18),  # Linux cooked v2: protocol at 0
}
VLAN_ETH = ETH + b"\x81\x00\x00\x05\x08\x00"


def nflog_body(ip: bytes, point: str = "raw-pre-esp", hook: int | None = 0) -> bytes:
    """An NFLOG body as the kernel logs it (little-endian TLV headers on x86)."""
    return build_body(Record(1_700_000_000_000_000_000, point, ip, hook=hook, indev=2, mark=5, seq=1,
                             uid=0))


def seed_frames(linktype: int) -> list[bytes]:
    """A few frames of `linktype`: ESP, plain UDP, and for Ethernet one with a VLAN tag."""
    ips = [esp4("192.0.2.1", "192.0.2.2", 0xC0FFEE01, n, udp4("10.1.0.1", "10.2.0.1", n, b"x" * 20),
                bytes(range(20))) for n in (1, 2)]
    ips.append(udp4("192.0.2.1", "192.0.2.2", 3, b"plain"))
    if linktype == 239:
        return [nflog_body(ips[0]), nflog_body(ips[1], "mangle-pre-in", hook=None),
                nflog_body(ips[2], "raw-out-ike", hook=3)]
    frames = [LINKTYPES[linktype] + ip for ip in ips]
    if linktype == 1:
        frames.append(VLAN_ETH + ips[0])
    return frames


def pcap_file(linktype: int, frames: list[bytes], *, order: str = "<", nsec: bool = False,
              stamps: list[tuple[int, int]] | None = None, origs: list[int] | None = None) -> bytes:
    magic = 0xA1B23C4D if nsec else 0xA1B2C3D4
    out = [struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 262144, linktype)]
    for i, f in enumerate(frames):
        sec, frac = stamps[i] if stamps else (1_700_000_000, i)
        orig = origs[i] if origs else len(f)
        out.append(struct.pack(order + "IIII", sec, frac, len(f), orig) + f)
    return b"".join(out)


def _opt(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + bytes(-len(value) % 4)


def _block(order: str, btype: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack(order + "II", btype, total) + body + struct.pack(order + "I", total)


def pcapng_file(linktype: int, frames: list[bytes], *, order: str = "<",
                stamps: list[tuple[int, int]] | None = None, origs: list[int] | None = None,
                tsresol: int | None = 9, tsoffset: int | None = None) -> bytes:
    """One section, one interface, an enhanced packet block per frame (with a comment), and one
    simple packet block at the end."""
    shb = _block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1)
                 + _opt(order, 4, b"fuzz") + bytes(4))
    opts = _opt(order, 2, b"eth0")
    if tsresol is not None:
        opts += _opt(order, 9, bytes([tsresol]))
    if tsoffset is not None:
        opts += _opt(order, 14, struct.pack(order + "q", tsoffset))
    idb = _block(order, 1, struct.pack(order + "HHI", linktype, 0, 262144) + opts + bytes(4))
    out = [shb, idb]
    for i, f in enumerate(frames):
        hi, lo = stamps[i] if stamps else (0x00060000, i)
        orig = origs[i] if origs else len(f)
        body = struct.pack(order + "IIIII", 0, hi, lo, len(f), orig) + f + bytes(-len(f) % 4)
        out.append(_block(order, 6, body + _opt(order, 1, f"packet {i}".encode()) + bytes(4)))
    if frames:
        f = frames[0]
        out.append(_block(order, 3, struct.pack(order + "I", len(f)) + f + bytes(-len(f) % 4)))
    return b"".join(out)


# One mutation: (kind, offset, value). Offsets are taken modulo the length of the data.
Mutation = tuple[str, int, int]


def mutations(size: int, max_ops: int = 4) -> st.SearchStrategy[list[Mutation]]:
    """Byte flips, cuts, inserted garbage, and 32-bit length fields set to absurd values."""
    op = st.tuples(st.sampled_from(["flip", "cut", "insert", "u32le", "u32be", "u16le"]),
                   st.integers(0, max(size - 1, 0)),
                   st.sampled_from([0, 1, 3, 4, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFC, 0xFFFFFFFF,
                                    0x4000000, 12, 28, 0x12345]))
    return st.lists(op, min_size=1, max_size=max_ops)


def mutate(data: bytes, ops: list[Mutation]) -> bytes:
    buf = bytearray(data)
    for kind, at, value in ops:
        if not buf:
            break
        at %= len(buf)
        if kind == "flip":
            buf[at] ^= (value & 0xFF) or 0x80
        elif kind == "cut":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = (value & 0xFFFFFFFF).to_bytes(4, "little")[: 1 + value % 4]
        elif kind == "u32le":
            buf[at:at + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")
        elif kind == "u32be":
            buf[at:at + 4] = (value & 0xFFFFFFFF).to_bytes(4, "big")
        else:
            buf[at:at + 2] = (value & 0xFFFF).to_bytes(2, "little")
    return bytes(buf)
