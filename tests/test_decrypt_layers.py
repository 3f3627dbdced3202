"""The decoder's lookups beyond one SA per (destination, SPI): ESP inside ESP, several SAs on one
destination and SPI told apart by their ICV (Cilium's per-pair keys under one SPI, by mark), a key
for every SPI (tcpdump's `-E ALGO:KEY`), and results nothing verified (ok-unverified)."""

from __future__ import annotations

from scapy.layers.inet import IP, UDP
from scapy.packet import Raw

from ipsec_capture.decrypt.decoder import EspDecoder
from ipsec_capture.decrypt.pipeline import DecryptSummary, comment_for
from ipsec_capture.xfrm.sa import ANY_SPI, AUTH_UNCHECKED, SA, Algorithm
from tests.support.esp_build import SUITES, Keys, make_sa, outer, seal

GCM, CBC = SUITES[0], next(s for s in SUITES if s.label == "aescbc128-sha256")
NOAUTH = next(s for s in SUITES if s.label == "aescbc128-noauth")
A, B, C = "192.0.2.1", "192.0.2.2", "192.0.2.3"
INNER = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / Raw(b"innermost"))


def test_esp_inside_esp_opens_each_layer_with_its_own_sa() -> None:
    outer_keys, inner_keys = Keys.random(GCM), Keys.random(CBC)
    middle = outer(seal(inner_keys, 0x2222, 7, INNER, 4), C, B)  # an IPv4 packet carrying ESP
    wire = outer(seal(outer_keys, 0x1111, 3, middle, 4), A, B)
    both = EspDecoder([make_sa(outer_keys, 0x1111, A, B, mode="tunnel"),
                       make_sa(inner_keys, 0x2222, C, B, mode="tunnel")])
    res = both.decrypt(wire)
    assert [(r.status, r.spi, r.seq) for r in res.layers()] == [("ok", 0x1111, 3), ("ok", 0x2222, 7)]
    assert res.inner == INNER
    assert comment_for(res).count("ok (decrypted, inner packet)") == 2
    summary = DecryptSummary()
    summary.add(res, wire)
    assert summary.packets == 1 and summary.totals() == {"ok": 2} and len(summary.per_sa) == 2
    # the inner SA unknown: the outer layer alone, its inner packet the ESP one
    res = EspDecoder([make_sa(outer_keys, 0x1111, A, B, mode="tunnel")]).decrypt(wire)
    assert (res.status, res.layer, res.inner) == ("ok", None, middle)
    # the inner ICV fails: that layer says so, the packet stays the inner ESP one
    bad = bytearray(middle)
    bad[-1] ^= 1
    res = both.decrypt(outer(seal(outer_keys, 0x1111, 4, bytes(bad), 4), A, B))
    assert [r.status for r in res.layers()] == ["ok", "icv-fail"] and res.inner == bytes(bad)


def test_sas_sharing_destination_and_spi_are_told_apart_by_icv() -> None:
    """Cilium: one SPI for every node pair, a key per pair, the inbound states differing by mark."""
    k1, k2, k3 = (Keys.random(GCM) for _ in range(3))
    sas = [make_sa(k, 0x3, src, B, mode="tunnel") for k, src in ((k1, A), (k2, C), (k3, "192.0.2.4"))]
    for n, sa in enumerate(sas, 1):
        sa.mark = (0xD00 | n << 16, 0xFFFF0F00)
    dec = EspDecoder(sas)
    assert len(dec) == 3 and dec.lane(int.from_bytes(bytes([192, 0, 2, 2]), "big") << 32 | 3) is None
    for keys, src, sa in ((k1, A, sas[0]), (k2, C, sas[1]), (k3, "192.0.2.4", sas[2])):
        res = dec.decrypt(outer(seal(keys, 0x3, 1, INNER, 4), src, B))
        assert (res.status, res.sa, res.inner) == ("ok", sa, INNER)
    # a packet whose source matches none (NAT) still finds its SA by ICV
    res = dec.decrypt(outer(seal(k2, 0x3, 2, INNER, 4), "198.51.100.9", B))
    assert (res.status, res.sa) == ("ok", sas[1])
    # an update of one of them (same source, mark and transform) replaces it, the others stay
    again = make_sa(Keys.random(GCM), 0x3, C, B, mode="tunnel")
    again.mark = sas[1].mark
    dec.add(again)
    assert len(dec) == 3
    assert dec.decrypt(outer(seal(k2, 0x3, 3, INNER, 4), C, B)).status == "icv-fail"


def test_a_key_for_every_spi_is_tried_last() -> None:
    keys, other = Keys.random(NOAUTH), Keys.random(GCM)
    anyspi = SA(src="*", dst="*", spi=ANY_SPI, mode="", enc=Algorithm("cbc(aes)", keys.key))
    dec = EspDecoder([anyspi, make_sa(other, 0x77, A, B, mode="tunnel")])
    res = dec.decrypt(outer(seal(keys, 0xABCDEF, 5, INNER, 4), A, B))
    assert (res.status, res.spi, res.inner) == ("ok-unverified", 0xABCDEF, INNER)
    assert dec.decrypt(outer(seal(other, 0x77, 1, INNER, 4), A, B)).status == "ok"
    summary = DecryptSummary()
    summary.add(res, b"")
    assert [t.spi for t in summary.per_sa.values()] == [0xABCDEF]  # counted under the packet's SPI


def test_an_unchecked_icv_is_skipped_and_named() -> None:
    keys = Keys.random(CBC)
    sa = make_sa(keys, 0x88, A, B, mode="tunnel")
    sa.auth = Algorithm(AUTH_UNCHECKED, trunc_bits=128)  # Wireshark's ANY 128 bit [no checking]
    wire = bytearray(outer(seal(keys, 0x88, 1, INNER, 4), A, B))
    res = EspDecoder([sa]).decrypt(bytes(wire))
    assert (res.status, res.inner) == ("ok-unverified", INNER)
    wire[-1] ^= 1  # a damaged ICV goes unnoticed: that is what unverified means
    assert EspDecoder([sa]).decrypt(bytes(wire)).status == "ok-unverified"
    assert "ICV not checked" in comment_for(res)
