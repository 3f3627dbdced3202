"""The key file formats users already have: tcpdump's `-E` secrets, strongSwan's save-keys esp_sa,
our own esp_sa lines, keyless `ip xfrm state` lines; each detected by `keyfile.parse_keys`, and
malformed input answered with one UserError naming the line, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.packet import Raw

from ipsec_capture.decrypt.decoder import EspDecoder
from ipsec_capture.errors import UserError
from ipsec_capture.xfrm.esp_sa import read_esp_sa, write_esp_sa
from ipsec_capture.xfrm.keyfile import load_sas, parse_keys
from ipsec_capture.xfrm.sa import ANY_SPI, AUTH_UNCHECKED
from ipsec_capture.xfrm.tcpdump import parse_tcpdump
from ipsec_capture.xfrm.text import parse_states
from tests.support.esp_build import SUITES, Keys, make_sa, outer, seal

A, B = "192.0.2.1", "192.0.2.2"
INNER = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / Raw(b"keys"))
SUITE = {s.label: s for s in SUITES}


# --- tcpdump -E ---------------------------------------------------------------------------

def test_tcpdump_entries_lines_commas_default_and_file(tmp_path: Path) -> None:
    (tmp_path / "more.txt").write_text("# more keys\n0x3@2001:db8::1 blowfish-cbc:sixteen-byte-key\n")
    text = ("# tcpdump -E, one per line or comma separated\n"
            "0x12345678@192.1.2.45 3des-cbc-hmac96:0x" + "43" * 24 + ","
            "4660@192.0.2.2\taes256-cbc:0x" + "aa" * 32 + "\n"
            "ikev2 I 0x0011223344556677 0x8899aabbccddeeff sha1:0x00 aes128:0x00\n"
            "file more.txt\n"
            "des-cbc:0x0102030405060708\n")
    (tmp_path / "secrets").write_text(text)
    sas = load_sas(tmp_path / "secrets")
    assert [(s.spi, s.dst, s.enc.name, s.auth and s.auth.trunc_bits) for s in sas] == [
        (0x12345678, "192.1.2.45", "cbc(des3_ede)", 96), (4660, B, "cbc(aes)", None),
        (3, "2001:db8::1", "cbc(blowfish)", None), (ANY_SPI, "*", "cbc(des)", None)]
    assert sas[0].auth.name == AUTH_UNCHECKED and sas[2].enc.key == b"sixteen-byte-key"
    assert sas[2].family == 10


@pytest.mark.parametrize(("text", "line", "why"), [
    ("0x1@192.0.2.1 rot13-cbc:0x00\n", 1, "unknown tcpdump algorithm"),
    ("# c\n\nzz@192.0.2.1 3des-cbc:0x" + "00" * 24 + "\n", 3, "bad SPI"),
    ("0x0@192.0.2.1 3des-cbc:0x" + "00" * 24 + "\n", 1, "out of range"),
    ("0x1@999.0.2.1 3des-cbc:0x" + "00" * 24 + "\n", 1, "not an IP address"),
    ("0x1@192.0.2.1 3des-cbc:0x001\n", 1, "even number of hex digits"),
    ("0x1@192.0.2.1 3des-cbc:0xzz\n", 1, "bad hex"),
    ("0x1@192.0.2.1 3des-cbc:0x0011\n", 1, "192-bit key"),
    ("0x1@192.0.2.1 aes128-cbc:\n", 1, "empty key"),
    ("des-cbc:0x" + "00" * 8 + ",0x1@192.0.2.1 aes\n", 1, "ALGO:KEY, got"),
    ("0x1 3des-cbc:0x" + "00" * 24 + "\n", 1, "SPI@DST"),
    ("des-cbc:0x0000000000000000\nfile\n", 2, "needs a file name"),
    ("des-cbc:0x0000000000000000\nfile /nonexistent/keys\n", 2, "cannot read"),
])
def test_tcpdump_garbage_names_the_line(text: str, line: int, why: str) -> None:
    with pytest.raises(UserError, match=f"line {line}: .*{why}"):
        parse_tcpdump(text, "k")


def test_tcpdump_file_loop_is_an_error(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.write_text("file loop\n")
    with pytest.raises(UserError, match="nests more than"):
        load_sas(loop)


def test_tcpdump_secrets_decrypt_what_they_name() -> None:
    """-hmac96: the 12-byte ICV (here HMAC-SHA-256-96) skipped unchecked."""
    keys = Keys.random(SUITE["aescbc256-sha256-96"])
    (sa,) = parse_tcpdump(f"0x99@{B} aes256-cbc-hmac96:0x{keys.key.hex()}")
    res = EspDecoder([sa]).decrypt(outer(seal(keys, 0x99, 1, INNER, 4), A, B))
    assert (res.status, res.inner) == ("ok-unverified", INNER)


# --- strongSwan save-keys -----------------------------------------------------------------

def _strongswan_row(src: str, dst: str, spi: int, enc: str, key: bytes, integ: str, ikey: bytes) -> str:
    """A row as the save-keys plugin prints it (save_keys_listener.c: `"%s","%H","%H","0x%.8x",
    "%s","0x%+B","%s","0x%+B"`: keys as bare hex after 0x, `0x` alone for none)."""
    return f'"IPv4","{src}","{dst}","0x{spi:08x}","{enc}","0x{key.hex()}","{integ}","0x{ikey.hex()}"'


def test_strongswan_save_keys_table_decrypts_as_it_is(tmp_path: Path) -> None:
    """strongSwan's names differ from Wireshark's (`TripleDes-CBC`, `AES-GCM [RFC4106]` without
    an ICV length, which it writes `ANY 64 bit` for 8- and 12-octet ICVs alike); its rows are
    appended per rekey, two per CHILD_SA."""
    cases = [("gcm128-icv16", "AES-GCM [RFC4106]", "ANY 128 bit authentication [no checking]"),
             ("gcm128-icv12", "AES-GCM [RFC4106]", "ANY 64 bit authentication [no checking]"),
             ("gcm128-icv8", "AES-GCM [RFC4106]", "ANY 64 bit authentication [no checking]"),
             ("3des-sha1", "TripleDes-CBC [RFC2451]", "HMAC-SHA-1-96 [RFC2404]"),
             ("aescbc128-sha256", "AES-CBC [RFC3602]", "HMAC-SHA-256-128 [RFC4868]"),
             ("aesctr128-sha256", "AES-CTR [RFC3686]", "HMAC-SHA-256-128 [RFC4868]"),
             ("des-md5", "DES-CBC [RFC2405]", "HMAC-MD5-96 [RFC2403]"),
             ("cast5-128-sha256", "CAST5-CBC [RFC2144]", "HMAC-SHA-256-128 [RFC4868]"),
             ("blowfish128-sha1", "BLOWFISH-CBC [RFC2451]", "HMAC-SHA-1-96 [RFC2404]")]
    rows, wires = [], []
    for spi, (label, enc, integ) in enumerate(cases, 0xC0000001):
        keys = Keys.random(SUITE[label])
        rows.append(_strongswan_row(A, B, spi, enc, keys.key, integ, keys.auth_key))
        rows.append(_strongswan_row(B, A, spi + 0x100, enc, keys.key, integ, keys.auth_key))
        wires.append(outer(seal(keys, spi, 1, INNER, 4), A, B))
    path = tmp_path / "esp_sa"
    path.write_text("\n".join(rows) + "\n")
    sas = load_sas(path)
    dec = EspDecoder(sas)
    assert [dec.decrypt(w).status for w in wires] == ["ok"] * len(cases)
    assert all(dec.decrypt(w).inner == INNER for w in wires)


# --- our own line, and the rest of esp_sa -------------------------------------------------

def test_our_line_keeps_what_wireshark_cannot_name() -> None:
    for label in ("ccm128-icv8", "gmac128", "chacha20poly1305", "aescbc128-xcbc", "camellia256-sha512"):
        keys = Keys.random(SUITE[label])
        sa = make_sa(keys, 0x42, A, B, mode="tunnel", esn=True)
        sa.replay.oseq_hi, sa.mark = 2, (0xD00, 0xF00)
        (back,) = read_esp_sa(write_esp_sa([sa], 8))
        assert (back.aead, back.enc, back.auth, back.mode, back.esn, back.replay.oseq_hi, back.mark) == \
            (sa.aead, sa.enc, sa.auth, "tunnel", True, 2, (0xD00, 0xF00))
        res = EspDecoder([back]).decrypt(outer(seal(keys, 0x42, (2 << 32) | 5, INNER, 4, esn=True), A, B))
        assert (res.status, res.inner) == ("ok", INNER), (label, res.detail)


@pytest.mark.parametrize(("line", "why"), [
    ("# ipsec-capture-sa {", "not JSON"),
    ("# ipsec-capture-sa []", "not a JSON object"),
    ('# ipsec-capture-sa {"src":"*","dst":"*","spi":"x"}', "'spi' must be int"),
    ('# ipsec-capture-sa {"src":"*","dst":"*","spi":-1}', "out of range"),
    ('# ipsec-capture-sa {"src":"*","dst":"*","spi":1,"enc":{"name":"cbc(aes)","key":"zz"}}', "bad hex key"),
    ('# ipsec-capture-sa {"src":"*","dst":"*","spi":1,"mark":[1]}', "mark must be"),
    ('# ipsec-capture-sa {"src":"*","dst":"*","spi":1,"aead":{"name":"x","icv_bits":"a"}}', "bad ICV"),
    ('# ipsec-capture-sa {"src":"*","dst":"*","spi":1,"mode":7}', "'mode' must be str"),
    ('# ipsec-capture-sa {"src":1,"dst":"*","spi":1}', "'src' must be str"),
])
def test_our_line_garbage_names_the_line(line: str, why: str) -> None:
    with pytest.raises(UserError, match=f"esp_sa line 2: .*{why}"):
        read_esp_sa("# a table\n" + line + "\n")


@pytest.mark.parametrize(("row", "why"), [
    ('"IPv5","*","*","0x1","NULL","","NULL",""', "protocol must be"),
    ('"IPv4","*","*","0xzz","NULL","","NULL",""', "bad SPI"),
    ('"IPv4","*","*","0x1","AES-CBC [RFC3602]","0xzz","NULL",""', "bad hex key"),
    ('"IPv4","*","*","0x1","NULL","","HMAC-FOO",""', "unknown Wireshark authentication"),
    ('"IPv4","*","*","0x1","NULL","","NULL","","64-bit","zz"', "bad ESN high bits"),
    ('"IPv4","*","*,"0x1"', "not a quoted CSV row|columns"),
])
def test_esp_sa_garbage_names_the_line(row: str, why: str) -> None:
    with pytest.raises(UserError, match=f"esp_sa line 3: .*(?:{why})"):
        read_esp_sa("# Wireshark esp_sa\n\n" + row + "\n")


def test_wireshark_rows_any_spi_and_case() -> None:
    (sa,) = read_esp_sa('"ipv4","*","*","*","aes-cbc [rfc3602]","0x' + "00" * 16
                        + '","ANY 96 bit authentication [no checking]",""\n')
    assert (sa.spi, sa.enc.name, sa.auth.name, sa.auth.trunc_bits) == \
        (ANY_SPI, "cbc(aes)", AUTH_UNCHECKED, 96)


# --- ip xfrm state: keyless lines and the detection -------------------------------------

def test_keyless_ip_xfrm_lines() -> None:
    text = ("src 10.125.0.2 dst 10.125.0.1\n\tproto esp spi 0x00000222 reqid 1 mode tunnel\n"
            "\treplay-window 0 flag align4\n\tauth-trunc digest_null  0\n\tenc cbc(des) 0x38627974656b6579\n"
            "src 10.125.0.2 dst 10.125.0.1\n\tproto esp spi 0x00000223 reqid 1 mode tunnel\n"
            "\taead rfc4543(gcm(aes))  128\n")
    des, gmac = parse_states(text)
    assert (des.auth.name, des.auth.key, des.auth.trunc_bits, des.enc.key) == \
        ("digest_null", b"", 0, b"8bytekey")
    assert (gmac.aead.key, gmac.aead.icv_bits) == (b"", 128)


def test_every_format_is_detected_and_nothing_else_is() -> None:
    assert parse_keys("# nothing yet\n\n") == []  # an esp_sa of a capture that saw no SA
    assert parse_keys("des-cbc:0x0102030405060708\n")[0].enc.name == "cbc(des)"
    assert parse_keys('"IPv4","*","*","0x1","NULL","","NULL",""\n')[0].spi == 1
    assert parse_keys("src 192.0.2.1 dst 192.0.2.2\n\tproto esp spi 0x1 reqid 1 mode tunnel\n")[0].spi == 1
    with pytest.raises(UserError, match="not a Wireshark esp_sa table"):
        parse_keys("hello world\n", "k")


@pytest.mark.parametrize("columns", [8, 10])
def test_a_table_keys_wrote_decrypts_every_algorithm_the_decoder_has(columns: int) -> None:
    """What `keys` promises in its warnings: `ipsec-capture decrypt` with the table it wrote."""
    keys = [Keys.random(s) for s in SUITES]
    sas = [make_sa(k, 0x500 + i, A, B, mode="tunnel", esn=i % 2 == 1) for i, k in enumerate(keys)]
    dec = EspDecoder(read_esp_sa(write_esp_sa(sas, columns)))
    for i, k in enumerate(keys):
        res = dec.decrypt(outer(seal(k, 0x500 + i, 7, INNER, 4, esn=i % 2 == 1), A, B))
        ok = "ok" if k.suite.aead or k.suite.auth else "ok-unverified"
        assert (res.status, res.inner) == (ok, INNER), (k.suite.label, res.detail)
