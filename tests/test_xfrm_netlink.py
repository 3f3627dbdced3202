"""The XFRM message codec against the kernel's exact layout, and the text parser against it."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest

from ipsec_capture.xfrm import netlink as nl
from ipsec_capture.xfrm.sa import SA, Algorithm, Encap, Replay, Selector
from ipsec_capture.xfrm.text import parse_states

DATA = Path(__file__).parent / "data"
AUTH_KEY = bytes(range(32))
ENC_KEY = bytes(range(100, 116))


def full_sa() -> SA:
    """Every feature the kernel can report at once (mirrors tests/data/state_full_s_*)."""
    return SA(
        src="192.0.2.1", dst="192.0.2.2", spi=0xC0FFEE01, mode="tunnel", family=2, reqid=7,
        flags=["af-unspec", "esn", "dont-encap-dscp"],
        enc=Algorithm("cbc(aes)", ENC_KEY), auth=Algorithm("hmac(sha256)", AUTH_KEY, trunc_bits=128),
        encap=Encap(2, 4500, 4500, "0.0.0.0"),
        selector=Selector("10.0.0.0/24", "10.1.0.0/24", proto=17, dport=53, family=2),
        replay=Replay(seq=0x10, oseq=0x20, seq_hi=1, oseq_hi=0, bitmap=(1 << 32) | 0xFFFF, window=128,
                      esn=True, extended=True),
        mark=(0x10, 0xFF), output_mark=(0x20, 0xFFFF), if_id=5, direction="in",
        offload={"ifindex": 3, "dir": "in", "packet": True},
        lifetime_cfg={"soft_byte_limit": nl.XFRM_INF, "hard_byte_limit": nl.XFRM_INF,
                      "soft_packet_limit": 1000, "hard_packet_limit": 2000,
                      "soft_add_expires_seconds": 3000, "hard_add_expires_seconds": 3600,
                      "soft_use_expires_seconds": 0, "hard_use_expires_seconds": 0},
        lifetime_cur={"bytes": 1234, "packets": 17,
                      "add_time": int(time.mktime(time.strptime("2024-05-01 12:00:00",
                                                                "%Y-%m-%d %H:%M:%S"))),
                      "use_time": 0},
        stats={"replay_window": 1, "replay": 2, "integrity_failed": 3},
    )


def test_struct_sizes_are_the_kernels():
    """sizeof() on x86_64 / arm64 for <linux/xfrm.h> structs (pahole)."""
    assert nl.XFRM_SELECTOR.size == 56
    assert nl.XFRM_ID.size == 24
    assert (nl.XFRM_SELECTOR.size + nl.XFRM_ID.size + 16 + nl.XFRM_LIFETIME_CFG.size
            + nl.XFRM_LIFETIME_CUR.size + nl.XFRM_STATS.size + nl.XFRM_USERSA_TAIL.size) == 224
    assert nl.XFRM_USERSA_ID.size == 24
    assert (nl.XFRM_SELECTOR.size + nl.XFRM_LIFETIME_CFG.size + nl.XFRM_LIFETIME_CUR.size
            + nl.XFRM_USERPOLICY_TAIL.size) == 168
    assert nl.XFRM_ID.size + nl.XFRM_USER_TMPL_TAIL.size == 64
    assert nl.XFRM_ENCAP_TMPL.size == 24
    assert (nl.XFRM_ALGO.size, nl.XFRM_ALGO_AUTH.size, nl.XFRM_ALGO_AEAD.size) == (68, 72, 72)
    assert nl.XFRM_REPLAY_STATE_ESN.size == 24 and nl.XFRM_USER_OFFLOAD.size == 8


def test_full_featured_sa_round_trips():
    sa = full_sa()
    assert nl.decode_state(nl.encode_state(sa)) == sa


@pytest.mark.parametrize("variant", ["aead", "ipv6", "legacy-replay", "no-selector"])
def test_variants_round_trip(variant):
    sa = full_sa()
    if variant == "aead":
        sa.enc = sa.auth = None
        sa.aead = Algorithm("rfc4106(gcm(aes))", bytes(36), icv_bits=64)
    elif variant == "ipv6":
        sa.src, sa.dst, sa.family = "2001:db8::1", "2001:db8::2", 10
        sa.encap = None
        sa.selector = Selector("2001:db8:1::/48", "::/0", family=10)
    elif variant == "legacy-replay":
        sa.flags = []
        sa.replay = Replay(seq=3, oseq=9, bitmap=7, window=32)
    else:
        sa.selector = None
    assert nl.decode_state(nl.encode_state(sa)) == sa


def _attr(atype: int, payload: bytes) -> bytes:
    """Hand-rolled nlattr: u16 len, u16 type, payload, pad to 4."""
    raw = struct.pack("<HH", 4 + len(payload), atype) + payload
    return raw + b"\0" * (-len(raw) % 4)


def test_hand_packed_kernel_message_decodes():
    """A message laid out byte by byte from <linux/xfrm.h> field offsets, not with our Structs."""
    info = bytearray(224)
    # xfrm_selector at 0: daddr[16] saddr[16] dport dmask sport smask family plen_d plen_s proto
    info[0:4] = socket.inet_aton("10.1.0.0")
    info[16:20] = socket.inet_aton("10.0.0.0")
    info[32:34] = (53).to_bytes(2, "big")
    info[34:36] = b"\xff\xff"
    struct.pack_into("<HBBB", info, 40, 2, 24, 16, 17)
    # xfrm_id at 56: daddr, spi (be32) at 72, proto at 76
    info[56:60] = socket.inet_aton("198.51.100.2")
    info[72:76] = (0xDEADBEEF).to_bytes(4, "big")
    info[76] = 50
    info[80:84] = socket.inet_aton("198.51.100.1")  # saddr
    struct.pack_into("<8Q", info, 96, 1, 2, 3, 4, 5, 6, 7, 8)  # lft
    struct.pack_into("<4Q", info, 160, 100, 10, 1700000000, 0)  # curlft
    struct.pack_into("<3I", info, 192, 4, 5, 6)  # stats
    struct.pack_into("<IIHBBB", info, 204, 99, 42, 2, 1, 0, 0x20 | 0x80)  # seq reqid family mode rw flags
    name = lambda s: s.encode().ljust(64, b"\0")  # noqa: E731
    attrs = b"".join([
        _attr(1, name("hmac(sha1)") + struct.pack("<I", 160) + bytes(20)),  # XFRMA_ALG_AUTH
        _attr(20, name("hmac(sha1)") + struct.pack("<II", 160, 96) + bytes(20)),  # XFRMA_ALG_AUTH_TRUNC
        _attr(2, name("cbc(aes)") + struct.pack("<I", 256) + b"\x11" * 32),  # XFRMA_ALG_CRYPT
        _attr(4, struct.pack("<H", 2) + (4500).to_bytes(2, "big") + (4501).to_bytes(2, "big") + bytes(18)),
        _attr(23, struct.pack("<6I", 2, 7, 8, 1, 2, 64) + struct.pack("<2I", 0xF, 0x1)),  # REPLAY_ESN_VAL
        _attr(21, struct.pack("<II", 1, 0xFFFFFFFF)),  # XFRMA_MARK
        _attr(29, struct.pack("<I", 0x77)),  # XFRMA_SET_MARK (no mask attr: all ones)
        _attr(31, struct.pack("<I", 9)),  # XFRMA_IF_ID
        _attr(33, b"\x02"),  # XFRMA_SA_DIR out
        _attr(28, struct.pack("<iB3x", 4, 2)),  # XFRMA_OFFLOAD_DEV ifindex 4, inbound
        _attr(15, struct.pack("<Q", 1700000001)),  # XFRMA_LASTUSED (ignored)
    ])
    body = bytes(info) + attrs
    msg = struct.pack("<IHHII", 16 + len(body), 0x10, 2, 1, 0) + body
    sa = nl.decode_state(msg)
    assert (sa.src, sa.dst, sa.spi, sa.proto, sa.reqid, sa.mode) == (
        "198.51.100.1", "198.51.100.2", 0xDEADBEEF, 50, 42, "tunnel")
    assert sa.flags == ["af-unspec", "esn"]
    assert sa.selector == Selector("10.0.0.0/16", "10.1.0.0/24", proto=17, dport=53, family=2)
    assert sa.auth == Algorithm("hmac(sha1)", bytes(20), trunc_bits=96)
    assert sa.enc == Algorithm("cbc(aes)", b"\x11" * 32)
    assert sa.encap == Encap(2, 4500, 4501, "0.0.0.0")
    assert sa.replay == Replay(seq=8, oseq=7, seq_hi=2, oseq_hi=1, bitmap=(1 << 32) | 0xF, window=64,
                               esn=True, extended=True)
    assert (sa.mark, sa.output_mark) == ((1, 0xFFFFFFFF), (0x77, 0xFFFFFFFF))
    assert (sa.if_id, sa.direction) == (9, "out")
    assert sa.offload == {"ifindex": 4, "dir": "in", "packet": False}
    assert sa.lifetime_cfg["soft_byte_limit"] == 1 and sa.lifetime_cfg["hard_use_expires_seconds"] == 8
    assert sa.lifetime_cur == {"bytes": 100, "packets": 10, "add_time": 1700000000, "use_time": 0}
    assert sa.stats == {"replay_window": 4, "replay": 5, "integrity_failed": 6}


def test_hand_packed_aead_and_legacy_replay():
    info = bytearray(224)
    info[56:72] = socket.inet_pton(socket.AF_INET6, "2001:db8::2")
    info[72:76] = (0x1000).to_bytes(4, "big")
    info[76] = 50
    info[80:96] = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    struct.pack_into("<IIHBBB", info, 204, 0, 1, 10, 0, 32, 0)
    attrs = (_attr(18, b"rfc4106(gcm(aes))".ljust(64, b"\0") + struct.pack("<II", 160, 96) + bytes(range(20)))
             + _attr(10, struct.pack("<III", 5, 4, 0xF)))  # XFRMA_REPLAY_VAL oseq seq bitmap
    body = bytes(info) + attrs
    sa = nl.decode_state(struct.pack("<IHHII", 16 + len(body), 0x10, 2, 1, 0) + body)
    assert (sa.src, sa.dst, sa.family, sa.selector) == ("2001:db8::1", "2001:db8::2", 10, None)
    assert sa.aead == Algorithm("rfc4106(gcm(aes))", bytes(range(20)), icv_bits=96)
    assert sa.replay == Replay(seq=4, oseq=5, bitmap=0xF, window=32)
    assert not sa.esn


def test_text_and_netlink_give_the_same_sa():
    """`ip -s xfrm state` text of the full SA == the SA through the kernel's binary layout."""
    from_text = parse_states((DATA / "state_full_s_iproute2-6.1.txt").read_text())
    assert len(from_text) == 1
    text_sa = from_text[0]
    kernel_sa = nl.decode_state(nl.encode_state(full_sa()))
    # offload names a device in text and an ifindex in netlink: compare the rest of it
    assert text_sa.offload == {"dev": "eth2", "dir": "in", "packet": True}
    text_sa.offload = kernel_sa.offload = None
    assert text_sa == kernel_sa
