"""tshark is the oracle: ESP packets built here with `cryptography` (independently of our
decoder) must decrypt in Wireshark with a good ICV using the esp_sa table we write."""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ipsec_capture.xfrm.esp_sa import install_profile, write_esp_sa
from ipsec_capture.xfrm.sa import SA, Algorithm, Encap
from ipsec_capture.xfrm.verify import verify_capture
from tests.conftest import require_tool

SRC, DST = "192.0.2.1", "192.0.2.2"
INNER = struct.pack("!HHHH", 40000, 9, 8 + 23, 0) + b"hello from the test sa!"  # UDP, next header 17
PER_SA = 3


def ipv4(payload: bytes, proto: int = 50) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0,
                      bytes(map(int, SRC.split("."))), bytes(map(int, DST.split("."))))
    csum = sum(struct.unpack("!10H", hdr))
    csum = (csum & 0xFFFF) + (csum >> 16)
    csum = ~((csum & 0xFFFF) + (csum >> 16)) & 0xFFFF
    return hdr[:10] + struct.pack("!H", csum) + hdr[12:] + payload


def trailer(data: bytes, block: int) -> bytes:
    """RFC 4303 padding 1, 2, 3... so that data + pad + 2 is a multiple of `block` (>= 4)."""
    block = max(block, 4)
    padlen = (-(len(data) + 2)) % block
    return data + bytes(range(1, padlen + 1)) + bytes([padlen, 17])


def esp_cbc(spi: int, seq: int, cipher: str, ekey: bytes, hname: str | None, akey: bytes,
            trunc: int) -> bytes:
    head = struct.pack("!II", spi, seq)
    if cipher == "null":
        body = trailer(INNER, 4)
    else:
        algo, block = (algorithms.AES(ekey), 16) if cipher == "aes" else (TripleDES(ekey), 8)
        iv = os.urandom(block)
        enc = Cipher(algo, modes.CBC(iv)).encryptor()
        body = iv + enc.update(trailer(INNER, block)) + enc.finalize()
    icv = b""
    if hname:
        icv = hmac.new(akey, head + body, getattr(hashlib, hname)).digest()[: trunc // 8]
    return head + body + icv


def esp_ctr(spi: int, seq: int, key: bytes) -> bytes:
    head = struct.pack("!II", spi, seq)
    iv = os.urandom(8)
    counter = key[-4:] + iv + b"\0\0\0\1"  # RFC 3686: nonce || IV || block counter 1
    enc = Cipher(algorithms.AES(key[:-4]), modes.CTR(counter)).encryptor()
    body = iv + enc.update(trailer(INNER, 4)) + enc.finalize()
    icv = hmac.new(b"\x22" * 20, head + body, hashlib.sha1).digest()[:12]
    return head + body + icv


def esp_gcm(spi: int, seq: int, key: bytes, icv_bits: int) -> bytes:
    head = struct.pack("!II", spi, seq)
    iv = os.urandom(8)
    sealed = AESGCM(key[:-4]).encrypt(key[-4:] + iv, trailer(INNER, 4), head)
    ct, tag = sealed[:-16], sealed[-16:]
    return head + iv + ct + tag[: icv_bits // 8]  # a short GCM ICV is the tag's prefix


def write_pcap(path: Path, packets: list[bytes]) -> None:
    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))  # LINKTYPE_RAW
        for i, pkt in enumerate(packets):
            fh.write(struct.pack("<IIII", 1700000000 + i, 0, len(pkt), len(pkt)) + pkt)


def cases() -> list[tuple[SA, callable]]:
    """(SA as the kernel would report it, packet builder) for every algorithm Wireshark 4.0 has."""
    out = []
    spi = 0x100
    for bits in (64, 96, 128):
        for klen in (16, 32):
            key = os.urandom(klen + 4)
            sa = SA(SRC, DST, spi, family=2, aead=Algorithm("rfc4106(gcm(aes))", key, icv_bits=bits))
            out.append((sa, lambda s, q, k=key, b=bits: esp_gcm(s, q, k, b)))
            spi += 1
    hashes = [("hmac(md5)", "md5", 16, 96), ("hmac(sha1)", "sha1", 20, 96),
              ("hmac(sha256)", "sha256", 32, 96),
              ("hmac(sha256)", "sha256", 32, 128), ("hmac(sha384)", "sha384", 48, 192),
              ("hmac(sha512)", "sha512", 64, 256)]
    for linux, hname, alen, trunc in hashes:
        ekey, akey = os.urandom(16), os.urandom(alen)
        sa = SA(SRC, DST, spi, family=2, enc=Algorithm("cbc(aes)", ekey),
                auth=Algorithm(linux, akey, trunc_bits=trunc))
        out.append((sa, lambda s, q, e=ekey, a=akey, h=hname, t=trunc: esp_cbc(s, q, "aes", e, h, a, t)))
        spi += 1
    ekey, akey = os.urandom(24), os.urandom(20)
    sa = SA(SRC, DST, spi, family=2, enc=Algorithm("cbc(des3_ede)", ekey),
            auth=Algorithm("hmac(sha1)", akey, trunc_bits=96))
    out.append((sa, lambda s, q, e=ekey, a=akey: esp_cbc(s, q, "3des", e, "sha1", a, 96)))
    spi += 1
    key = os.urandom(20)
    sa = SA(SRC, DST, spi, family=2, enc=Algorithm("rfc3686(ctr(aes))", key),
            auth=Algorithm("hmac(sha1)", b"\x22" * 20, trunc_bits=96))
    out.append((sa, lambda s, q, k=key: esp_ctr(s, q, k)))
    spi += 1
    akey = os.urandom(32)
    sa = SA(SRC, DST, spi, family=2, enc=Algorithm("ecb(cipher_null)", b""),
            auth=Algorithm("hmac(sha256)", akey, trunc_bits=128))
    out.append((sa, lambda s, q, a=akey: esp_cbc(s, q, "null", b"", "sha256", a, 128)))
    spi += 1
    sa = SA(SRC, DST, spi, family=2, enc=Algorithm("ecb(cipher_null)", b""))
    out.append((sa, lambda s, q: esp_cbc(s, q, "null", b"", None, b"", 0)))
    return out


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> tuple[Path, list[SA]]:
    require_tool("tshark")
    tmp = tmp_path_factory.mktemp("espsa")
    sas, packets = [], []
    for sa, build in cases():
        sas.append(sa)
        packets += [ipv4(build(sa.spi, seq)) for seq in range(1, PER_SA + 1)]
    write_pcap(tmp / "esp.pcap", packets)
    return tmp / "esp.pcap", sas


def test_tshark_decrypts_every_algorithm_with_good_icv(capture):
    pcap, sas = capture
    results = verify_capture(str(pcap), sas, columns=8)
    for sa in sas:
        r = results[sa.spi]
        name = sa.aead.name if sa.aead else f"{sa.enc.name}+{sa.auth.name if sa.auth else 'none'}"
        assert r.packets == PER_SA, name
        assert r.decrypted == PER_SA, f"{name}: Wireshark found no next header after decrypting"
        if sa.auth is not None or sa.aead is not None:
            assert (r.icv_good, r.icv_bad) == (PER_SA, 0), f"{name} (SPI 0x{sa.spi:x}): {r}"


def test_wrong_key_gives_bad_icv_not_good(capture):
    pcap, sas = capture
    wrong = [SA(s.src, s.dst, s.spi, family=2, enc=s.enc, aead=s.aead,
                auth=Algorithm(s.auth.name, bytes(len(s.auth.key)), trunc_bits=s.auth.trunc_bits))
             for s in sas if s.auth is not None and s.enc.name == "cbc(aes)"]
    results = verify_capture(str(pcap), wrong, columns=8)
    for sa in wrong:
        assert results[sa.spi].icv_good == 0 and results[sa.spi].icv_bad == PER_SA


def test_profile_dir_with_C(capture, tmp_path, monkeypatch):
    """The table installed as a profile works with `tshark -C NAME` and nothing else."""
    pcap, sas = capture
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    pdir = install_profile("ict-test", write_esp_sa(sas, 8))
    assert (pdir / "esp_sa").stat().st_mode & 0o777 == 0o600
    # our `# ipsec-capture-sa` line before every row: Wireshark skips it (and decrypts below)
    assert (pdir / "esp_sa").read_text().count("\n# ipsec-capture-sa {") == len(sas)
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path))
    argv = [shutil.which("tshark"), "-n", "-C", "ict-test", "-r", str(pcap), "-Y", "esp.icv_good == 1",
            "-T", "fields", "-e", "esp.spi"]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    good = {int(x, 0) for x in out.stdout.split()}
    assert good == {s.spi for s in sas if s.auth is not None or s.aead is not None}


def test_natt_sa_gets_wildcard_addresses_and_still_decrypts(capture, tmp_path):
    pcap, sas = capture
    gcm = sas[0]
    natt = SA("198.51.100.7", "203.0.113.9", gcm.spi, family=2, aead=gcm.aead, encap=Encap())
    text = write_esp_sa([natt], 8)
    assert '"*","*"' in text
    assert verify_capture(str(pcap), [natt], 8)[gcm.spi].icv_good == PER_SA
