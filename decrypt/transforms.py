"""The ESP transforms, from Linux algorithm names to `cryptography` objects built once per SA.

Each transform opens one ESP packet (bytes from the SPI to the end of the ICV) and writes the
decrypted payload with its trailer into the caller's buffer, or says the ICV does not verify.
Keys are laid out as the kernel holds them (XFRMA_ALG_AEAD / XFRMA_ALG_CRYPT in <linux/xfrm.h>):
AEAD and CTR keys end with their salt or nonce. Construction is per SA; the per-packet path
reuses the cipher objects (AESGCM, ChaCha20Poly1305, AESCCM, one CBC context, a keyed HMAC)
because building them per packet costs more than the crypto itself.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, overload

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.decrepit.ciphers.algorithms import CAST5, Blowfish, Camellia, TripleDES
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import BlockCipherAlgorithm, Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.cmac import CMAC
from cryptography.hazmat.primitives.hmac import HMAC

from ipsec_capture.xfrm.sa import AUTH_UNCHECKED, NULL_AUTH, SA, Algorithm


class UnsupportedSA(ValueError):
    """The SA uses a transform we do not implement, or its key does not fit the transform."""


_COUNTER_ONE = b"\x00\x00\x00\x01"  # RFC 3686 section 4: the block counter starts at 1


OpenInto = Callable[[memoryview, int, bytes | None, memoryview, int], int]


@dataclass(slots=True)
class Transform:
    """One SA's cipher and integrity check.

    `open(pkt, pos, seq_hi, out, at)` opens the ESP packet (header, IV, ciphertext, ICV) at
    `pkt[pos:]` (the transform slices what it needs: a view of the ESP part alone would cost every
    packet one more) and writes its plaintext (payload, padding, pad length, next header) into
    `out` so that the plaintext starts at `out[at]`; it returns the plaintext's length, or -1 on
    an ICV mismatch. Writing into the caller's buffer is the point: the decrypt pipeline gives the
    place in its pcapng buffer where the packet goes, so the plaintext is written once, where it
    stays. `out` must have a cipher block (at most 16 bytes) before `at` (CBC deciphers the IV
    block there) and `len(pkt) - pos + block` after it. `seq_hi` is the 4 high sequence bytes
    for ESN SAs, else None. `block` is the alignment the ciphertext must have; `authenticated`
    says whether a -1 can happen at all.
    """

    name: str
    iv_len: int
    icv_len: int
    block: int
    authenticated: bool
    open: OpenInto
    # RFC 4106 / 4309 / 7634 AEADs: (the cipher's decrypt_into, salt), for the decoder's fast lane
    aead: tuple[Callable[..., int], bytes] | None = None
    overhead: int = field(init=False)  # ESP header + IV + ICV: what the ciphertext is not

    def __post_init__(self) -> None:
        self.overhead = 8 + self.iv_len + self.icv_len


# the header itself (a view) without ESN, new bytes with it: GMAC's AAD concatenates the latter
@overload
def _aad(pkt: memoryview, pos: int, seq_hi: None) -> memoryview: ...


@overload
def _aad(pkt: memoryview, pos: int, seq_hi: bytes) -> bytes: ...


@overload
def _aad(pkt: memoryview, pos: int, seq_hi: bytes | None) -> bytes | memoryview: ...


def _aad(pkt: memoryview, pos: int, seq_hi: bytes | None) -> bytes | memoryview:
    """AEAD associated data: SPI + seq, or SPI + seq-hi + seq-lo for ESN (RFC 4106 section 5).
    Without ESN it is the header as it is, a view: no copy (the AEADs take any buffer)."""
    if seq_hi is None:
        return pkt[pos:pos + 8]
    return bytes(pkt[pos:pos + 4]) + seq_hi + bytes(pkt[pos + 4:pos + 8])


def _copied(plain: bytes | memoryview | None, out: memoryview, at: int) -> int:
    """Place a plaintext computed elsewhere (a cipher without an `_into` form) at `out[at]`."""
    if plain is None:
        return -1
    out[at:at + len(plain)] = plain
    return len(plain)


def _aead(name: str, aead: AESGCM | AESCCM | ChaCha20Poly1305, salt: bytes, icv: int) -> Transform:
    """The RFC 4106 / 4309 / 7634 layout: nonce = salt + 8-byte IV, AAD = ESP header, the
    ciphertext and ICV follow the IV; decrypted straight into the caller's buffer."""
    decrypt_into = aead.decrypt_into
    after = 16 + icv  # header, IV and ICV around the ciphertext

    def open_aead(pkt: memoryview, pos: int, seq_hi: bytes | None, out: memoryview, at: int) -> int:
        n = len(pkt) - pos - after
        try:
            decrypt_into(salt + pkt[pos + 8:pos + 16], pkt[pos + 16:],
                         pkt[pos:pos + 8] if seq_hi is None else _aad(pkt, pos, seq_hi), out[at:at + n])
        except InvalidTag:
            return -1
        return n

    return Transform(name, 8, icv, 4, True, open_aead, aead=(decrypt_into, salt))


def _split_salt(alg: Algorithm, salt_len: int, key_lens: tuple[int, ...]) -> tuple[bytes, bytes]:
    key, salt = alg.key[:-salt_len], alg.key[-salt_len:]
    if len(key) not in key_lens:
        raise UnsupportedSA(
            f"{alg.name}: key is {len(alg.key) * 8} bits, expected "
            + " or ".join(str((k + salt_len) * 8) for k in key_lens)
            + f" (cipher key plus {salt_len * 8}-bit salt)")
    return key, salt


def _icv_len(alg: Algorithm, allowed: tuple[int, ...], default: int) -> int:
    bits = alg.icv_bits or alg.trunc_bits or default * 8
    if bits % 8 or bits // 8 not in allowed:
        raise UnsupportedSA(f"{alg.name}: ICV of {bits} bits is not one of "
                            + ", ".join(str(a * 8) for a in allowed))
    return bits // 8


def _gcm(alg: Algorithm) -> Transform:
    """rfc4106(gcm(aes)): nonce = 4-byte salt + 8-byte IV; ICV 8, 12 or 16 bytes."""
    key, salt = _split_salt(alg, 4, (16, 24, 32))
    icv = _icv_len(alg, (8, 12, 16), 16)
    if icv == 16:
        return _aead(alg.name, AESGCM(key), salt, 16)
    aes = algorithms.AES(key)

    def open_short(pkt: memoryview, pos: int, seq_hi: bytes | None, out: memoryview, at: int) -> int:
        # AESGCM insists on a 16-byte tag; the streaming API takes a truncated one.
        dec = Cipher(aes, modes.GCM(salt + bytes(pkt[pos + 8:pos + 16]), bytes(pkt[-icv:]),
                                    min_tag_length=icv)).decryptor()
        dec.authenticate_additional_data(_aad(pkt, pos, seq_hi))
        plain = dec.update(pkt[pos + 16:-icv])
        try:
            dec.finalize()
        except InvalidTag:
            return -1
        return _copied(plain, out, at)

    return Transform(alg.name, 8, icv, 4, True, open_short)


def _gmac(alg: Algorithm) -> Transform:
    """rfc4543(gcm(aes)): GMAC only; the payload travels in clear and is authenticated as AAD
    together with the header and IV (RFC 4543 section 3.5). Without the key the payload is still
    readable: the ICV is skipped, unchecked."""
    icv = _icv_len(alg, (16,), 16)
    if not alg.key:
        def open_clear(pkt: memoryview, pos: int, seq_hi: bytes | None, out: memoryview, at: int) -> int:
            return _copied(pkt[pos + 16:len(pkt) - icv], out, at)

        return Transform(alg.name, 8, icv, 4, False, open_clear)
    key, salt = _split_salt(alg, 4, (16, 24, 32))
    aead = AESGCM(key)

    def open_gmac(pkt: memoryview, pos: int, seq_hi: bytes | None, out: memoryview, at: int) -> int:
        try:
            # AAD = header (+ ESN high bits), IV, payload: without ESN, the ESP packet up to the ICV
            aad = pkt[pos:-16] if seq_hi is None else _aad(pkt, pos, seq_hi) + pkt[pos + 8:-16]
            aead.decrypt(salt + pkt[pos + 8:pos + 16], pkt[-16:], aad)
        except InvalidTag:
            return -1
        return _copied(pkt[pos + 16:-16], out, at)

    return Transform(alg.name, 8, 16, 4, True, open_gmac)


def _ccm(alg: Algorithm) -> Transform:
    """rfc4309(ccm(aes)): nonce = 3-byte salt + 8-byte IV; ICV 8, 12 or 16 bytes."""
    key, salt = _split_salt(alg, 3, (16, 24, 32))
    icv = _icv_len(alg, (8, 12, 16), 16)
    return _aead(alg.name, AESCCM(key, tag_length=icv), salt, icv)


def _chacha(alg: Algorithm) -> Transform:
    """rfc7539esp(chacha20,poly1305) (RFC 7634): nonce = 4-byte salt + 8-byte IV, 16-byte ICV."""
    key, salt = _split_salt(alg, 4, (32,))
    _icv_len(alg, (16,), 16)
    return _aead(alg.name, ChaCha20Poly1305(key), salt, 16)


# Integrity: Linux name (and the short names `ip xfrm` also takes) -> (hash, full digest bytes).
_HMACS = {
    "hmac(md5)": (hashes.MD5, 16), "md5": (hashes.MD5, 16),
    "hmac(sha1)": (hashes.SHA1, 20), "sha1": (hashes.SHA1, 20),
    "hmac(sha256)": (hashes.SHA256, 32), "sha256": (hashes.SHA256, 32),
    "hmac(sha384)": (hashes.SHA384, 48), "sha384": (hashes.SHA384, 48),
    "hmac(sha512)": (hashes.SHA512, 64), "sha512": (hashes.SHA512, 64),
    "hmac(sm3)": (hashes.SM3, 32), "sm3": (hashes.SM3, 32),
}
_RMD160 = ("hmac(rmd160)", "rmd160", "ripemd160")  # not in `cryptography`: hashlib's, where OpenSSL has it
_XCBC = ("xcbc(aes)",)  # RFC 3566 AES-XCBC-MAC-96
_CMAC = ("cmac(aes)",)  # RFC 4494 AES-CMAC-96
# Default truncations in bytes when the SA gives none (RFC 2403/2404/4868, net/xfrm/xfrm_algo.c).
_DEFAULT_TRUNC = {16: 12, 20: 12, 32: 16, 48: 24, 64: 32}

# (IV + ciphertext, out, at) -> plaintext length: the plaintext is written from out[at] on (a
# CBC decipher writes its IV block's garbage in the block before), with room for one block
# more than the input after `at`
Decipher = Callable[[memoryview, memoryview, int], int]


def _cbc(cipher_alg: BlockCipherAlgorithm, block: int) -> Decipher:
    """CBC on one decryptor kept for the SA's life. Its chaining state after a packet is that
    packet's last block, but we feed IV + ciphertext and write the first output block in front
    of `at`, where nothing reads it: block i is D(C[i]) xor C[i-1] with C[0] = IV, whatever came before.
    Nothing is built per packet: a fresh CBC context costs about as much as decrypting 1400
    bytes. (update_into wants block - 1 bytes of room past the output.)"""
    update_into = Cipher(cipher_alg, modes.CBC(b"\0" * block)).decryptor().update_into

    def decipher(iv_and_ct: memoryview, out: memoryview, at: int) -> int:
        n = len(iv_and_ct)
        update_into(iv_and_ct, out[at - block:at + n - 1])
        return n - block

    return decipher


def _ctr(key: bytes, nonce: bytes) -> Decipher:
    aes = algorithms.AES(key)

    def decipher(iv_and_ct: memoryview, out: memoryview, at: int) -> int:
        dec = Cipher(aes, modes.CTR(nonce + bytes(iv_and_ct[:8]) + _COUNTER_ONE)).decryptor()
        n = len(iv_and_ct) - 8
        dec.update_into(iv_and_ct[8:], out[at:at + n + 15])
        return n

    return decipher


def _plain(iv_and_ct: memoryview, out: memoryview, at: int) -> int:
    return _copied(iv_and_ct, out, at)


# CBC ciphers the kernel offers (net/xfrm/xfrm_algo.c ealg_list; the short names are what
# `ip xfrm state add ... enc NAME` also accepts): (cipher class, block bytes, key bytes allowed).
# DES is 3DES with K1 = K2 = K3 (`cryptography` has no single DES, and its 8-byte TripleDES is deprecated).
_CBC: dict[str, tuple[Callable[[bytes], BlockCipherAlgorithm], int, tuple[int, ...]]] = {
    "cbc(aes)": (algorithms.AES, 16, (16, 24, 32)),
    "cbc(des3_ede)": (TripleDES, 8, (24,)),
    "cbc(des)": (lambda key: TripleDES(key * 3), 8, (8,)),
    "cbc(blowfish)": (Blowfish, 8, tuple(range(5, 57))),  # 40-448 bits
    "cbc(cast5)": (CAST5, 8, tuple(range(5, 17))),  # 40-128 bits
    "cbc(camellia)": (Camellia, 16, (16, 24, 32)),
    "cbc(sm4)": (algorithms.SM4, 16, (16,)),
}
_CBC_ALIASES = {"aes": "cbc(aes)", "des3_ede": "cbc(des3_ede)", "des": "cbc(des)",
                "blowfish": "cbc(blowfish)", "cast5": "cbc(cast5)", "cast-128": "cbc(cast5)",
                "camellia": "cbc(camellia)", "sm4": "cbc(sm4)"}
# offered by the kernel, not by `cryptography`: named in the `unsupported` detail
_NOT_IN_CRYPTOGRAPHY = ("cbc(serpent)", "serpent", "cbc(twofish)", "twofish")


def _cipher(alg: Algorithm) -> tuple[Decipher, int, int]:
    """(decipher, IV length, block alignment) for a non-AEAD encryption algorithm."""
    name = alg.name
    if name in ("ecb(cipher_null)", "cipher_null", "null"):
        return _plain, 0, 4
    cbc = _CBC.get(_CBC_ALIASES.get(name, name))
    if cbc is not None:
        make, block, sizes = cbc
        if not alg.key:
            raise UnsupportedSA(f"{name}: the key file holds no key for it")
        if len(alg.key) not in sizes:
            raise UnsupportedSA(f"{name}: key of {len(alg.key) * 8} bits, expected "
                                + (" or ".join(str(k * 8) for k in sizes) if len(sizes) < 4
                                   else f"{sizes[0] * 8} to {sizes[-1] * 8}"))
        return _cbc(make(alg.key), block), block, block
    if name == "rfc3686(ctr(aes))":
        key, nonce = _split_salt(alg, 4, (16, 24, 32))
        return _ctr(key, nonce), 8, 4
    if name in _NOT_IN_CRYPTOGRAPHY:
        raise UnsupportedSA(f"encryption {name} is not supported (the `cryptography` library has no {name})")
    raise UnsupportedSA(f"encryption {name} is not supported")


class _Mac:
    """A keyed MAC to copy per packet: `copy()` gives an object with `update` and `finalize`."""

    __slots__ = ("copy", "digest_size")

    def __init__(self, copy: Callable[[], Any], digest_size: int) -> None:
        self.copy, self.digest_size = copy, digest_size


class _HashlibHmac:
    """Python's hmac (for RIPEMD-160, which `cryptography` lacks) in the HMAC object's shape."""

    __slots__ = ("_h",)

    def __init__(self, h: Any) -> None:
        self._h = h

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def finalize(self) -> bytes:
        return self._h.digest()


class _Xcbc:
    """AES-XCBC-MAC (RFC 3566): CBC-MAC under K1 with the last block xored with K2 (whole) or
    padded 10* and xored with K3."""

    __slots__ = ("_data", "_k1", "_k2", "_k3")

    def __init__(self, key: bytes) -> None:
        ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        self._k1, self._k2, self._k3 = (ecb.update(bytes([b]) * 16) for b in (1, 2, 3))
        self._data = bytearray()

    def copy(self) -> _Xcbc:
        other = _Xcbc.__new__(_Xcbc)
        other._k1, other._k2, other._k3, other._data = self._k1, self._k2, self._k3, bytearray()
        return other

    def update(self, data: bytes | memoryview) -> None:
        self._data += data

    def finalize(self) -> bytes:
        data = bytes(self._data)
        n = len(data)
        if n and not n % 16:
            body, last, pad = data[:-16], data[-16:], self._k2
        else:
            cut = n - n % 16
            tail = data[cut:] + b"\x80"
            body, last, pad = data[:cut], tail + bytes(16 - len(tail)), self._k3
        last = bytes(a ^ b for a, b in zip(last, pad, strict=True))
        enc = Cipher(algorithms.AES(self._k1), modes.CBC(bytes(16))).encryptor()
        return enc.update(body + last)[-16:]


def _integrity(alg: Algorithm | None) -> tuple[_Mac | None, int]:
    """(keyed MAC to copy per packet, ICV length), (None, 0) for no integrity, or (None, n) for
    an ICV of n bytes that is skipped unchecked. Copying a keyed HMAC skips the key schedule and
    takes memoryviews without a copy of the packet."""
    if alg is None or alg.name in NULL_AUTH:
        return None, 0
    if alg.name == AUTH_UNCHECKED:
        bits = alg.trunc_bits or 96
        if bits % 8 or not 0 < bits <= 512:
            raise UnsupportedSA(f"an unchecked ICV of {bits} bits is impossible")
        return None, bits // 8
    if not alg.key:
        raise UnsupportedSA(f"integrity {alg.name}: the key file holds no key for it")
    name = alg.name
    if name in _HMACS:
        digest, full = _HMACS[name]
        mac = HMAC(alg.key, digest())
        keyed = _Mac(mac.copy, full)
    elif name in _RMD160:
        try:
            base = hmac.new(alg.key, digestmod="ripemd160")
        except ValueError:
            raise UnsupportedSA(f"integrity {name}: this machine's OpenSSL has no RIPEMD-160") from None
        full = 20
        keyed = _Mac(lambda: _HashlibHmac(base.copy()), full)
    elif name in _XCBC or name in _CMAC:
        if len(alg.key) != 16:
            raise UnsupportedSA(f"integrity {name}: key of {len(alg.key) * 8} bits, expected 128")
        full = 16
        if name in _XCBC:
            xcbc = _Xcbc(alg.key)
            keyed = _Mac(xcbc.copy, full)
        else:
            cmac = CMAC(algorithms.AES(alg.key))
            keyed = _Mac(cmac.copy, full)
    else:
        raise UnsupportedSA(f"integrity {name} is not supported")
    bits = alg.trunc_bits or _DEFAULT_TRUNC[full] * 8
    if bits % 8 or not 0 < bits // 8 <= full:
        raise UnsupportedSA(f"{name}: truncation to {bits} bits is impossible")
    return keyed, bits // 8


def _enc_auth(enc: Algorithm, auth: Algorithm | None) -> Transform:
    decipher, iv_len, block = _cipher(enc)
    mac, icv = _integrity(auth)
    name = enc.name + (f"+{auth.name}" if auth is not None and icv else "")

    if mac is None:
        if icv:  # an ICV we cannot check: skipped
            def open_unchecked(pkt: memoryview, pos: int, seq_hi: bytes | None, out: memoryview,
                               at: int) -> int:
                return decipher(pkt[pos + 8:len(pkt) - icv], out, at)

            return Transform(name, iv_len, icv, block, False, open_unchecked)

        def open_plain(pkt: memoryview, pos: int, seq_hi: bytes | None, out: memoryview, at: int) -> int:
            return decipher(pkt[pos + 8:], out, at)

        return Transform(name, iv_len, 0, block, False, open_plain)

    full = mac.digest_size
    copy = mac.copy
    compare = hmac.compare_digest

    def open_auth(pkt: memoryview, pos: int, seq_hi: bytes | None, out: memoryview, at: int) -> int:
        # RFC 4303 section 3.3.2: the ICV covers header, IV and ciphertext; with ESN the high
        # sequence bits are appended to that (they are not sent).
        h = copy()
        h.update(pkt[pos:-icv])
        if seq_hi is not None:
            h.update(seq_hi)
        digest = h.finalize()
        if not compare(digest[:icv] if icv < full else digest, pkt[-icv:]):
            return -1
        return decipher(pkt[pos + 8:-icv], out, at)

    return Transform(name, iv_len, icv, block, True, open_auth)


_AEADS: dict[str, Callable[[Algorithm], Transform]] = {
    "rfc4106(gcm(aes))": _gcm,
    "rfc4543(gcm(aes))": _gmac,
    "rfc4309(ccm(aes))": _ccm,
    "rfc7539esp(chacha20,poly1305)": _chacha,
}


def transform_for(sa: SA) -> Transform:
    """Build the transform of an SA once; raise UnsupportedSA with the reason otherwise."""
    try:
        if sa.aead is not None:
            build = _AEADS.get(sa.aead.name)
            if build is None:
                raise UnsupportedSA(f"AEAD {sa.aead.name} is not supported")
            if not sa.aead.key and build is not _gmac:
                raise UnsupportedSA(f"{sa.aead.name}: the key file holds no key for it")
            return build(sa.aead)
        if sa.enc is None:
            if sa.auth is None:
                raise UnsupportedSA("SA has neither encryption nor AEAD")
            return _enc_auth(Algorithm("ecb(cipher_null)"), sa.auth)
        return _enc_auth(sa.enc, sa.auth)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:  # a key `cryptography` refuses
        if isinstance(err, UnsupportedSA):
            raise
        raise UnsupportedSA(f"{type(err).__name__}: {err}") from None
