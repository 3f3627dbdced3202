"""The ESP decoder recovers, byte for byte, packets sealed independently (tests/test_esp_build.py
and scapy), for every algorithm, both modes, IPv4/IPv6 outer and inner, NAT-T and ESN; and names
what went wrong otherwise."""

from __future__ import annotations

import os
import struct

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt
from scapy.packet import Raw

from ipsec_capture.decrypt.decoder import HEADROOM, ROOM, DecryptResult, EspDecoder, esp_header
from ipsec_capture.xfrm.sa import SA, Algorithm, Replay
from tests.support.esp_build import SCAPY_NAMES, SUITES, Keys, make_sa, outer, scapy_sa, seal

V4 = ("192.0.2.1", "192.0.2.2")
V6 = ("2001:db8::1", "2001:db8::2")
SPI = 0xC0FFEE01


def transport_case(fam: tuple[str, str], data: bytes, ext: bool = False) -> tuple[bytes, int, bytes]:
    """(plain packet, next header, L4 bytes): the packet before ESP, as the decoder must rebuild."""
    src, dst = fam
    l4 = UDP(sport=1234, dport=5678) / Raw(data)
    if ":" in dst:
        pkt = IPv6(src=src, dst=dst) / (IPv6ExtHdrDestOpt() / l4 if ext else l4)
        raw = bytes(pkt)
        return raw, 17, raw[48 if ext else 40:]
    raw = bytes(IP(src=src, dst=dst, id=7) / l4)
    return raw, 17, raw[20:]


def tunnel_inner(fam: tuple[str, str], data: bytes) -> tuple[bytes, int]:
    src, dst = ("10.0.0.1", "10.0.0.2") if fam is V4 else ("fd00::1", "fd00::2")
    if fam is V4:
        return bytes(IP(src=src, dst=dst) / ICMP() / Raw(data)), 4
    return bytes(IPv6(src=src, dst=dst) / ICMPv6EchoRequest(data=data)), 41


LAYOUTS = [  # (mode, outer family, inner family, natt)
    ("transport", V4, V4, False),
    ("transport", V6, V6, False),
    ("transport", V4, V4, True),
    ("transport", V6, V6, True),
    ("tunnel", V4, V4, False),
    ("tunnel", V4, V6, False),
    ("tunnel", V6, V4, False),
    ("tunnel", V6, V6, True),
    ("tunnel", V4, V6, True),
]


def _ids(layout: tuple) -> str:
    mode, out, inn, natt = layout
    return f"{mode}-{'v4' if out is V4 else 'v6'}in{'v4' if inn is V4 else 'v6'}{'-natt' if natt else ''}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=_ids)
@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.label)
def test_every_algorithm_and_layout(suite, layout) -> None:
    mode, out_fam, in_fam, natt = layout
    keys = Keys.random(suite)
    data = os.urandom(1 + len(suite.label) * 7)  # lengths vary so padding varies
    if mode == "transport":
        expected, nh, payload = transport_case(out_fam, data)
    else:
        expected, nh = tunnel_inner(in_fam, data)
        payload = expected
    esp = seal(keys, SPI, 42, payload, nh)
    dec = EspDecoder([make_sa(keys, SPI, *out_fam, mode=mode, natt=natt)])
    res = dec.decrypt(outer(esp, *out_fam, natt=natt))
    ok = "ok" if suite.aead or suite.auth else "ok-unverified"  # nothing checks an SA without integrity
    assert (res.status, res.spi, res.seq, res.next_header) == (ok, SPI, 42, nh), res.detail
    assert res.inner == expected


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.label)
def test_esn_every_algorithm(suite) -> None:
    """ESN: the high bits come from the SA's replay state; the ICV/AAD covers them."""
    keys = Keys.random(suite)
    seq = (3 << 32) | 17
    inner, nh = tunnel_inner(V4, b"esn")
    sa = make_sa(keys, SPI, *V4, mode="tunnel", esn=True, replay=Replay(seq_hi=3, seq=10, window=32))
    res = EspDecoder([sa]).decrypt(outer(seal(keys, SPI, seq, inner, nh, esn=True), *V4))
    ok = "ok" if suite.aead or suite.auth else "ok-unverified"
    assert (res.status, res.seq, res.inner) == (ok, seq, inner), res.detail


@pytest.mark.parametrize("label", ["gcm128-icv16", "aescbc128-sha256", "ccm128-icv8", "chacha20poly1305"])
def test_esn_rollover_is_followed(label: str) -> None:
    """Packets cross 2^32 while the SA's state says seq_hi=0: the decoder moves to seq_hi=1 and
    stays there, and late packets from before the rollover still get seq_hi=0."""
    keys = Keys.random(next(s for s in SUITES if s.label == label))
    sa = make_sa(keys, SPI, *V6, mode="tunnel", esn=True, replay=Replay(seq=0xFFFFFFF0, window=64))
    dec = EspDecoder([sa])
    inner, nh = tunnel_inner(V6, b"roll")
    seqs = [0xFFFFFFFA, 0xFFFFFFFF, 1 << 32, (1 << 32) + 1, 0xFFFFFFFE, (1 << 32) + 500,
            (1 << 32) + 0x90000000, (2 << 32) + 3]
    got = [dec.decrypt(outer(seal(keys, SPI, s, inner, nh, esn=True), *V6)) for s in seqs]
    assert [(r.status, r.seq) for r in got] == [("ok", s) for s in seqs]


def test_esn_without_integrity_uses_the_window_rule() -> None:
    """No ICV to try candidates against: RFC 4303 Appendix A alone decides."""
    keys = Keys.random(next(s for s in SUITES if s.label == "aescbc128-noauth"))
    sa = make_sa(keys, SPI, *V4, mode="tunnel", esn=True, replay=Replay(seq_hi=5, seq=0xFFFFFF00, window=128))
    dec = EspDecoder([sa])
    inner, nh = tunnel_inner(V4, b"n")
    for seq in [(5 << 32) | 0xFFFFFF10, (6 << 32) | 2, (6 << 32) | 0x100]:
        res = dec.decrypt(outer(seal(keys, SPI, seq, inner, nh, esn=True), *V4))
        assert (res.status, res.seq, res.inner) == ("ok-unverified", seq, inner)


@pytest.mark.parametrize("label", sorted(SCAPY_NAMES))
@pytest.mark.parametrize("layout", ["transport-v4", "transport-v6", "tunnel-v6in4", "tunnel-v4in6-natt"])
def test_scapy_sealed_packets(label: str, layout: str) -> None:
    """Packets encrypted by scapy's SecurityAssociation (right for these algorithms)."""
    keys = Keys.random(next(s for s in SUITES if s.label == label))
    if layout.startswith("transport"):
        fam = V4 if layout.endswith("v4") else V6
        ip = IP(src=fam[0], dst=fam[1]) if fam is V4 else IPv6(src=fam[0], dst=fam[1])
        plain = ip / UDP() / Raw(b"s" * 50)
        ref = scapy_sa(keys, SPI)
        sa = make_sa(keys, SPI, *fam)
    else:
        fam = V4 if layout == "tunnel-v6in4" else V6
        natt = layout.endswith("natt")
        tunnel = IP(src=fam[0], dst=fam[1]) if fam is V4 else IPv6(src=fam[0], dst=fam[1])
        ref = scapy_sa(keys, SPI, tunnel_header=tunnel,
                       nat_t_header=UDP(sport=4500, dport=4500) if natt else None)
        plain = (IPv6(src="fd00::1", dst="fd00::2") if fam is V4 else IP(src="10.1.1.1", dst="10.2.2.2")) \
            / UDP(sport=53, dport=53) / Raw(b"t" * 33)
        sa = make_sa(keys, SPI, *fam, mode="tunnel", natt=natt)
    plain = plain.__class__(bytes(plain))  # checksums and lengths filled in
    wire = bytes(ref.encrypt(plain, seq_num=9))
    res = EspDecoder([sa]).decrypt(wire)
    assert (res.status, res.seq) == ("ok", 9), res.detail
    assert res.inner == bytes(plain)


# RFC 3602 section 4, cases 5-8: published AES-CBC ESP packets (no integrity).
RFC3602 = [
    ("90d382b410eeba7ad938c46cec1a82bf", 0x4321, 1, 1,
     "0000432100000001e96e8c08ab465763fd098d45dd3ff893f663c25d325c18c6a9453e194e120849a4870b66cc6b9965330013b4898d"
     "c856a4699e523a55db080b59ec3a8e4b7e52775b07d1db34ed9c538ab50c551b874aa269add047ad2d5913ac19b7cfbad4a6",
     "08000ebda70a00008e9c083db95b070008090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223242526272829"
     "2a2b2c2d2e2f3031323334353637"),
    ("90d382b410eeba7ad938c46cec1a82bf", 0x4321, 8, 1,
     "000043210000000869d08df7d203329db093fc4924e5bd80f51995881ec4e0c4488987ce742e8109689bb379d2d750c0d915dca3"
     "46a89f75",
     "0800b5e8a80a0500a69c083d0b660e00777777777777777777777777"),
    ("0123456789abcdef0123456789abcdef", 0x8765, 2, 4,
     "0000876500000002f4e765244f6407adf13dc1380f673f37773b5241a4c449225e4f3ce5ed611b0c237ca96cf74a93013c1b0ea1"
     "a0cf70f8e4ecaec78ac53aad7a0f022b859243c647752e94a859352b8a4d4d2decd136e5c177f132ad3fbfb2201ac9904c74ee0a"
     "109e0ca1e4dfe9d5a100b842f1c22f0d",
     "45000054090400004001f988c0a87b03c0a87bc808009f76a90a0100b49c083d02a2040008090a0b0c0d0e0f1011121314151617"
     "18191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031323334353637"),
    ("0123456789abcdef0123456789abcdef", 0x8765, 5, 4,
     "000087650000000585d47224b5f3dd5d2101d4ea8dffab2215b92683819596a8047232cc00f7048fe45318e11f8a0f62ede3c3fc"
     "61203bb50f980a08c9843fd3a1b06d5c07ff9639b7eb7dfb3512e5de435e7207ed971ef3d2726d9b5ef6affc6d17a0decbb13892",
     "45000044090c00004001f990c0a87b03c0a87bc80800d63caa0a0200c69c083da3de0300ffffffffffffffffffffffffffffffff"
     "ffffffffffffffffffffffffffffffff"),
]


@pytest.mark.parametrize("case", RFC3602, ids=["case5", "case6", "case7", "case8"])
def test_rfc3602_vectors(case) -> None:
    key, spi, seq, nh, esp_hex, payload_hex = case
    mode = "tunnel" if nh == 4 else "transport"
    sa = SA(src="192.168.123.100", dst="192.168.123.3", spi=spi, mode=mode,
            enc=Algorithm("cbc(aes)", bytes.fromhex(key)))
    res = EspDecoder([sa]).decrypt(outer(bytes.fromhex(esp_hex), "192.168.123.100", "192.168.123.3"))
    assert (res.status, res.seq, res.next_header) == ("ok-unverified", seq, nh), res.detail  # no integrity
    payload = bytes.fromhex(payload_hex)
    assert (res.inner if mode == "tunnel" else res.inner[20:]) == payload


# --- failures get names -------------------------------------------------------------------------

def _one(label: str = "gcm128-icv16", **kw) -> tuple[Keys, EspDecoder, bytes]:
    keys = Keys.random(next(s for s in SUITES if s.label == label))
    inner, nh = tunnel_inner(V4, b"payload" * 5)
    dec = EspDecoder([make_sa(keys, SPI, *V4, mode="tunnel", **kw)])
    return keys, dec, outer(seal(keys, SPI, 7, inner, nh), *V4)


@pytest.mark.parametrize("label", [s.label for s in SUITES if s.aead or s.auth])
def test_tampered_packet_is_icv_fail(label: str) -> None:
    _, dec, wire = _one(label)
    for at in (len(wire) - 1, 20 + 4, len(wire) // 2):  # ICV, sequence number, body
        bad = bytearray(wire)
        bad[at] ^= 0x40
        assert dec.decrypt(bytes(bad)).status == "icv-fail"


def test_wrong_key_is_icv_fail_and_wrong_spi_is_no_sa() -> None:
    keys, _, wire = _one()
    other = Keys.random(keys.suite)
    assert EspDecoder([make_sa(other, SPI, *V4, mode="tunnel")]).decrypt(wire).status == "icv-fail"
    res = EspDecoder([make_sa(keys, SPI + 1, *V4, mode="tunnel")]).decrypt(wire)
    assert (res.status, res.spi, res.seq) == ("no-sa", SPI, 7)


def test_short_packets_are_truncated() -> None:
    _, dec, wire = _one()
    assert dec.decrypt(wire[:-5]).status == "truncated"  # cut capture: IP length says more
    cut = bytearray(wire[:20 + 8 + 8 + 4])  # header, IV and 4 bytes: no room for an ICV
    struct.pack_into("!H", cut, 2, len(cut))
    assert dec.decrypt(bytes(cut)).status == "truncated"


def test_bad_padding_without_integrity() -> None:
    keys = Keys.random(next(s for s in SUITES if s.label == "aescbc128-noauth"))
    wire = outer(seal(keys, SPI, 1, b"\x45" + b"\0" * 40, 4), *V4)
    dec = EspDecoder([make_sa(Keys.random(keys.suite), SPI, *V4, mode="tunnel")])  # wrong key
    results = [dec.decrypt(wire) for _ in range(2)]
    assert results[0].status == "bad-padding"  # random trailer: pad bytes never 1, 2, 3, ...
    assert results == results[1:] + results[:1]


def test_unsupported_sa_is_named() -> None:
    sa = SA(src=V4[0], dst=V4[1], spi=SPI, aead=Algorithm("rfc4106(gcm(sm4))", b"k" * 20, icv_bits=128))
    res = EspDecoder([sa]).decrypt(outer(b"\xc0\xff\xee\x01" + b"\0" * 60, *V4))
    assert res.status == "unsupported" and "sm4" in res.detail


def test_not_esp_and_ike_on_4500() -> None:
    _, dec, _ = _one()
    assert dec.decrypt(bytes(IP(dst="192.0.2.2") / UDP(sport=1, dport=2) / Raw(b"hello"))).status == "not-esp"
    ike = bytes(IP(dst="192.0.2.2") / UDP(sport=4500, dport=4500) / Raw(b"\0\0\0\0" + b"i" * 40))
    assert dec.decrypt(ike).status == "not-esp" and esp_header(ike) is None
    keepalive = bytes(IP(dst="192.0.2.2") / UDP(sport=4500, dport=4500) / Raw(b"\xff"))
    assert esp_header(keepalive) is None
    assert dec.decrypt(b"").status == "not-esp"


def test_lookup_falls_back_to_spi_when_nat_rewrote_the_address() -> None:
    keys, _, _ = _one()
    dec = EspDecoder([make_sa(keys, SPI, "198.51.100.1", "203.0.113.9", mode="tunnel", natt=True)])
    inner, nh = tunnel_inner(V4, b"nat")
    res = dec.decrypt(outer(seal(keys, SPI, 3, inner, nh), *V4, natt=True))
    assert (res.status, res.inner) == ("ok", inner)


def test_add_replaces_the_same_sa_and_keeps_others_of_the_same_dst_and_spi() -> None:
    """Same (dst, SPI), same keys: the same state again (replaced). Other keys: another state
    (Cilium's one SPI for every peer, told apart by marks): kept, and each packet opens with its own."""
    keys, _, wire = _one()
    other = Keys.random(keys.suite)
    dec = EspDecoder([make_sa(other, SPI, *V4, mode="tunnel")])
    assert len(dec) == 1 and dec.decrypt(wire).status == "icv-fail"
    dec.add(make_sa(keys, SPI, *V4, mode="tunnel"))
    dec.add(make_sa(keys, SPI, *V4, mode="tunnel"))
    assert len(dec) == 2 and dec.decrypt(wire).status == "ok"
    inner, nh = tunnel_inner(V4, b"theirs" * 5)
    theirs = dec.decrypt(outer(seal(other, SPI, 8, inner, nh), *V4))
    assert theirs.status == "ok" and theirs.inner == inner
    assert dec.decrypt(wire).sa.aead.key != theirs.sa.aead.key


def test_esp_header_fields_ipv6_extension_and_natt() -> None:
    esp = struct.pack("!II", 0xABCDEF01, 99) + b"\0" * 24
    h = esp_header(outer(esp, *V6, ext=True))
    assert (h.family, h.src, h.dst, h.spi, h.seq, h.natt, h.outer_header_len, h.offset) == \
        (10, V6[0], V6[1], 0xABCDEF01, 99, False, 48, 48)
    h = esp_header(outer(esp, *V4, natt=True))
    assert (h.family, h.src, h.dst, h.spi, h.seq, h.natt, h.outer_header_len, h.offset) == \
        (2, V4[0], V4[1], 0xABCDEF01, 99, True, 20, 28)


def test_transport_with_ipv6_extension_header_is_rebuilt() -> None:
    keys = Keys.random(SUITES[0])
    expected, nh, l4 = transport_case(V6, b"ext-hdr", ext=True)
    wire = outer(seal(keys, SPI, 1, l4, nh), *V6, ext=True)
    res = EspDecoder([make_sa(keys, SPI, *V6)]).decrypt(wire)
    assert (res.status, res.inner) == ("ok", expected)


def test_result_is_a_slots_dataclass() -> None:
    assert not hasattr(DecryptResult("ok"), "__dict__")


def test_key_file_sas_decide_tunnel_or_transport_per_packet() -> None:
    """An esp_sa table says nothing of the mode: an inner IP packet means tunnel (the inner packet
    alone comes out, as the kernel delivers it), anything else transport (outer header rebuilt)."""
    from ipsec_capture.xfrm.esp_sa import read_esp_sa, write_esp_sa
    from tests.support.synthetic import esp4, gcm_sa, udp4

    key = os.urandom(20)
    # a table of Wireshark's alone (no ipsec-capture lines, which would say the mode)
    sas = read_esp_sa(write_esp_sa([gcm_sa(0x1234, "192.0.2.1", "192.0.2.2", key)], 8, ours=False))
    assert sas[0].mode == ""
    inner = udp4("10.1.0.1", "10.2.0.1", 77, b"tunnelled")
    res = EspDecoder(sas).decrypt(esp4("192.0.2.1", "192.0.2.2", 0x1234, 9, inner, key))
    assert res.status == "ok" and res.inner == inner

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from tests.support.synthetic import ip4

    udp = bytes(udp4("192.0.2.1", "192.0.2.2", 5, b"transported")[20:])
    pad = -(len(udp) + 2) % 4
    plain = udp + bytes(range(1, pad + 1)) + bytes((pad, 17))  # padding, its length, next header UDP
    head, iv = struct.pack("!II", 0x1234, 10), (10).to_bytes(8, "big")
    body = iv + AESGCM(key[:16]).encrypt(key[16:] + iv, plain, head)
    sealed = ip4("192.0.2.1", "192.0.2.2", 50, head + body)
    res = EspDecoder(sas).decrypt(sealed)
    assert res.status == "ok" and res.inner[9] == 17 and bytes(res.inner[20:]) == udp


@pytest.mark.parametrize("label", ["gcm128-icv16", "aescbc128-sha256"])
def test_esn_found_by_the_icv_when_the_key_file_cannot_say(label: str) -> None:
    """An 8-column esp_sa table has no ESN column: the ICV tells (32-bit fails, 64-bit with the
    high bits inferred passes), and the SA is decoded as ESN from then on."""
    from ipsec_capture.xfrm.esp_sa import read_esp_sa, write_esp_sa

    keys = Keys.random(next(s for s in SUITES if s.label == label))
    sa = make_sa(keys, SPI, *V4, mode="tunnel", esn=True)
    loaded = read_esp_sa(write_esp_sa([sa], 8, ours=False))  # Wireshark's columns alone
    assert not loaded[0].esn
    dec = EspDecoder(loaded)
    inner, nh = tunnel_inner(V4, b"esn, unsaid")
    got = [dec.decrypt(outer(seal(keys, SPI, s, inner, nh, esn=True), *V4)) for s in (1, 2, 3)]
    assert [(r.status, r.seq, r.inner) for r in got] == [("ok", s, inner) for s in (1, 2, 3)]
    plain = make_sa(keys, SPI + 1, *V4, mode="tunnel")  # and a 32-bit SA stays 32-bit
    dec = EspDecoder(read_esp_sa(write_esp_sa([plain], 8, ours=False)))
    res = dec.decrypt(outer(seal(keys, SPI + 1, 5, inner, nh), *V4))
    assert (res.status, res.seq, res.inner) == ("ok", 5, inner)


@pytest.mark.parametrize("suite", SUITES, ids=[s.label for s in SUITES])
@pytest.mark.parametrize("mode", ["tunnel", "transport"])
def test_decrypt_into_writes_only_in_its_room(suite, mode: str) -> None:
    """decrypt_into writes the inner packet at `at` and nothing before at - HEADROOM or after
    at + len(packet) + ROOM (the pcapng writer's block around it), for every algorithm."""
    keys = Keys.random(suite)
    payload = bytes(IP(src="10.1.0.1", dst="10.1.0.2") / UDP() / Raw(b"x" * 37))
    pkt = outer(seal(keys, SPI, 5, payload, 4 if mode == "tunnel" else 17), *V4)
    sa = make_sa(keys, SPI, *V4, mode=mode)
    at, fill = 100, 0xEE
    buf = bytearray([fill]) * (at + len(pkt) + ROOM + 100)
    result = EspDecoder([sa]).decrypt_into(pkt, buf, memoryview(buf), at)
    assert result.status == ("ok" if suite.aead or suite.auth else "ok-unverified") and result.inner is None
    assert bytes(buf[at:at + result.inner_len]) == EspDecoder([sa]).decrypt(pkt).inner
    assert set(buf[:at - HEADROOM]) == {fill}
    assert set(buf[at + len(pkt) + ROOM:]) == {fill}
