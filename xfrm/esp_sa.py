"""Wireshark's `esp_sa` table (the ESP SA dialog, saved in a profile as the file `esp_sa`).

Wireshark 4.0 (Debian 12) reads 8 quoted CSV columns: Protocol, Src IP, Dest IP, SPI,
Encryption, Encryption Key, Authentication, Authentication Key. Newer releases read 10 (plus
"SN" 32-bit/64-bit and "ESN High Bits"). A row with a name Wireshark does not know makes it
reject the whole table, so every Linux algorithm is mapped here to a name this Wireshark knows,
and what it cannot decrypt (CCM, GMAC, ChaCha20 on 4.0) is written as NULL encryption with
unchecked ICV of the right length, plus a warning, so the other rows still work.
Names are listed in shared/DESIGN.md section 4 and were checked against tshark 4.0.

Every row we write is preceded by a comment line of our own, `# ipsec-capture-sa {JSON}`, with
the whole SA as our decoder needs it (algorithm and keys even where Wireshark has no name, mode,
ESN and its high bits, mark, NAT-T): Wireshark skips `#` lines in its UAT files, and the reader
here takes that line instead of the row after it. So a table `keys` wrote decrypts with
`ipsec-capture decrypt` for every algorithm the decoder has, on 8 columns too.

The reader also takes the tables others write: Wireshark's own (any case, the deprecated
`AES-GCM [RFC4106]` with the ICV from the `ANY n bit` column, a `*` SPI), and strongSwan's
save-keys plugin (`TripleDes-CBC`, `AES-GCM [RFC4106]` whose 12-octet ICV it labels 64 bit).
"""

from __future__ import annotations

import csv
import functools
import io
import json
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
from .sa import (
    ANY_SPI,
    AUTH_UNCHECKED,
    ESN_UNKNOWN,
    MODE_UNKNOWN,
    NULL_AUTH,
    SA,
    Algorithm,
    Encap,
    Replay,
)

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
PROTOCOLS = {AF_INET: "IPv4", AF_INET6: "IPv6"}
HEADER_8 = ("Protocol", "Src IP", "Dest IP", "SPI", "Encryption", "Encryption Key",
            "Authentication", "Authentication Key")
TSHARK_PREFS = ("-o", "esp.enable_encryption_decode:TRUE", "-o", "esp.enable_authentication_check:TRUE")

OURS = "# ipsec-capture-sa "  # our own line before each row: the whole SA as JSON

# reading: names compared without case (strongSwan writes `TripleDes-CBC [RFC2451]`)
_ENC_BACK = {v.lower(): k for k, v in ENC_NAMES.items() if k != "cipher_null"}
_AUTH_BACK = {v.lower(): k for k, v in AUTH_NAMES.items()}
_GCM_BACK = {v.lower(): k for k, v in GCM_NAMES.items()}
GCM_ANY_ICV = "aes-gcm [rfc4106]"  # Wireshark's deprecated name without an ICV length
_ANY_RE = re.compile(r"any (\d+) bit authentication \[no checking\]$")


@dataclass(slots=True)
class Row:
    """One esp_sa row, as strings in Wireshark's column order, and why it may not decrypt."""

    fields: list[str]
    warnings: list[str] = field(default_factory=list)
    sa: SA | None = None


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
                            "written as NULL with an unchecked ICV; `ipsec-capture decrypt` decrypts it "
                            "(the key is in the table's ipsec-capture line)")
        enc_key = _hexkey(a.key) if enc_name != "NULL" else ""
    else:
        enc = sa.enc or Algorithm("ecb(cipher_null)")
        if enc.name in ENC_NAMES:
            enc_name, enc_key = ENC_NAMES[enc.name], _hexkey(enc.key)
        else:
            enc_name, enc_key = "NULL", ""
            warnings.append(f"{tag}: Wireshark cannot decrypt {enc.name}: written as NULL; "
                            "`ipsec-capture decrypt` decrypts it where it has the cipher")
        if enc_name == "NULL":
            enc_key = ""
        if sa.auth is not None and sa.auth.name not in NULL_AUTH:
            bits = sa.auth.trunc_bits or DEFAULT_TRUNC.get(sa.auth.name)
            name = AUTH_NAMES.get((sa.auth.name, bits or 0))
            if sa.auth.name == AUTH_UNCHECKED:
                auth_name = _any_auth(bits)  # what the source said: an ICV nobody checks
            elif name is None:
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
              "*" if sa.spi == ANY_SPI else f"0x{sa.spi:08x}", enc_name, enc_key, auth_name, auth_key]
    if columns >= 10:
        high = sa.replay.seq_hi or sa.replay.oseq_hi
        fields += ["64-bit" if sa.esn else "32-bit", f"{high:x}"]
    elif sa.esn:
        # the ICV (and GCM's AAD) covers the high 32 bits even while they are 0
        warnings.append(f"{tag}: uses ESN (high bits {sa.replay.seq_hi or sa.replay.oseq_hi}), which the "
                        "8-column table of Wireshark < 4.2 cannot express: Wireshark's ICV check fails "
                        "on this SA (`ipsec-capture decrypt` finds ESN by itself)")
    return Row(fields, warnings, sa)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def rows(sas: Iterable[SA], columns: int = 8, wildcard: str = "auto") -> list[Row]:
    if columns not in (8, 10):
        raise UserError(f"Wireshark esp_sa has 8 or 10 columns, not {columns}")
    return [r for sa in sas if (r := sa_row(sa, columns, wildcard)) is not None]


def write_esp_sa(sas: Iterable[SA], columns: int = 8, wildcard: str = "auto", ours: bool = True) -> str:
    """The esp_sa file for `sas` (ESP SAs only), each row after its `# ipsec-capture-sa` line
    unless `ours` is False (a table for Wireshark alone). Warnings: see `warnings_for`."""
    lines = ["# Wireshark esp_sa table written by ipsec-capture (contains keys: keep it private)",
             f"# {len(HEADER_8) if columns == 8 else 10} columns; Wireshark "
             f"{'4.0/4.1' if columns == 8 else '>= 4.2'}"]
    if ours:
        lines.append("# each `ipsec-capture-sa` line holds the whole SA of the row after it, for "
                     "`ipsec-capture decrypt` (Wireshark skips it)")
    for r in rows(sas, columns, wildcard):
        if ours and r.sa is not None:
            lines.append(OURS + sa_json(r.sa))
        lines.append(",".join(_quote(f) for f in r.fields))
    return "\n".join(lines) + "\n"


# --- our own line: the SA as JSON ---------------------------------------------------------

_ALG_FIELDS = ("aead", "enc", "auth")


def sa_json(sa: SA) -> str:
    """One line of JSON with what the decoder needs of `sa` (keys in hex)."""
    d: dict = {"src": sa.src, "dst": sa.dst, "spi": sa.spi, "family": sa.family, "mode": sa.mode}
    if sa.flags:
        d["flags"] = list(sa.flags)
    for name in _ALG_FIELDS:
        alg = getattr(sa, name)
        if alg is not None:
            a: dict = {"name": alg.name, "key": alg.key.hex()}
            if alg.icv_bits is not None:
                a["icv_bits"] = alg.icv_bits
            if alg.trunc_bits is not None:
                a["trunc_bits"] = alg.trunc_bits
            d[name] = a
    r = sa.replay
    d["replay"] = {"seq": r.seq, "oseq": r.oseq, "seq_hi": r.seq_hi, "oseq_hi": r.oseq_hi,
                   "window": r.window, "esn": r.esn}
    if sa.encap is not None:
        d["encap"] = {"type": sa.encap.type, "sport": sa.encap.sport, "dport": sa.encap.dport}
    if sa.mark is not None:
        d["mark"] = list(sa.mark)
    if sa.reqid:
        d["reqid"] = sa.reqid
    return json.dumps(d, separators=(",", ":"), sort_keys=True)


def _need(d: dict, key: str, kind: type | tuple[type, ...], where: str, default: object = None) -> object:
    value = d.get(key, default)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise UserError(f"{where}: ipsec-capture-sa field {key!r} must be "
                        f"{getattr(kind, '__name__', 'a value of the right type')}")
    return value


def _uint(d: dict, key: str, where: str, bits: int, default: int = 0) -> int:
    value = _need(d, key, int, where, default)
    assert isinstance(value, int)
    if not 0 <= value < 1 << bits:
        raise UserError(f"{where}: ipsec-capture-sa field {key!r} out of range")
    return value


def sa_from_json(text: str, where: str) -> SA:
    """The SA of an `# ipsec-capture-sa` line; UserError naming the line for anything else."""
    try:
        d = json.loads(text)
    except (ValueError, RecursionError):
        raise UserError(f"{where}: the ipsec-capture-sa line is not JSON") from None
    if not isinstance(d, dict):
        raise UserError(f"{where}: the ipsec-capture-sa line is not a JSON object")
    mode = _need(d, "mode", str, where, MODE_UNKNOWN)  # any name: the decoder says if it has it
    assert isinstance(mode, str)
    flags = _need(d, "flags", list, where, [])
    assert isinstance(flags, list)
    if not all(isinstance(f, str) for f in flags):
        raise UserError(f"{where}: ipsec-capture-sa flags must be strings")
    sa = SA(src=str(_need(d, "src", str, where)), dst=str(_need(d, "dst", str, where)),
            spi=_uint(d, "spi", where, 32), family=_uint(d, "family", where, 16), mode=str(mode),
            flags=list(flags), reqid=_uint(d, "reqid", where, 32))
    for name in _ALG_FIELDS:
        a = d.get(name)
        if a is None:
            continue
        if not isinstance(a, dict):
            raise UserError(f"{where}: ipsec-capture-sa field {name!r} must be an object")
        key_hex = _need(a, "key", str, where, "")
        try:
            key = bytes.fromhex(str(key_hex))
        except ValueError:
            raise UserError(f"{where}: bad hex key in {name!r}") from None
        icv = a.get("icv_bits")
        trunc = a.get("trunc_bits")
        for bits in (icv, trunc):
            if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool)
                                     or not 0 <= bits <= 4096):
                raise UserError(f"{where}: bad ICV length in {name!r}")
        setattr(sa, name, Algorithm(str(_need(a, "name", str, where)), key, icv_bits=icv, trunc_bits=trunc))
    r = d.get("replay") or {}
    if not isinstance(r, dict):
        raise UserError(f"{where}: ipsec-capture-sa field 'replay' must be an object")
    sa.replay = Replay(seq=_uint(r, "seq", where, 32), oseq=_uint(r, "oseq", where, 32),
                       seq_hi=_uint(r, "seq_hi", where, 32), oseq_hi=_uint(r, "oseq_hi", where, 32),
                       window=_uint(r, "window", where, 32), esn=bool(r.get("esn")))
    e = d.get("encap")
    if e is not None:
        if not isinstance(e, dict):
            raise UserError(f"{where}: ipsec-capture-sa field 'encap' must be an object")
        sa.encap = Encap(type=_uint(e, "type", where, 16, 2), sport=_uint(e, "sport", where, 16, 4500),
                         dport=_uint(e, "dport", where, 16, 4500))
    m = d.get("mark")
    if m is not None:
        if not (isinstance(m, list) and len(m) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                            and 0 <= x < 1 << 32 for x in m)):
            raise UserError(f"{where}: ipsec-capture-sa mark must be [value, mask]")
        sa.mark = (m[0], m[1])
    if sa.replay.esn and "esn" not in sa.flags:
        sa.flags.append("esn")
    return sa


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


def _row_to_sas(fields: list[str], where: str) -> list[SA]:
    """The SA of one row; two when the row cannot say which ICV length its AES-GCM has."""
    proto, src, dst, spi_text, enc_name, enc_key, auth_name, auth_key = fields[:8]
    family = {"ipv4": AF_INET, "ipv6": AF_INET6}.get(proto.lower())
    if family is None:
        raise UserError(f"{where}: protocol must be IPv4 or IPv6, not {proto[:40]!r}")
    try:
        spi = ANY_SPI if spi_text.strip() == "*" else \
            int(spi_text, 16) if spi_text.lower().startswith("0x") else int(spi_text)
    except ValueError:
        raise UserError(f"{where}: bad SPI {spi_text[:40]!r} (hex 0x..., decimal, or *)") from None
    if not 0 <= spi <= 0xFFFFFFFF:
        raise UserError(f"{where}: SPI out of range")
    enc_l, auth_l = enc_name.strip().lower(), auth_name.strip().lower()
    any_auth = _ANY_RE.match(auth_l)
    # A Wireshark table does not say tunnel or transport: mode "" lets the decoder decide per
    # packet from the next header, as Wireshark does.
    sa = SA(src=src or "*", dst=dst or "*", spi=spi, family=family, mode=MODE_UNKNOWN)
    icvs: list[int] = []
    if enc_l in _GCM_BACK:
        sa.aead = Algorithm(GCM, _key(enc_key, where), icv_bits=_GCM_BACK[enc_l])
    elif enc_l == GCM_ANY_ICV:
        # the ICV length is the ANY column's; strongSwan's save-keys writes 64 for 8 and 12 octets
        bits = int(any_auth.group(1)) if any_auth else 128
        icvs = [bits, 96] if bits == 64 else [bits] if bits in (96, 128) else [128, 96, 64]
        sa.aead = Algorithm(GCM, _key(enc_key, where), icv_bits=icvs[0])
    elif enc_l == CHACHA_NAME.lower():
        sa.aead = Algorithm(CHACHA, _key(enc_key, where), icv_bits=128)
    elif enc_l in _ENC_BACK:
        sa.enc = Algorithm(_ENC_BACK[enc_l], _key(enc_key, where))
    else:
        raise UserError(f"{where}: unknown Wireshark encryption {enc_name[:60]!r}")
    if sa.aead is not None:
        pass  # an AEAD's ICV is its own: the authentication column only names its length
    elif auth_l in _AUTH_BACK:
        name, bits = _AUTH_BACK[auth_l]
        sa.auth = Algorithm(name, _key(auth_key, where), trunc_bits=bits)
    elif any_auth:
        sa.auth = Algorithm(AUTH_UNCHECKED, b"", trunc_bits=int(any_auth.group(1)))
    elif auth_l != "null":
        raise UserError(f"{where}: unknown Wireshark authentication {auth_name[:60]!r}")
    if len(fields) >= 10:
        sa.replay = Replay(esn=fields[8].strip().lower() == "64-bit")
        try:
            sa.replay.seq_hi = int(fields[9], 16) if fields[9] else 0
        except ValueError:
            raise UserError(f"{where}: bad ESN high bits {fields[9][:20]!r}") from None
        if not 0 <= sa.replay.seq_hi <= 0xFFFFFFFF:
            raise UserError(f"{where}: ESN high bits out of range")
        if sa.replay.esn:
            sa.flags.append("esn")
    else:
        sa.flags.append(ESN_UNKNOWN)
    out = [sa]
    for bits in icvs[1:]:  # the other ICV lengths it may be: the decoder tries each one's ICV
        other = SA.from_dict(sa.to_dict(keys=True))
        assert other.aead is not None
        other.aead.icv_bits = bits
        out.append(other)
    return out


def read_esp_sa(text: str) -> list[SA]:
    """SAs from an esp_sa file (8 or 10 columns), algorithm names mapped back to Linux names;
    a row after an `# ipsec-capture-sa` line of ours is that line's SA.

    Wildcard addresses come back as "*", a wildcard SPI as ANY_SPI. Unknown names or a wrong
    column count raise UserError with the line number.
    """
    out: list[SA] = []
    pending: SA | None = None  # the SA of our line, waiting for its row
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        where = f"esp_sa line {number}"
        if stripped.startswith(OURS.strip()):
            if pending is not None:
                out.append(pending)
            pending = sa_from_json(stripped[len(OURS.strip()):], where)
            continue
        if not stripped or stripped.startswith("#"):
            continue
        try:
            fields = next(csv.reader(io.StringIO(stripped), escapechar="\\", doublequote=False,
                                     strict=True))
        except (csv.Error, StopIteration):
            raise UserError(f"{where}: not a quoted CSV row") from None
        if len(fields) not in (8, 10):
            raise UserError(f"{where}: {len(fields)} columns; Wireshark's esp_sa has 8 or 10")
        row = _row_to_sas(fields, where)
        if pending is not None:
            out.append(pending)
            if row[0].spi == pending.spi:
                pending = None
                continue  # the row is the Wireshark form of our line's SA
            pending = None
        out.extend(row)
    if pending is not None:
        out.append(pending)
    return out


def looks_like_esp_sa(text: str) -> bool:
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(OURS.strip()):
            return True
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
