"""`ip xfrm` text parser on samples from several iproute2 versions; garbage gives UserError."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsec_capture.errors import UserError
from ipsec_capture.xfrm.esp_sa import read_esp_sa
from ipsec_capture.xfrm.keyfile import load_sas
from ipsec_capture.xfrm.text import parse_policies, parse_states

DATA = Path(__file__).parent / "data"


def test_strongswan_natt_esn_sample():
    a, b = parse_states((DATA / "state_strongswan_natt_iproute2-6.1.txt").read_text())
    assert (a.spi, b.spi) == (0xB9E564DC, 0x0B81DF6E)
    assert a.aead.name == "rfc4106(gcm(aes))" and a.aead.icv_bits == 128 and len(a.aead.key) == 36
    assert a.encap.sport == 4500 and a.mode == "tunnel" and a.reqid == 16389
    assert a.esn and a.replay.extended and a.replay.window == 128
    assert a.replay.seq == 0x1D and a.replay.bitmap == 0x1FFFFFFF
    assert b.replay.oseq == 0x18


def test_legacy_sample_one_line_replay_plain_auth_null_enc_comp():
    a, b, c = parse_states((DATA / "state_legacy_iproute2-3.x.txt").read_text())
    assert a.family == 10 and (a.replay.seq, a.replay.oseq, a.replay.bitmap) == (5, 10, 0x1F)
    assert a.auth.trunc_bits is None and a.auth.name == "hmac(sha1)"
    assert a.flags == ["af-unspec"]  # hex leftover `20`
    assert a.enc.name == "cbc(des3_ede)" and len(a.enc.key) == 24
    assert (b.replay.seq, b.replay.oseq, b.replay.bitmap, b.replay.window) == (3, 9, 7, 64)
    assert b.enc.key == b"" and b.auth.trunc_bits == 96
    assert c.proto == 108 and c.comp.name == "deflate"


def test_iptfs_sample_same_line_esn_context():
    out, inb = parse_states((DATA / "state_iptfs_iproute2-6.10.txt").read_text())
    assert out.direction == "out" and out.replay.oseq == 0xA and out.mode == "iptfs"
    assert inb.direction == "in" and inb.replay.seq == 0xA and inb.replay.bitmap == 0x3FF


@pytest.mark.parametrize(("text", "line"), [
    ("hello world\n", 1),
    ("src 192.0.2.1 dst 192.0.2.2\n\tproto esp spi 0x1 reqid 1 mode transport\n"
     "\tauth-trunc hmac(sha256) 256 128\n", 3),  # keys hidden (e.g. a redacted paste)
    ("src 192.0.2.1 dst 999.0.2.2\n\tproto esp spi 0x1\n", 1),
    ("src 192.0.2.1 dst 192.0.2.2\n\treplay-window 4\n", 1),  # no proto line
    ("\n\n\tproto esp spi 0x1\n", 3),
    ("src 192.0.2.1 dst 192.0.2.2\n\tproto esp spi zz reqid 1 mode transport\n", 2),
    ("src 192.0.2.1 dst 192.0.2.2\n\tproto esp spi 0x1 reqid 1 mode transport\n"
     "\taead rfc4106(gcm(aes)) 0x0011\n", 3),
])
def test_garbage_names_the_line(text, line):
    with pytest.raises(UserError, match=f"line {line}:"):
        parse_states(text)


def test_policy_garbage():
    with pytest.raises(UserError, match="line 2"):
        parse_policies("src 10.0.0.0/8 dst 10.1.0.0/16\n\tdir sideways priority 1\n")


def test_keyfile_detects_both_formats(tmp_path):
    text_file = tmp_path / "states.txt"
    text_file.write_text((DATA / "state_strongswan_natt_iproute2-6.1.txt").read_text())
    esp = tmp_path / "k.esp_sa"
    esp.write_text('"IPv4","*","*","0x00000010","AES-CBC [RFC3602]","0x00112233445566778899aabbccddeeff",'
                   '"HMAC-SHA-1-96 [RFC2404]","0x0102030405060708090a0b0c0d0e0f1011121314"\n')
    assert [s.spi for s in load_sas(text_file)] == [0xB9E564DC, 0x0B81DF6E]
    (sa,) = load_sas(esp)
    assert sa.spi == 0x10 and sa.enc.name == "cbc(aes)" and sa.auth.trunc_bits == 96
    with pytest.raises(UserError):
        load_sas(tmp_path / "missing")


LINE_WORDS = st.sampled_from([
    "src", "dst", "proto", "esp", "spi", "0x10", "reqid", "1", "mode", "tunnel", "replay-window", "flag",
    "esn", "aead", "rfc4106(gcm(aes))", "0x00112233", "128", "enc", "auth-trunc", "anti-replay",
    "esn context:", "seq-hi", "seq", "oseq", "0x1,", "replay_window", "bitmap-length", "4,", "sel",
    "192.0.2.1", "10.0.0.0/8", "::/0", "lifetime", "config:", "limit:", "soft", "(INF)(bytes),", "mark",
    "0x5/0xff", "if_id", "dir", "in", "tmpl", "level", "use", "encap", "type", "espinudp", "sport", "4500",
    "(128 bits)", "00000000", "stats:", "add", "-", "use", "2024-01-01", "12:00:00", "x", "/", "(", ")",
])


@st.composite
def xfrm_like(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        indent = draw(st.sampled_from(["", "\t", "\t ", "  "]))
        words = draw(st.lists(LINE_WORDS, max_size=9))
        lines.append(indent + " ".join(words))
    return "\n".join(lines)


@settings(max_examples=400, deadline=None)
@given(st.one_of(xfrm_like(), st.text(max_size=300)))
def test_fuzz_text_parsers_raise_only_usererror(text):
    for parse in (parse_states, parse_policies):
        with contextlib.suppress(UserError):
            parse(text)


ESP_WORDS = st.sampled_from(['"IPv4"', '"IPv6"', '"*"', '"0x10"', '"AES-CBC [RFC3602]"', '"NULL"', '"0x00"',
                             '"HMAC-SHA-1-96 [RFC2404]"', '"64-bit"', '"0"', '""', '"x', "0x1", '"\\"',
                             '"ANY 96 bit authentication [no checking]"', '"0xzz"', '"-1"'])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.lists(st.lists(ESP_WORDS, min_size=6, max_size=11).map(",".join), max_size=4)
                 .map("\n".join), st.text(max_size=300)))
def test_fuzz_esp_sa_reader_raises_only_usererror(text):
    with contextlib.suppress(UserError):
        read_esp_sa(text)
