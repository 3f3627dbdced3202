"""Wireshark's `esp_sa` table (the ESP SA dialog, saved in a profile as the file `esp_sa`).

Wireshark 4.0 (Debian 12) reads 8 quoted CSV columns: Protocol, Src IP, Dest IP, SPI,
Encryption, Encryption Key, Authentication, Authentication Key. Newer releases read 10 (plus
"SN" 32-bit/64-bit and "ESN High Bits"). A row with a name Wireshark does not know makes it
reject the whole table, so every Linux algorithm is mapped here to a name this Wireshark knows,
and what it cannot decrypt (CCM, GMAC, ChaCha20 on 4.0) is written as NULL encryption with
unchecked ICV of the right length, plus a warning, so the other rows still work.
Names are listed in shared/DESIGN.md section 4 and were checked against tshark 4.0.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ipsec_capture.errors import UserError
from ipsec_capture.wire import IPPROTO_ESP

from .netlink import AF_INET, AF_INET6
from .sa import ESN_UNKNOWN, MODE_UNKNOWN, SA, Algorithm, Replay

GCM = "rfc4106(gcm(aes))"
# Linux cipher -> Wireshark encryption name (packet-ipsec.c value strings)
ENC_NAMES = {
    "cbc(aes)": "AES-CBC [RFC3602]",
    "rfc3686(ctr(aes))": "AES-CTR [RFC3686]",
    "cbc(des3_ede)": "TripleDES-CBC [RFC2451]",
    "cbc(des)": "DES-CBC [RFC2405]",
    "cbc(cast5)": "CAST5-CBC [RFC2144]",
    "cbc(blowfish)": "BLOWFISH-CBC [RFC2451]",
    "cbc(twofish)": "TWOFISH-CBC",
    "ecb(cipher_null)": "NULL",
    "cipher_null": "NULL",
}
GCM_NAMES = {64: "AES-GCM with 8 octet ICV [RFC4106]", 96: "AES-GCM with 12 octet ICV [RFC4106]",
             128: "AES-GCM with 16 octet ICV [RFC4106]"}
CHACHA = "rfc7539esp(chacha20,poly1305)"
CHACHA_NAME = "ChaCha20 with Poly1305 [RFC7634]"  # Wireshark >= 4.2 only
# (Linux hash, truncation bits) -> Wireshark authentication name
AUTH_NAMES = {
    ("hmac(sha1)", 96): "HMAC-SHA-1-96 [RFC2404]",
    ("hmac(sha256)", 128): "HMAC-SHA-256-128 [RFC4868]",
    ("hmac(sha256)", 96): "HMAC-SHA-256-96 [draft-ietf-ipsec-ciph-sha-256-00]",
    ("hmac(sha384)", 192): "HMAC-SHA-384-192 [RFC4868]",
    ("hmac(sha512)", 256): "HMAC-SHA-512-256 [RFC4868]",
    ("hmac(md5)", 96): "HMAC-MD5-96 [RFC2403]",
    ("hmac(rmd160)", 96): "MAC-RIPEMD-160-96 [RFC2857]",
}
# the kernel's truncation when a state was added with plain `auth` (net/xfrm/xfrm_algo.c icv_truncbits)
DEFAULT_TRUNC = {"hmac(md5)": 96, "hmac(sha1)": 96, "hmac(sha256)": 96, "hmac(sha384)": 192,
                 "hmac(sha512)": 256, "hmac(rmd160)": 96, "xcbc(aes)": 96, "cmac(aes)": 96}
ANY_BITS = (64, 96, 128, 192, 256)
ANY_AUTH = "ANY {} bit authentication [no checking]"
_ANY_RE = re.compile(r"ANY (\d+) bit authentication \[no checking\]$")
PROTOCOLS = {AF_INET: "IPv4", AF_INET6: "IPv6"}
HEADER_8 = ("Protocol", "Src IP", "Dest IP", "SPI", "Encryption", "Encryption Key",
            "Authentication", "Authentication Key")
TSHARK_PREFS = ("-o", "esp.enable_encryption_decode:TRUE", "-o", "esp.enable_authentication_check:TRUE")

_ENC_BACK = {v: k for k, v in ENC_NAMES.items() if k != "cipher_null"}
_AUTH_BACK = {v: k for k, v in AUTH_NAMES.items()}
_GCM_BACK = {v: k for k, v in GCM_NAMES.items()}


@dataclass(slots=True)
class Row:
    """One esp_sa row, as strings in Wireshark's column order, and why it may not decrypt."""

    fields: list[str]
    warnings: list[str] = field(default_factory=list)


def _hexkey(key: bytes) -> str:
    return "0x" + key.hex() if key else ""


def _any_auth(bits: int | None) -> str:
    return ANY_AUTH.format(min(ANY_BITS, key=lambda b: abs(b - (bits or 128))))


def sa_row(sa: SA, columns: int = 8, wildcard: str = "auto") -> Row | None:
    """The row for one SA, or None for non-ESP SAs (AH, IPComp: Wireshark has no table for them).

    `wildcard`: "auto" puts `*` for the addresses of NAT-T SAs (the addresses the capture sees
    differ from the SA's behind a NAT, and MOBIKE moves them), "all" for every SA, "none" never.
    """
    if sa.proto != IPPROTO_ESP:
        return None
    tag = f"SPI 0x{sa.spi:08x}"
    warnings: list[str] = []
    auth_name, auth_key = "NULL", ""
    if sa.aead is not None:
        a = sa.aead
        if a.name == GCM and a.icv_bits in GCM_NAMES:
            enc_name = GCM_NAMES[a.icv_bits]
        elif a.name == CHACHA and columns >= 10:
            enc_name = CHACHA_NAME
        else:
            enc_name, auth_name = "NULL", _any_auth(a.icv_bits)
            why = "Wireshark 4.0" if a.name == CHACHA else "Wireshark"
            warnings.append(f"{tag}: {why} cannot decrypt {a.name} (ICV {a.icv_bits} bits): "
                            "written as NULL with an unchecked ICV; use `ipsec-capture decrypt`")
        enc_key = _hexkey(a.key) if enc_name != "NULL" else ""
    else:
        enc = sa.enc or Algorithm("ecb(cipher_null)")
        if enc.name in ENC_NAMES:
            enc_name, enc_key = ENC_NAMES[enc.name], _hexkey(enc.key)
        else:
            enc_name, enc_key = "NULL", ""
            warnings.append(f"{tag}: Wireshark cannot decrypt {enc.name}: written as NULL; use "
                            "`ipsec-capture decrypt`")
        if enc_name == "NULL":
            enc_key = ""
        if sa.auth is not None and sa.auth.name not in ("digest_null", ""):
            bits = sa.auth.trunc_bits or DEFAULT_TRUNC.get(sa.auth.name)
            name = AUTH_NAMES.get((sa.auth.name, bits or 0))
            if name is None:
                auth_name = _any_auth(bits)
                warnings.append(f"{tag}: Wireshark cannot check {sa.auth.name} truncated to {bits} "
                                f"bits: ICV written as `{auth_name}`")
            else:
                auth_name, auth_key = name, _hexkey(sa.auth.key)
    src, dst = sa.src, sa.dst
    if wildcard == "all" or (wildcard == "auto" and sa.encap is not None):
        src = dst = "*"
    if src in ("0.0.0.0", "::"):
        src = "*"
    fields = [PROTOCOLS.get(sa.family or (AF_INET6 if ":" in sa.dst else AF_INET), "IPv4"), src, dst,
              f"0x{sa.spi:08x}", enc_name, enc_key, auth_name, auth_key]
    if columns >= 10:
        high = sa.replay.seq_hi or sa.replay.oseq_hi
        fields += ["64-bit" if sa.esn else "32-bit", f"{high:x}"]
    elif sa.esn:
        # the ICV (and GCM's AAD) covers the high 32 bits even while they are 0
        warnings.append(f"{tag}: uses ESN (high bits {sa.replay.seq_hi or sa.replay.oseq_hi}), which the "
                        "8-column table of Wireshark < 4.2 cannot express: Wireshark's ICV check fails "
                        "on this SA (`ipsec-capture decrypt` finds ESN by itself)")
    return Row(fields, warnings)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def rows(sas: Iterable[SA], columns: int = 8, wildcard: str = "auto") -> list[Row]:
    if columns not in (8, 10):
        raise UserError(f"Wireshark esp_sa has 8 or 10 columns, not {columns}")
    return [r for sa in sas if (r := sa_row(sa, columns, wildcard)) is not None]


def write_esp_sa(sas: Iterable[SA], columns: int = 8, wildcard: str = "auto") -> str:
    """The esp_sa file for `sas` (ESP SAs only). Warnings: see `warnings_for`."""
    lines = ["# Wireshark esp_sa table written by ipsec-capture (contains keys: keep it private)",
             f"# {len(HEADER_8) if columns == 8 else 10} columns; Wireshark "
             f"{'4.0/4.1' if columns == 8 else '>= 4.2'}"]
    lines += [",".join(_quote(f) for f in r.fields) for r in rows(sas, columns, wildcard)]
    return "\n".join(lines) + "\n"


def warnings_for(sas: Iterable[SA], columns: int = 8) -> list[str]:
    """Why some SAs will not decrypt (or not check) in Wireshark, one line each."""
    return [w for r in rows(sas, columns) for w in r.warnings]


def tshark_args(sas: Iterable[SA], columns: int = 8, wildcard: str = "auto") -> list[str]:
    """tshark/wireshark arguments that load the table without touching any profile."""
    out = list(TSHARK_PREFS)
    for r in rows(sas, columns, wildcard):
        out += ["-o", "uat:esp_sa:" + ",".join(_quote(f) for f in r.fields)]
    return out


# --- reading -------------------------------------------------------------------------------

def _key(text: str, where: str) -> bytes:
    if not text:
        return b""
    if not text.lower().startswith("0x"):
        return text.encode()  # Wireshark takes a non-0x key as ASCII
    digits = text[2:]
    if len(digits) % 2:
        digits = "0" + digits
    try:
        return bytes.fromhex(digits)
    except ValueError:
        raise UserError(f"{where}: bad hex key") from None


def _row_to_sa(fields: list[str], where: str) -> SA:
    proto, src, dst, spi_text, enc_name, enc_key, auth_name, auth_key = fields[:8]
    family = {"IPv4": AF_INET, "IPv6": AF_INET6}.get(proto)
    if family is None:
        raise UserError(f"{where}: protocol must be IPv4 or IPv6, not {proto!r}")
    try:
        spi = int(spi_text, 16) if spi_text.lower().startswith("0x") else int(spi_text)
    except ValueError:
        raise UserError(f"{where}: bad SPI {spi_text!r} (a wildcard SPI cannot be used)") from None
    if not 0 <= spi <= 0xFFFFFFFF:
        raise UserError(f"{where}: SPI out of range")
    # A Wireshark table does not say tunnel or transport: mode "" lets the decoder decide per
    # packet from the next header, as Wireshark does.
    sa = SA(src=src or "*", dst=dst or "*", spi=spi, family=family, mode=MODE_UNKNOWN)
    if enc_name in _GCM_BACK:
        sa.aead = Algorithm(GCM, _key(enc_key, where), icv_bits=_GCM_BACK[enc_name])
    elif enc_name == CHACHA_NAME:
        sa.aead = Algorithm(CHACHA, _key(enc_key, where), icv_bits=128)
    elif enc_name in _ENC_BACK:
        sa.enc = Algorithm(_ENC_BACK[enc_name], _key(enc_key, where))
    else:
        raise UserError(f"{where}: unknown Wireshark encryption {enc_name!r}")
    if auth_name in _AUTH_BACK:
        name, bits = _AUTH_BACK[auth_name]
        sa.auth = Algorithm(name, _key(auth_key, where), trunc_bits=bits)
    elif m := _ANY_RE.match(auth_name):
        sa.auth = Algorithm("unknown", _key(auth_key, where), trunc_bits=int(m.group(1)))
    elif auth_name != "NULL":
        raise UserError(f"{where}: unknown Wireshark authentication {auth_name!r}")
    if len(fields) >= 10:
        sa.replay = Replay(esn=fields[8] == "64-bit")
        try:
            sa.replay.seq_hi = int(fields[9], 16) if fields[9] else 0
        except ValueError:
            raise UserError(f"{where}: bad ESN high bits {fields[9]!r}") from None
        if sa.replay.esn:
            sa.flags.append("esn")
    else:
        sa.flags.append(ESN_UNKNOWN)
    return sa


def read_esp_sa(text: str) -> list[SA]:
    """SAs from an esp_sa file (8 or 10 columns), algorithm names mapped back to Linux names.

    Wildcard addresses come back as "*". Unknown names or a wrong column count raise UserError
    with the line number.
    """
    out: list[SA] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"esp_sa line {number}"
        try:
            fields = next(csv.reader(io.StringIO(stripped), escapechar="\\", doublequote=False,
                                     strict=True))
        except (csv.Error, StopIteration):
            raise UserError(f"{where}: not a quoted CSV row") from None
        if len(fields) not in (8, 10):
            raise UserError(f"{where}: {len(fields)} columns; Wireshark's esp_sa has 8 or 10")
        out.append(_row_to_sa(fields, where))
    return out


def looks_like_esp_sa(text: str) -> bool:
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            return s.startswith('"')
    return False


# --- the installed Wireshark ---------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def wireshark_version() -> tuple[int, int] | None:
    """The installed Wireshark's (major, minor). dumpcap answers first: it ships in the same
    package set with the same version and starts in 15 ms, where tshark loads every dissector
    (0.4 s here, 6 s under TCG) - and `start` asks before it prints `ready`."""
    for tool in ("dumpcap", "tshark"):
        exe = shutil.which(tool)
        if exe is None:
            continue
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        m = re.search(r"\(Wireshark\) (\d+)\.(\d+)", out) or re.search(r"TShark \S* ?(\d+)\.(\d+)", out)
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def wireshark_columns() -> int:
    """10 for Wireshark >= 4.2 (SN / ESN High Bits columns), else 8 (also when tshark is absent)."""
    version = wireshark_version()
    return 10 if version is not None and version >= (4, 2) else 8


def columns_for(choice: str | int | None) -> int:
    """`--wireshark-format 8|10|auto` -> 8 or 10."""
    if choice in (None, "auto"):
        return wireshark_columns()
    if str(choice) in ("8", "10"):
        return int(choice)
    raise UserError(f"--wireshark-format must be 8, 10 or auto, not {choice!r}")


def write_private(path: str | os.PathLike[str], text: str) -> None:
    """Write atomically with mode 0600 from the first byte (the file holds keys)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def profile_dir(name: str) -> Path:
    """Where Wireshark keeps profile NAME for this user ($XDG_CONFIG_HOME/wireshark/profiles)."""
    if not name or "/" in name or name in (".", ".."):
        raise UserError(f"bad Wireshark profile name {name!r}")
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "wireshark" / "profiles" / name


def install_profile(name: str, text: str) -> Path:
    """Put the table into profile NAME and switch ESP decryption on there.

    `wireshark -C NAME -r out.pcapng` then decrypts with no dialog. Existing preferences of the
    profile are kept; only the esp.* lines are replaced.
    """
    pdir = profile_dir(name)
    pdir.mkdir(parents=True, exist_ok=True)
    write_private(pdir / "esp_sa", text)
    prefs = pdir / "preferences"
    old = prefs.read_text().splitlines() if prefs.exists() else []
    keep = [line for line in old if not line.startswith(("esp.enable_encryption_decode:",
                                                          "esp.enable_authentication_check:"))]
    keep += ["esp.enable_encryption_decode: TRUE", "esp.enable_authentication_check: TRUE"]
    prefs.write_text("\n".join(keep) + "\n")
    return pdir
