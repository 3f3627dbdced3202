"""An independent ESP sealer for the decoder's tests, and the proof that it is right.

The sealer uses `cryptography` the obvious way (a fresh CBC/CTR context per packet, AESGCM with
the tag cut afterwards, AESCCM with its own tag length), not the decoder's shortcuts, so a bug in
one is not repeated in the other. Where scapy's SecurityAssociation is right (CBC, CTR, 3DES,
NULL with HMAC), the tests below show the sealer produces the same bytes as scapy.
"""

from __future__ import annotations

import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.decrepit.ciphers.algorithms import CAST5, Blowfish, Camellia, TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.cmac import CMAC
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Raw

from ipsec_capture.xfrm.sa import SA, Algorithm, Encap, Replay

HMAC_DIGEST = {"hmac(md5)": "md5", "hmac(sha1)": "sha1", "hmac(sha256)": "sha256",
               "hmac(sha384)": "sha384", "hmac(sha512)": "sha512", "hmac(rmd160)": "ripemd160",
               "hmac(sm3)": "sm3"}
# CBC ciphers: kernel name -> (cipher class, block bytes)
CBC_CIPHERS = {"cbc(aes)": (algorithms.AES, 16), "cbc(des3_ede)": (TripleDES, 8),
               "cbc(des)": (lambda k: TripleDES(k * 3), 8),
               "cbc(blowfish)": (Blowfish, 8), "cbc(cast5)": (CAST5, 8), "cbc(camellia)": (Camellia, 16),
               "cbc(sm4)": (algorithms.SM4, 16)}


@dataclass
class Suite:
    """One algorithm combination: kernel names, key sizes, ICV/truncation."""

    label: str
    enc: str  # kernel name of the cipher or AEAD
    key_len: int  # bytes, incl. salt/nonce as the kernel stores it
    icv: int = 16  # AEAD ICV bytes
    auth: str | None = None
    auth_key_len: int = 0
    trunc: int = 0  # bytes

    @property
    def aead(self) -> bool:
        return self.enc.startswith(("rfc4106", "rfc4543", "rfc4309", "rfc7539esp"))


SUITES = [
    Suite("gcm128-icv16", "rfc4106(gcm(aes))", 20, 16),
    Suite("gcm128-icv12", "rfc4106(gcm(aes))", 20, 12),
    Suite("gcm128-icv8", "rfc4106(gcm(aes))", 20, 8),
    Suite("gcm192-icv16", "rfc4106(gcm(aes))", 28, 16),
    Suite("gcm256-icv16", "rfc4106(gcm(aes))", 36, 16),
    Suite("gcm256-icv8", "rfc4106(gcm(aes))", 36, 8),
    Suite("gmac128", "rfc4543(gcm(aes))", 20, 16),
    Suite("gmac256", "rfc4543(gcm(aes))", 36, 16),
    Suite("ccm128-icv8", "rfc4309(ccm(aes))", 19, 8),
    Suite("ccm128-icv12", "rfc4309(ccm(aes))", 19, 12),
    Suite("ccm256-icv16", "rfc4309(ccm(aes))", 35, 16),
    Suite("chacha20poly1305", "rfc7539esp(chacha20,poly1305)", 36, 16),
    Suite("aescbc128-sha256", "cbc(aes)", 16, auth="hmac(sha256)", auth_key_len=32, trunc=16),
    Suite("aescbc256-sha256-96", "cbc(aes)", 32, auth="hmac(sha256)", auth_key_len=32, trunc=12),
    Suite("aescbc192-sha1", "cbc(aes)", 24, auth="hmac(sha1)", auth_key_len=20, trunc=12),
    Suite("aescbc128-md5", "cbc(aes)", 16, auth="hmac(md5)", auth_key_len=16, trunc=12),
    Suite("aescbc128-sha384", "cbc(aes)", 16, auth="hmac(sha384)", auth_key_len=48, trunc=24),
    Suite("aescbc128-sha512", "cbc(aes)", 16, auth="hmac(sha512)", auth_key_len=64, trunc=32),
    Suite("aescbc128-noauth", "cbc(aes)", 16),
    Suite("3des-sha1", "cbc(des3_ede)", 24, auth="hmac(sha1)", auth_key_len=20, trunc=12),
    Suite("aesctr128-sha256", "rfc3686(ctr(aes))", 20, auth="hmac(sha256)", auth_key_len=32, trunc=16),
    Suite("aesctr256-sha1", "rfc3686(ctr(aes))", 36, auth="hmac(sha1)", auth_key_len=20, trunc=12),
    Suite("null-sha256", "ecb(cipher_null)", 0, auth="hmac(sha256)", auth_key_len=32, trunc=16),
    Suite("null-sha512", "ecb(cipher_null)", 0, auth="hmac(sha512)", auth_key_len=64, trunc=32),
    # the rest of what the kernel offers (net/xfrm/xfrm_algo.c) and `cryptography` can do
    Suite("des-md5", "cbc(des)", 8, auth="hmac(md5)", auth_key_len=16, trunc=12),
    Suite("blowfish128-sha1", "cbc(blowfish)", 16, auth="hmac(sha1)", auth_key_len=20, trunc=12),
    Suite("blowfish448-noauth", "cbc(blowfish)", 56),
    Suite("cast5-128-sha256", "cbc(cast5)", 16, auth="hmac(sha256)", auth_key_len=32, trunc=16),
    Suite("camellia256-sha512", "cbc(camellia)", 32, auth="hmac(sha512)", auth_key_len=64, trunc=32),
    Suite("sm4-sm3", "cbc(sm4)", 16, auth="hmac(sm3)", auth_key_len=32, trunc=32),
    Suite("aescbc128-xcbc", "cbc(aes)", 16, auth="xcbc(aes)", auth_key_len=16, trunc=12),
    Suite("aescbc128-cmac", "cbc(aes)", 16, auth="cmac(aes)", auth_key_len=16, trunc=12),
    Suite("aescbc128-rmd160", "cbc(aes)", 16, auth="hmac(rmd160)", auth_key_len=20, trunc=12),
]


@dataclass
class Keys:
    suite: Suite
    key: bytes
    auth_key: bytes

    @classmethod
    def random(cls, suite: Suite) -> Keys:
        return cls(suite, os.urandom(suite.key_len), os.urandom(suite.auth_key_len))


def make_sa(keys: Keys, spi: int, src: str, dst: str, *, mode: str = "transport", esn: bool = False,
            natt: bool = False, replay: Replay | None = None) -> SA:
    """The SA as our xfrm sources would describe it."""
    s = keys.suite
    sa = SA(src=src, dst=dst, spi=spi, mode=mode, family=10 if ":" in dst else 2)
    if s.aead:
        sa.aead = Algorithm(s.enc, keys.key, icv_bits=s.icv * 8)
    else:
        sa.enc = Algorithm(s.enc, keys.key)
        if s.auth:
            sa.auth = Algorithm(s.auth, keys.auth_key, trunc_bits=s.trunc * 8)
    if natt:
        sa.encap = Encap()
    sa.replay = replay or Replay(esn=esn)
    if esn:
        sa.replay.esn = True
        sa.flags.append("esn")
    return sa


def _align(suite: Suite) -> int:
    return CBC_CIPHERS[suite.enc][1] if suite.enc in CBC_CIPHERS else 4


def xcbc_mac(key: bytes, data: bytes) -> bytes:
    """AES-XCBC-MAC (RFC 3566 section 4) block by block with AES-ECB, as the RFC writes it."""
    def aes(k: bytes, block: bytes) -> bytes:
        return Cipher(algorithms.AES(k), modes.ECB()).encryptor().update(block)

    k1, k2, k3 = (aes(key, bytes([b]) * 16) for b in (1, 2, 3))
    blocks = [data[i:i + 16] for i in range(0, len(data), 16)] or [b""]
    e = bytes(16)
    for block in blocks[:-1]:
        e = aes(k1, bytes(a ^ b for a, b in zip(block, e, strict=True)))
    last = blocks[-1]
    if len(last) == 16:
        last = bytes(a ^ b for a, b in zip(last, k2, strict=True))
    else:
        padded = last + b"\x80" + bytes(15 - len(last))
        last = bytes(a ^ b for a, b in zip(padded, k3, strict=True))
    return aes(k1, bytes(a ^ b for a, b in zip(last, e, strict=True)))


def mac(name: str, key: bytes, data: bytes) -> bytes:
    """The full ICV of integrity algorithm `name` over `data`."""
    if name == "xcbc(aes)":
        return xcbc_mac(key, data)
    if name == "cmac(aes)":
        c = CMAC(algorithms.AES(key))
        c.update(data)
        return c.finalize()
    return hmac.new(key, data, HMAC_DIGEST[name]).digest()


def seal(keys: Keys, spi: int, seq: int, payload: bytes, next_header: int, *, iv: bytes | None = None,
         esn: bool = False) -> bytes:
    """ESP bytes (header to ICV) for `payload`; `seq` is 64-bit when `esn`."""
    s = keys.suite
    seq_lo, seq_hi = seq & 0xFFFFFFFF, struct.pack("!I", seq >> 32)
    header = struct.pack("!II", spi, seq_lo)
    align = _align(s)
    pad = (-(len(payload) + 2)) % align
    plain = payload + bytes(range(1, pad + 1)) + bytes([pad, next_header])
    aad = header[:4] + seq_hi + header[4:] if esn else header
    if s.aead:
        iv = iv or os.urandom(8)
        if s.enc == "rfc4106(gcm(aes))":
            sealed = AESGCM(keys.key[:-4]).encrypt(keys.key[-4:] + iv, plain, aad)
            return header + iv + sealed[:len(plain) + s.icv]  # a short ICV is the tag's prefix
        if s.enc == "rfc4543(gcm(aes))":
            tag = AESGCM(keys.key[:-4]).encrypt(keys.key[-4:] + iv, b"", aad + iv + plain)
            return header + iv + plain + tag
        if s.enc == "rfc4309(ccm(aes))":
            ccm = AESCCM(keys.key[:-3], tag_length=s.icv)
            return header + iv + ccm.encrypt(keys.key[-3:] + iv, plain, aad)
        return header + iv + ChaCha20Poly1305(keys.key[:-4]).encrypt(keys.key[-4:] + iv, plain, aad)
    if s.enc in CBC_CIPHERS:
        cipher, block = CBC_CIPHERS[s.enc]
        iv = iv or os.urandom(block)
        enc = Cipher(cipher(keys.key), modes.CBC(iv)).encryptor()
    elif s.enc == "rfc3686(ctr(aes))":
        iv = iv or os.urandom(8)
        enc = Cipher(algorithms.AES(keys.key[:-4]), modes.CTR(keys.key[-4:] + iv + b"\0\0\0\1")).encryptor()
    else:
        iv, enc = b"", None
    body = header + iv + (enc.update(plain) + enc.finalize() if enc else plain)
    if not s.auth:
        return body
    icv = mac(s.auth, keys.auth_key, body + (seq_hi if esn else b""))
    return body + icv[:s.trunc]


def outer(esp: bytes, src: str, dst: str, *, natt: bool = False, ext: bool = False) -> bytes:
    """An outer IPv4/IPv6 packet around ESP bytes (ESP-in-UDP 4500 when `natt`; an IPv6
    destination-options header in front when `ext`)."""
    from scapy.layers.inet6 import IPv6ExtHdrDestOpt

    l4 = (UDP(sport=4500, dport=4500) / Raw(esp)) if natt else Raw(esp)
    proto = 17 if natt else 50
    if ":" in dst:
        if ext:
            return bytes(IPv6(src=src, dst=dst) / IPv6ExtHdrDestOpt(nh=proto) / l4)
        return bytes(IPv6(src=src, dst=dst, nh=proto) / l4)
    return bytes(IP(src=src, dst=dst, proto=proto, id=7) / l4)


SCAPY_NAMES = {  # our suite label -> scapy crypt/auth names
    "aescbc128-sha256": ("AES-CBC", "SHA2-256-128"),
    "aescbc192-sha1": ("AES-CBC", "HMAC-SHA1-96"),
    "aescbc128-md5": ("AES-CBC", "HMAC-MD5-96"),
    "aescbc128-sha384": ("AES-CBC", "SHA2-384-192"),
    "aescbc128-sha512": ("AES-CBC", "SHA2-512-256"),
    "3des-sha1": ("3DES", "HMAC-SHA1-96"),
    "aesctr128-sha256": ("AES-CTR", "SHA2-256-128"),
    "null-sha256": ("NULL", "SHA2-256-128"),
}


def scapy_sa(keys: Keys, spi: int, **kw) -> SecurityAssociation:
    """scapy's SA for the same keys (`tunnel_header`, `nat_t_header` pass through)."""
    crypt, auth = SCAPY_NAMES[keys.suite.label]
    return SecurityAssociation(ESP, spi=spi, crypt_algo=crypt, crypt_key=keys.key or None,
                               auth_algo=auth, auth_key=keys.auth_key, **kw)
