"""Parse saved `ip xfrm state`, `ip -s xfrm state` and `ip [-s] xfrm policy` output into the SA
and Policy model, so a user can bring keys from a box we cannot reach (a ticket attachment,
`sos report`) and get the same objects as a live netlink dump.

The layout is iproute2's (ip/ipxfrm.c, ip/xfrm_state.c): a block per SA or policy, starting
with an unindented `src ... dst ...` line, followed by indented keyword lines. Versions differ
in optional lines (`anti-replay context`, `anti-replay esn context`, `output-mark`, `if_id`,
`dir`, `extra_flag`, `crypto offload parameters`, the `-s` lifetime and stats blocks) and in
suffixes (`spi 0x..(N)`, `(N bits)`), so known keywords are parsed strictly and indented lines
we do not know are skipped. Anything else is garbage and raises UserError naming the line.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from dataclasses import dataclass, field

from ipsec_capture.errors import UserError
from ipsec_capture.wire import IPPROTO_AH, IPPROTO_COMP, IPPROTO_ESP

from .netlink import (
    AF_INET,
    AF_INET6,
    EXTRA_FLAGS,
    LIFETIME_CFG_KEYS,
    XFRM_INF,
)
from .sa import (
    SA,
    STATE_FLAGS,
    Algorithm,
    Encap,
    Policy,
    Selector,
    Template,
)

# iproute2's XFRM-PROTO names (ip/ipxfrm.c xfrmproto_types)
XFRM_PROTOS = {"esp": IPPROTO_ESP, "ah": IPPROTO_AH, "comp": IPPROTO_COMP, "route2": 43, "hao": 60,
               "ipsec-any": 255}
# upper-layer protocol names as getprotobynumber() prints them on Debian (netbase /etc/protocols)
UPPER_PROTOS = {"icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ah": 51,
                "ipv6-icmp": 58, "icmpv6": 58, "mobility-header": 135, "sctp": 132, "dccp": 33,
                "udplite": 136, "ipencap": 4, "ipv6": 41}
ENCAP_TYPES = {"espinudp-nonike": 1, "espinudp": 2, "espintcp": 7}
_FLAG_NAMES = set(STATE_FLAGS.values())
_BITS_SUFFIX = re.compile(r"\s*\(\d+ bits\)")
_PAREN_SUFFIX = re.compile(r"\((?:0x)?[0-9a-fA-F]+\)$")


@dataclass(slots=True)
class _Line:
    number: int
    text: str  # stripped
    indented: bool


@dataclass(slots=True)
class _Block:
    lines: list[_Line] = field(default_factory=list)


def _fail(line: _Line, why: str) -> UserError:
    return UserError(f"line {line.number}: {why}: {line.text[:80]!r}")


def _blocks(text: str, what: str) -> list[_Block]:
    blocks: list[_Block] = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        line = _Line(number, raw.strip(), raw[:1] in (" ", "\t"))
        if not line.indented:
            if not line.text.startswith("src "):
                raise _fail(line, f"expected `src ADDR dst ADDR` starting an {what} (is this "
                                  f"`ip xfrm {what}` output?)")
            blocks.append(_Block())
        elif not blocks:
            raise _fail(line, f"indented line before the first `src ... dst ...` of an {what}")
        blocks[-1].lines.append(line)
    return blocks


# --- small value parsers, each failing with the line ---------------------------------------

def _int(tok: str, line: _Line) -> int:
    tok = _PAREN_SUFFIX.sub("", tok.rstrip(","))
    try:
        return int(tok, 0) if not tok.startswith("0x") else int(tok, 16)
    except ValueError:
        raise _fail(line, f"not a number: {tok!r}") from None


def _hex(tok: str, line: _Line) -> int:
    try:
        return int(tok.rstrip(","), 16)
    except ValueError:
        raise _fail(line, f"not a hex number: {tok!r}") from None


def _addr(tok: str, line: _Line) -> str:
    try:
        return str(ipaddress.ip_address(tok))
    except ValueError:
        raise _fail(line, f"not an IP address: {tok!r}") from None


def _prefix(tok: str, line: _Line) -> str:
    addr, slash, plen = tok.partition("/")
    text = _addr(addr, line)
    if not slash:
        return f"{text}/{128 if ':' in text else 32}"
    bits = _int(plen, line)
    if bits > (128 if ":" in text else 32):
        raise _fail(line, f"prefix length out of range: {tok!r}")
    return f"{text}/{bits}"


def _key(tok: str, line: _Line) -> bytes:
    if not tok.startswith("0x"):
        raise _fail(line, f"key must be hex starting with 0x (was the key hidden?): {tok!r}")
    try:
        return bytes.fromhex(tok[2:])
    except ValueError:
        raise _fail(line, f"bad hex key: {tok[:20]!r}...") from None


def _family(addr: str) -> int:
    return AF_INET6 if ":" in addr else AF_INET


def _kv(tokens: list[str], line: _Line) -> dict[str, str]:
    """`a 1 b 2` -> {a: 1, b: 2}; a trailing key without value is an error."""
    if len(tokens) % 2:
        raise _fail(line, "expected KEY VALUE pairs")
    return dict(zip(tokens[::2], tokens[1::2], strict=True))


def _uproto(tok: str, line: _Line) -> int:
    if tok in UPPER_PROTOS:
        return UPPER_PROTOS[tok]
    if tok == "any":
        return 0
    try:
        return socket.getprotobyname(tok)
    except OSError:
        pass
    value = _int(tok, line)
    if not 0 <= value <= 255:
        raise _fail(line, f"protocol out of range: {tok}")
    return value


def _selector(tokens: list[str], line: _Line) -> Selector:
    """`src A/n dst B/n [proto P] [sport N] [dport N] [type N] [code N] [key N] [dev D] [uid N]`."""
    sel = Selector()
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if i + 1 >= len(tokens):
            raise _fail(line, f"`{key}` without a value")
        val = tokens[i + 1]
        i += 2
        if key == "src":
            sel.src = _prefix(val, line)
        elif key == "dst":
            sel.dst = _prefix(val, line)
        elif key == "proto":
            sel.proto = _uproto(val, line)
        elif key in ("sport", "type"):
            sel.sport = _int(val, line)
        elif key in ("dport", "code"):
            sel.dport = _int(val, line)
        elif key == "key":
            k = _int(val, line)
            sel.sport, sel.dport = k >> 16, k & 0xFFFF
        elif key in ("dev", "uid"):
            continue  # names and uids do not survive a trip to another machine
        elif key == "(dport)":
            continue
        else:
            raise _fail(line, f"unknown selector field `{key}`")
    sel.family = _family(sel.dst.partition("/")[0])
    return sel


def _time(text: str, line: _Line) -> int:
    if text == "-":
        return 0
    try:
        return int(time.mktime(time.strptime(text, "%Y-%m-%d %H:%M:%S")))
    except ValueError:
        raise _fail(line, f"bad time {text!r}") from None


def _limit(tok: str, line: _Line) -> int:
    tok = tok.split("(", 1)[0] if not tok.startswith("(INF)") else "(INF)"
    return XFRM_INF if tok == "(INF)" else _int(tok, line)


_LIMIT = re.compile(r"limit: soft (\S+?)\((bytes|packets)\), hard (\S+?)\((?:bytes|packets)\)$")
_EXPIRE = re.compile(r"expire (add|use): soft (\d+)\(sec\), hard (\d+)\(sec\)$")
_CUR = re.compile(r"(\d+)\(bytes\), (\d+)\(packets\)$")
_ADDUSE = re.compile(r"add (-|\S+ \S+) use (-|\S+ \S+)$")
_STATS = re.compile(r"replay-window (\d+) replay (\d+) failed (\d+)$")


def _lifetime_line(line: _Line, cfg: dict[str, int], cur: dict[str, int]) -> bool:
    """One line of a `lifetime config:` / `lifetime current:` block; False if not one."""
    t = line.text
    if m := _LIMIT.match(t):
        unit = "byte" if m.group(2) == "bytes" else "packet"
        cfg[f"soft_{unit}_limit"] = _limit(m.group(1), line)
        cfg[f"hard_{unit}_limit"] = _limit(m.group(3), line)
    elif m := _EXPIRE.match(t):
        cfg[f"soft_{m.group(1)}_expires_seconds"] = int(m.group(2))
        cfg[f"hard_{m.group(1)}_expires_seconds"] = int(m.group(3))
    elif m := _CUR.match(t):
        cur["bytes"], cur["packets"] = int(m.group(1)), int(m.group(2))
    elif m := _ADDUSE.match(t):
        cur["add_time"], cur["use_time"] = _time(m.group(1), line), _time(m.group(2), line)
    else:
        return False
    return True


def _mark(tok: str, line: _Line) -> tuple[int, int]:
    value, _, mask = tok.partition("/")
    return (_int(value, line) & 0xFFFFFFFF, _int(mask, line) if mask else 0xFFFFFFFF)


def _id_line(tokens: list[str], line: _Line) -> tuple[int, int, int, str]:
    """`proto esp [spi 0x..(N)] reqid N(0x..) mode M` -> (proto, spi, reqid, mode)."""
    kv = _kv(tokens, line)
    pname = kv.get("proto")
    if pname is None:
        raise _fail(line, "missing `proto`")
    proto = XFRM_PROTOS.get(pname)
    if proto is None:
        proto = _int(pname, line)
    spi, reqid = _int(kv.get("spi", "0"), line), _int(kv.get("reqid", "0"), line)
    return proto, spi, reqid, kv.get("mode", "transport")


# --- states --------------------------------------------------------------------------------

def _flags(tokens: list[str], line: _Line, into: list[str]) -> None:
    for tok in tokens:
        if tok in _FLAG_NAMES:
            into.append(tok)
        elif tok.startswith("(0x") or not tok:
            continue  # -s prints the flags again as a bit string
        else:
            bits = _hex(tok, line)
            into.extend(n for b, n in STATE_FLAGS.items() if bits & b and n not in into)


def _algo(kind: str, tokens: list[str], line: _Line) -> Algorithm:
    if not tokens or (len(tokens) < 2 and kind in ("aead", "auth-trunc")):
        raise _fail(line, f"`{kind}` needs NAME KEY")
    # iproute2 prints an empty key as nothing: `auth-trunc digest_null  0` (from `auth digest_null
    # ''`), `enc ecb(cipher_null) `; the bits that follow the key then come second
    keyless = kind in ("aead", "auth-trunc") and len(tokens) == 2 and tokens[1].isdigit()
    if keyless:
        tokens = [tokens[0], "", tokens[1]]
    alg = Algorithm(tokens[0], _key(tokens[1], line) if len(tokens) > 1 and tokens[1] else b"")
    rest = tokens[2:]
    if kind in ("aead", "auth-trunc"):
        if len(rest) != 1:
            raise _fail(line, f"`{kind}` needs NAME KEY BITS")
        bits = _int(rest[0], line)
        if kind == "aead":
            alg.icv_bits = bits
        else:
            alg.trunc_bits = bits
    elif rest:
        raise _fail(line, f"unexpected words after the `{kind}` key")
    return alg


def _parse_state(block: _Block) -> SA:
    head = block.lines[0]
    kv = _kv(head.text.split(), head)
    if "src" not in kv or "dst" not in kv:
        raise _fail(head, "expected `src ADDR dst ADDR`")
    src, dst = _addr(kv["src"], head), _addr(kv["dst"], head)
    sa = SA(src=src, dst=dst, spi=0, family=_family(dst))
    seen_id = False
    esn_ctx = False
    lifetime: str | None = None
    lines = block.lines[1:]
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        text = _BITS_SUFFIX.sub("", line.text)
        tokens = text.split()
        word = tokens[0]
        if word == "proto" and not seen_id:
            sa.proto, sa.spi, sa.reqid, sa.mode = _id_line(tokens, line)
            seen_id = True
        elif m := _STATS.match(text):
            sa.stats = {"replay_window": int(m.group(1)), "replay": int(m.group(2)),
                        "integrity_failed": int(m.group(3))}
        elif word == "replay-window" or word == "flag":
            j = 0
            while j < len(tokens):
                tok = tokens[j]
                if tok == "flag":
                    _flags(tokens[j + 1:], line, sa.flags)
                    break
                if j + 1 >= len(tokens):
                    raise _fail(line, f"`{tok}` without a value")
                val = tokens[j + 1]
                if tok == "replay-window":
                    sa.replay.window = _int(val, line)
                elif tok == "oseq":
                    sa.replay.oseq = _hex(val, line)
                elif tok == "bitmap":
                    sa.replay.bitmap = _hex(val, line)
                elif tok == "seq" and ("oseq" in tokens or "bitmap" in tokens):
                    sa.replay.seq = _hex(val, line)  # old single-line replay format
                j += 2
        elif word in ("aead", "enc", "auth", "auth-trunc", "comp"):
            alg = _algo(word, tokens[1:], line)
            if word == "aead":
                sa.aead = alg
            elif word == "enc":
                sa.enc = alg
            elif word == "comp":
                sa.comp = alg
            else:
                sa.auth = alg
        elif word == "encap":
            ekv = _kv(tokens[1:], line)
            etype = ekv.get("type", "espinudp")
            sa.encap = Encap(
                type=ENCAP_TYPES[etype] if etype in ENCAP_TYPES else _int(etype, line),
                sport=_int(ekv.get("sport", "4500"), line), dport=_int(ekv.get("dport", "4500"), line),
                oa=_addr(ekv["addr"], line) if "addr" in ekv else None)
        elif word == "mark" and len(tokens) == 2:
            sa.mark = _mark(tokens[1], line)
        elif word == "output-mark" and len(tokens) == 2:
            sa.output_mark = _mark(tokens[1], line)
        elif word == "if_id" and len(tokens) == 2:
            sa.if_id = _int(tokens[1], line)
        elif word == "dir" and len(tokens) == 2:
            if tokens[1] not in ("in", "out"):
                raise _fail(line, "SA direction must be in or out")
            sa.direction = tokens[1]
        elif word == "extra_flag":
            for tok in tokens[1:]:
                if tok in EXTRA_FLAGS.values():
                    sa.flags.append(tok)
        elif word == "sel":
            sa.selector = _selector(tokens[1:], line)
        elif text.startswith("anti-replay context:"):
            ctx = text.split(":", 1)[1].replace(",", " ").split()
            for key, val in _kv(ctx, line).items():
                if key in ("seq", "oseq", "bitmap"):
                    setattr(sa.replay, key, _hex(val, line))
        elif text.startswith("anti-replay esn context:"):
            esn_ctx = True
            sa.replay.extended = True
            rest = text.split(":", 1)[1].strip()
            if rest:  # iptfs-era output puts the first values on the same line
                lines.insert(i, _Line(line.number, rest, True))
        elif esn_ctx and word in ("seq-hi", "seq", "oseq-hi", "oseq"):
            ctx = text.replace(",", " ").split()
            for key, val in _kv(ctx, line).items():
                if key not in ("seq-hi", "seq", "oseq-hi", "oseq"):
                    raise _fail(line, f"unknown ESN replay field `{key}`")
                setattr(sa.replay, key.replace("-", "_"), _hex(val, line))
        elif esn_ctx and word == "replay_window":
            fields = _kv(text.replace(",", " ").split(), line)
            sa.replay.window = _int(fields["replay_window"], line)
            words = _int(fields.get("bitmap-length", "0"), line)
            if words and i < len(lines) and re.fullmatch(r"[0-9a-fA-F]{8}( [0-9a-fA-F]{8})*", lines[i].text):
                bmp = lines[i].text.split()
                i += 1
                sa.replay.bitmap = sum(int(w, 16) << (32 * n) for n, w in enumerate(reversed(bmp)))
        elif text == "lifetime config:":
            lifetime = "cfg"
        elif text == "lifetime current:":
            lifetime = "cur"
        elif lifetime and _lifetime_line(line, sa.lifetime_cfg, sa.lifetime_cur):
            pass
        elif text == "stats:":
            lifetime = None
        elif text.startswith("crypto offload parameters:"):
            okv = _kv(text.split(":", 1)[1].split(), line)
            sa.offload = {"dev": okv.get("dev"), "dir": okv.get("dir", "out"),
                          "packet": okv.get("mode") == "packet"}
        elif not line.indented:
            raise _fail(line, "unexpected line")
        # other indented lines (lastused, coa, tfcpad, security context, iptfs-opts) are skipped
    if not seen_id:
        raise _fail(head, "SA without a `proto ... spi ...` line")
    _check_ranges(sa, head)
    if "esn" in sa.flags:
        sa.replay.esn = True
    if sa.lifetime_cfg:
        for key in LIFETIME_CFG_KEYS:
            sa.lifetime_cfg.setdefault(key, 0)
    return sa


_U32 = 0xFFFFFFFF


def _check_ranges(sa: SA, head: _Line) -> None:
    """The kernel's field widths (<linux/xfrm.h>): what no real `ip xfrm` output exceeds."""
    r = sa.replay
    for name, value, top in (("spi", sa.spi, _U32), ("reqid", sa.reqid, _U32), ("seq", r.seq, _U32),
                             ("oseq", r.oseq, _U32), ("seq-hi", r.seq_hi, _U32), ("oseq-hi", r.oseq_hi, _U32),
                             ("replay-window", r.window, _U32)):
        if not 0 <= value <= top:
            raise _fail(head, f"{name} {value:#x} does not fit 32 bits (in this SA)")
    for alg in (sa.aead, sa.enc, sa.auth):
        if alg is None:
            continue
        for bits in (alg.icv_bits, alg.trunc_bits):
            if bits is not None and not 0 <= bits <= 4096:
                raise _fail(head, f"ICV length {bits} of {alg.name} is impossible (in this SA)")
    for mark in (sa.mark, sa.output_mark):
        if mark is not None and not all(0 <= m <= _U32 for m in mark):
            raise _fail(head, "mark does not fit 32 bits (in this SA)")
    if sa.encap is not None and not (0 <= sa.encap.sport <= 0xFFFF and 0 <= sa.encap.dport <= 0xFFFF
                                     and 0 <= sa.encap.type <= 0xFFFF):
        raise _fail(head, "encap port out of range (in this SA)")


def parse_states(text: str) -> list[SA]:
    """SAs from `ip [-s] xfrm state` output; UserError with the line number on garbage."""
    return [_parse_state(b) for b in _blocks(text, "state")]


# --- policies ------------------------------------------------------------------------------

def _parse_policy(block: _Block) -> Policy:
    head = block.lines[0]
    pol = Policy(selector=_selector(head.text.split(), head), direction="")
    lifetime = False
    lines = block.lines[1:]
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        tokens = line.text.split()
        word = tokens[0]
        if word in ("dir", "socket") and not pol.direction and len(tokens) >= 2:
            if tokens[1] not in ("in", "out", "fwd"):
                raise _fail(line, "policy direction must be in, out or fwd")
            pol.direction = tokens[1] if word == "dir" else f"socket-{tokens[1]}"
            j = 2
            while j + 1 < len(tokens):
                key, val = tokens[j], tokens[j + 1]
                if key == "flag":
                    break
                if key == "action":
                    if val not in ("allow", "block"):
                        raise _fail(line, "action must be allow or block")
                    pol.action = val
                elif key == "priority":
                    pol.priority = _int(val, line)
                elif key == "index":
                    pol.index = _int(val, line)
                j += 2
        elif word == "mark" and len(tokens) == 2:
            pol.mark = _mark(tokens[1], line)
        elif word == "if_id" and len(tokens) == 2:
            pol.if_id = _int(tokens[1], line)
        elif word == "tmpl":
            tkv = _kv(tokens[1:], line)
            if "src" not in tkv or "dst" not in tkv:
                raise _fail(line, "template without src/dst")
            src, dst = _addr(tkv["src"], line), _addr(tkv["dst"], line)
            if i >= len(lines) or not lines[i].text.startswith("proto "):
                raise _fail(line, "template without its `proto ... mode ...` line")
            proto, spi, reqid, mode = _id_line(lines[i].text.split(), lines[i])
            i += 1
            tmpl = Template(src=src, dst=dst, spi=spi, proto=proto, mode=mode, reqid=reqid,
                            family=_family(dst))
            if i < len(lines) and lines[i].text.startswith("level "):
                level = lines[i].text.split()[1]
                tmpl.level = "use" if level == "use" else "required"
                i += 1
            pol.templates.append(tmpl)
        elif line.text == "lifetime config:" or line.text == "lifetime current:":
            lifetime = True
        elif lifetime and _lifetime_line(line, pol.lifetime_cfg, pol.lifetime_cur):
            pass
        elif not line.indented:
            raise _fail(line, "unexpected line")
    if not pol.direction:
        raise _fail(head, "policy without a `dir ...` line")
    return pol


def parse_policies(text: str) -> list[Policy]:
    """Policies from `ip [-s] xfrm policy` output; UserError with the line number on garbage."""
    return [_parse_policy(b) for b in _blocks(text, "policy")]


def looks_like_states(text: str) -> bool:
    """True if the first block reads like `ip xfrm state` (an SA's addresses have no /prefix)."""
    for raw in text.splitlines():
        if raw.startswith("src "):
            words = raw.split()
            return len(words) >= 4 and "/" not in words[1] and words[2] == "dst"
        if raw.strip():
            return False
    return False
