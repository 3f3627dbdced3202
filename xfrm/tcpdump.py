"""tcpdump's ESP secrets (`tcpdump -E`), so keys a tcpdump user already has decrypt here too.

The syntax is tcpdump's (print-esp.c): entries separated by newlines or commas, each
`[SPI@DST ]ALGO:SECRET`, where ALGO is an OpenSSL cipher name with `-cbc` optional
(`3des-cbc`, `aes256-cbc`, `des-cbc`, `blowfish-cbc`, `cast128-cbc`, ...) and an optional
`-hmac96` suffix that says a 12-byte ICV follows (tcpdump skips it unchecked, so do we: such
packets come out `ok-unverified`), and SECRET is `0x` + hex or the key's ASCII text. An entry
without `SPI@DST` is the key for every other SPI. `file NAME` reads more entries from NAME (one per
line, `#` comments), relative to the file that names it; `ikev2 ...` lines (IKE keys) are
skipped. tcpdump does CBC only: so does this syntax.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

from ipsec_capture.errors import UserError

from .netlink import AF_INET, AF_INET6
from .sa import ANY_SPI, AUTH_UNCHECKED, ESN_UNKNOWN, MODE_UNKNOWN, SA, Algorithm

# OpenSSL cipher names (after `-cbc` is cut) -> (Linux name, key bytes or None for any)
CIPHERS: dict[str, tuple[str, int | None]] = {
    "des": ("cbc(des)", 8),
    "3des": ("cbc(des3_ede)", 24), "des3": ("cbc(des3_ede)", 24), "des-ede3": ("cbc(des3_ede)", 24),
    "aes": ("cbc(aes)", None), "aes128": ("cbc(aes)", 16), "aes192": ("cbc(aes)", 24),
    "aes256": ("cbc(aes)", 32), "aes-128": ("cbc(aes)", 16), "aes-192": ("cbc(aes)", 24),
    "aes-256": ("cbc(aes)", 32),
    "bf": ("cbc(blowfish)", None), "blowfish": ("cbc(blowfish)", None),
    "cast": ("cbc(cast5)", None), "cast5": ("cbc(cast5)", None), "cast128": ("cbc(cast5)", None),
    "camellia128": ("cbc(camellia)", 16), "camellia192": ("cbc(camellia)", 24),
    "camellia256": ("cbc(camellia)", 32), "camellia-128": ("cbc(camellia)", 16),
    "camellia-192": ("cbc(camellia)", 24), "camellia-256": ("cbc(camellia)", 32),
    "sm4": ("cbc(sm4)", 16),
}
HMAC96 = "-hmac96"  # tcpdump: authlen 12
MAX_FILE_DEPTH = 8  # `file` inside `file`: deeper is a loop
_FIRST = re.compile(r"(?:file|ikev2)\s|\S+@\S+\s+[\w.-]+:|[\w.-]+:\S+\s*(?:,|$)", re.IGNORECASE)


def looks_like_tcpdump(text: str) -> bool:
    """True if the first entry reads like tcpdump's `-E` syntax."""
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            return bool(_FIRST.match(line))
    return False


def _spi(text: str, where: str) -> int:
    try:
        spi = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        raise UserError(f"{where}: bad SPI {text[:20]!r} (hex 0x... or decimal, before the @)") from None
    if not 0 < spi <= 0xFFFFFFFF:
        raise UserError(f"{where}: SPI {text[:20]!r} out of range (1 to 0xffffffff)")
    return spi


def _secret(text: str, where: str) -> bytes:
    if text[:2].lower() == "0x":
        digits = text[2:]
        if not digits or len(digits) % 2:
            raise UserError(f"{where}: the key needs an even number of hex digits after 0x")
        try:
            return bytes.fromhex(digits)
        except ValueError:
            raise UserError(f"{where}: bad hex in the key") from None
    if not text:
        raise UserError(f"{where}: empty key after `ALGO:`")
    return text.encode()  # tcpdump takes a key without 0x as its ASCII bytes


def _entry(entry: str, where: str) -> SA:
    words = entry.split(None, 1)
    target, decode = (None, words[0]) if len(words) == 1 else (words[0], words[1].strip())
    algo, colon, secret = decode.partition(":")
    if not colon:
        raise UserError(f"{where}: expected [SPI@DST] ALGO:KEY, got {entry[:60]!r}")
    name = algo.lower()
    unchecked = name.endswith(HMAC96) and len(name) > len(HMAC96)
    if unchecked:
        name = name[:-len(HMAC96)]
    if name.endswith("-cbc") and len(name) > 4:
        name = name[:-4]
    if name not in CIPHERS:
        raise UserError(f"{where}: unknown tcpdump algorithm {algo[:30]!r} (known: "
                        + ", ".join(sorted({f"{n}-cbc" for n in CIPHERS if "-" not in n}))
                        + ", each optionally with -hmac96)")
    linux, size = CIPHERS[name]
    key = _secret(secret.strip(), where)
    if size is not None and len(key) != size:
        raise UserError(f"{where}: {algo} takes a {size * 8}-bit key, not {len(key) * 8} bits")
    spi, dst, family = ANY_SPI, "*", AF_INET
    if target is not None:
        spi_text, at, addr = target.partition("@")
        if not at:
            raise UserError(f"{where}: expected SPI@DST before the key, got {target[:40]!r}")
        spi = _spi(spi_text, where)
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            raise UserError(f"{where}: not an IP address after @: {addr[:40]!r}") from None
        dst, family = str(ip), AF_INET6 if ip.version == 6 else AF_INET
    sa = SA(src="*", dst=dst, spi=spi, family=family, mode=MODE_UNKNOWN, flags=[ESN_UNKNOWN],
            enc=Algorithm(linux, key))
    if unchecked:
        sa.auth = Algorithm(AUTH_UNCHECKED, b"", trunc_bits=96)
    return sa


def parse_tcpdump(text: str, name: str = "tcpdump secrets", base: str | os.PathLike[str] | None = None,
                  _depth: int = 0) -> list[SA]:
    """SAs from tcpdump `-E` text; `base` is the directory `file NAME` entries are relative to.
    UserError with the line number on anything else."""
    out: list[SA] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{name} line {number}"
        first = line.split(None, 1)[0].lower()
        if first == "ikev2":
            continue  # IKEv2 SA keys: not ESP
        if first == "file":
            out += _include(line.split(None, 1)[1:] or [""], where, base, _depth)
            continue
        for entry in line.split(","):
            if entry.strip():
                out.append(_entry(entry.strip(), where))
    return out


def _include(arg: list[str], where: str, base: str | os.PathLike[str] | None, depth: int) -> list[SA]:
    target = arg[0].strip()
    if not target:
        raise UserError(f"{where}: `file` needs a file name")
    if depth >= MAX_FILE_DEPTH:
        raise UserError(f"{where}: `file {target}` nests more than {MAX_FILE_DEPTH} deep (a loop?)")
    path = Path(target)
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except (OSError, ValueError) as err:  # ValueError: a NUL in the name
        raise UserError(f"{where}: cannot read `file {target[:60]}`: "
                        f"{getattr(err, 'strerror', None) or err}") from None
    return parse_tcpdump(text, os.fspath(path), path.parent, depth + 1)
