"""XFRM netlink: the kernel's SA and policy messages, in its exact layout, and a dump over
NETLINK_XFRM.

Every struct below mirrors <linux/xfrm.h> field by field, padding included (the `x` pad bytes
are where the C compiler puts them on every Linux ABI we run on: u64 members force 8-byte
alignment of xfrm_usersa_info / xfrm_userpolicy_info). Values are in host order except where
the kernel says `__be`: SPIs, ports.

Transport: a plain `socket(AF_NETLINK, SOCK_RAW, NETLINK_XFRM)`, not pyroute2. pyroute2 0.9.7
has no XFRM message classes, so it would only move bytes for us; a raw socket is ~40 lines,
opens inside a namespace with `netns.entered()` like every other socket of ours, needs no
marshal threads, and the same socket type serves the multicast monitor (monitor.py).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

from ipsec_capture.errors import UserError
from ipsec_capture.netns import entered

from .sa import (
    MODES,
    SA,
    STATE_FLAGS,
    Algorithm,
    Encap,
    Policy,
    Replay,
    Selector,
    Template,
)

NETLINK_XFRM = 6  # <linux/netlink.h>
AF_INET = 2  # <linux/socket.h>: plain ints, so models compare and serialise as numbers
AF_INET6 = 10

# <linux/netlink.h>
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP = 0x300
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED / NLA_F_NET_BYTEORDER

# <linux/xfrm.h> enum XFRM_MSG_*
XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_ACQUIRE = 0x17
XFRM_MSG_EXPIRE = 0x18
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A
XFRM_MSG_POLEXPIRE = 0x1B
XFRM_MSG_REPORT = 0x20
XFRM_MSG_MAPPING = 0x26

# <linux/xfrm.h> enum xfrm_attr_type_t
XFRMA_ALG_AUTH = 1
XFRMA_ALG_CRYPT = 2
XFRMA_ALG_COMP = 3
XFRMA_ENCAP = 4
XFRMA_TMPL = 5
XFRMA_SA = 6
XFRMA_POLICY = 7
XFRMA_SEC_CTX = 8
XFRMA_LTIME_VAL = 9
XFRMA_REPLAY_VAL = 10
XFRMA_REPLAY_THRESH = 11
XFRMA_ETIMER_THRESH = 12
XFRMA_SRCADDR = 13
XFRMA_COADDR = 14
XFRMA_LASTUSED = 15
XFRMA_POLICY_TYPE = 16
XFRMA_ALG_AEAD = 18
XFRMA_ALG_AUTH_TRUNC = 20
XFRMA_MARK = 21
XFRMA_TFCPAD = 22
XFRMA_REPLAY_ESN_VAL = 23
XFRMA_SA_EXTRA_FLAGS = 24
XFRMA_OFFLOAD_DEV = 28
XFRMA_SET_MARK = 29
XFRMA_SET_MARK_MASK = 30
XFRMA_IF_ID = 31
XFRMA_MTIMER_THRESH = 32
XFRMA_SA_DIR = 33

# <linux/xfrm.h> XFRM_OFFLOAD_*
XFRM_OFFLOAD_IPV6 = 1
XFRM_OFFLOAD_INBOUND = 2
XFRM_OFFLOAD_PACKET = 4
# <linux/xfrm.h> enum xfrm_sa_dir
XFRM_SA_DIR_IN = 1
XFRM_SA_DIR_OUT = 2
# <linux/xfrm.h> XFRM_SA_XFLAG_*: kept in SA.flags under these names (iproute2's spelling)
EXTRA_FLAGS = {1: "dont-encap-dscp", 2: "oseq-may-wrap"}
# <linux/xfrm.h> XFRM_POLICY_{IN,OUT,FWD,MAX}; dir >= MAX is a per-socket policy
POLICY_DIRS = {0: "in", 1: "out", 2: "fwd"}
XFRM_POLICY_MAX = 3
POLICY_ACTIONS = {0: "allow", 1: "block"}
XFRM_INF = (1 << 64) - 1  # <linux/xfrm.h> "no limit"
XFRMA_REPLAY_ESN_MAX = 4096  # <linux/xfrm.h>: bits of an ESN replay bitmap at most

NLMSGHDR = struct.Struct("=IHHII")  # <linux/netlink.h> struct nlmsghdr
NLATTR = struct.Struct("=HH")  # <linux/netlink.h> struct nlattr
# struct xfrm_selector: daddr, saddr, dport, dport_mask, sport, sport_mask (all __be16), family,
# prefixlen_d, prefixlen_s, proto, 3 pad, ifindex, user
XFRM_SELECTOR = struct.Struct("=16s16sHHHHHBBB3xiI")
XFRM_ID = struct.Struct("=16sIB3x")  # struct xfrm_id: daddr, spi (__be32), proto
XFRM_LIFETIME_CFG = struct.Struct("=8Q")  # struct xfrm_lifetime_cfg
XFRM_LIFETIME_CUR = struct.Struct("=4Q")  # struct xfrm_lifetime_cur
XFRM_STATS = struct.Struct("=3I")  # struct xfrm_stats: replay_window, replay, integrity_failed
# struct xfrm_usersa_info tail after sel/id/saddr/lft/curlft/stats: seq, reqid, family, mode,
# replay_window, flags, 7 pad (sizeof 224)
XFRM_USERSA_TAIL = struct.Struct("=IIHBBB7x")
XFRM_USERSA_INFO_LEN = 224
XFRM_USERSA_ID = struct.Struct("=16sIHBx")  # struct xfrm_usersa_id: daddr, spi, family, proto
# struct xfrm_userpolicy_info tail after sel/lft/curlft: priority, index, dir, action, flags,
# share, 4 pad (sizeof 168)
XFRM_USERPOLICY_TAIL = struct.Struct("=IIBBBB4x")
XFRM_USERPOLICY_INFO_LEN = 168
XFRM_USERPOLICY_ID_TAIL = struct.Struct("=IB3x")  # struct xfrm_userpolicy_id after sel (64)
# struct xfrm_user_tmpl after its xfrm_id: family, 2 pad, saddr, reqid, mode, share, optional,
# 1 pad, aalgos, ealgos, calgos (sizeof 64)
XFRM_USER_TMPL_TAIL = struct.Struct("=H2x16sIBBBxIII")
XFRM_USER_TMPL_LEN = 64
XFRM_ALGO = struct.Struct("=64sI")  # struct xfrm_algo: alg_name, alg_key_len (bits)
XFRM_ALGO_AUTH = struct.Struct("=64sII")  # struct xfrm_algo_auth: ..., alg_trunc_len
XFRM_ALGO_AEAD = struct.Struct("=64sII")  # struct xfrm_algo_aead: ..., alg_icv_len
XFRM_ENCAP_TMPL = struct.Struct("=HHH2x16s")  # type, sport (__be16), dport (__be16), oa
XFRM_REPLAY_STATE = struct.Struct("=III")  # struct xfrm_replay_state: oseq, seq, bitmap
# struct xfrm_replay_state_esn: bmp_len, oseq, seq, oseq_hi, seq_hi, replay_window, bmp[]
XFRM_REPLAY_STATE_ESN = struct.Struct("=6I")
XFRM_MARK = struct.Struct("=II")  # struct xfrm_mark: v, m
XFRM_USER_OFFLOAD = struct.Struct("=iB3x")  # struct xfrm_user_offload: ifindex, flags
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
U8 = struct.Struct("=B")

LIFETIME_CFG_KEYS = (
    "soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit",
    "soft_add_expires_seconds", "hard_add_expires_seconds",
    "soft_use_expires_seconds", "hard_use_expires_seconds",
)
LIFETIME_CUR_KEYS = ("bytes", "packets", "add_time", "use_time")
STATS_KEYS = ("replay_window", "replay", "integrity_failed")

P = ParamSpec("P")
R = TypeVar("R")

_MODE_NUMBERS = {v: k for k, v in MODES.items()}
_FLAG_BITS = {v: k for k, v in STATE_FLAGS.items()}
_EXTRA_BITS = {v: k for k, v in EXTRA_FLAGS.items()}


class MalformedMessage(ValueError):
    """An XFRM message that is not what its type says (cut short, an attribute of the wrong size).

    The decoders raise only this (a ValueError): the monitor turns it into an `undecodable`
    event, a dump into a UserError. The kernel never sends one; a fuzzer or a damaged copy does."""


def _decoder(func: Callable[P, R]) -> Callable[P, R]:
    """Every failure of the wire layout (a struct too short for its fields, a missing byte)
    becomes MalformedMessage, named after the decoder."""

    @functools.wraps(func)
    def decode(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except MalformedMessage:
            raise
        except (struct.error, IndexError, ValueError, OverflowError) as err:
            raise MalformedMessage(f"{func.__name__}: {err}") from None

    return decode


# --- addresses -----------------------------------------------------------------------------

def addr_to_str(raw: bytes, family: int) -> str:
    if family == AF_INET6:
        return str(ipaddress.IPv6Address(raw[:16]))
    return str(ipaddress.IPv4Address(raw[:4]))


def addr_to_bytes(text: str, family: int) -> bytes:
    if family == AF_INET6:
        return ipaddress.IPv6Address(text).packed
    return ipaddress.IPv4Address(text).packed.ljust(16, b"\0")


def family_of(text: str) -> int:
    return AF_INET6 if ":" in text else AF_INET


# --- attributes ----------------------------------------------------------------------------

def parse_attrs(data: bytes | memoryview, offset: int = 0) -> dict[int, bytes]:
    """TLVs from `offset` on; last one wins (the kernel never repeats an XFRM attribute)."""
    out: dict[int, bytes] = {}
    mv = memoryview(data)
    end = len(mv)
    while offset + NLATTR.size <= end:
        length, atype = NLATTR.unpack_from(mv, offset)
        if length < NLATTR.size or offset + length > end:
            break
        out[atype & NLA_TYPE_MASK] = bytes(mv[offset + NLATTR.size:offset + length])
        offset += (length + 3) & ~3
    return out


def attr(atype: int, payload: bytes) -> bytes:
    length = NLATTR.size + len(payload)
    return NLATTR.pack(length, atype) + payload + b"\0" * (((length + 3) & ~3) - length)


# --- selector, lifetimes -------------------------------------------------------------------

@_decoder
def decode_selector(buf: bytes | memoryview, offset: int, fallback_family: int) -> Selector | None:
    (daddr, saddr, dport, _dmask, sport, _smask, family, plen_d, plen_s, proto, ifindex,
     _user) = XFRM_SELECTOR.unpack_from(buf, offset)
    if not any(bytes(buf[offset:offset + XFRM_SELECTOR.size])):
        return None
    fam = family or fallback_family
    return Selector(
        src=f"{addr_to_str(saddr, fam)}/{plen_s}", dst=f"{addr_to_str(daddr, fam)}/{plen_d}",
        proto=proto, sport=socket.ntohs(sport), dport=socket.ntohs(dport), ifindex=ifindex,
        family=family,
    )


def encode_selector(sel: Selector | None, fallback_family: int) -> bytes:
    if sel is None:
        return bytes(XFRM_SELECTOR.size)
    fam = sel.family or fallback_family
    saddr, _, plen_s = sel.src.partition("/")
    daddr, _, plen_d = sel.dst.partition("/")
    full = 128 if fam == AF_INET6 else 32
    return XFRM_SELECTOR.pack(
        addr_to_bytes(daddr, fam), addr_to_bytes(saddr, fam),
        socket.htons(sel.dport), 0xFFFF if sel.dport else 0,
        socket.htons(sel.sport), 0xFFFF if sel.sport else 0,
        sel.family, int(plen_d or full), int(plen_s or full), sel.proto, sel.ifindex, 0,
    )


def _lifetimes(buf: bytes | memoryview, offset: int) -> tuple[dict[str, int], dict[str, int]]:
    cfg = dict(zip(LIFETIME_CFG_KEYS, XFRM_LIFETIME_CFG.unpack_from(buf, offset), strict=True))
    cur = dict(zip(LIFETIME_CUR_KEYS,
                   XFRM_LIFETIME_CUR.unpack_from(buf, offset + XFRM_LIFETIME_CFG.size), strict=True))
    return cfg, cur


def _pack_lifetimes(cfg: dict[str, int], cur: dict[str, int]) -> bytes:
    return (XFRM_LIFETIME_CFG.pack(*(cfg.get(k, 0) for k in LIFETIME_CFG_KEYS))
            + XFRM_LIFETIME_CUR.pack(*(cur.get(k, 0) for k in LIFETIME_CUR_KEYS)))


# --- algorithms ----------------------------------------------------------------------------

def _cname(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


@_decoder
def decode_algo(payload: bytes, kind: int) -> Algorithm:
    """xfrm_algo (crypt/comp/auth), xfrm_algo_auth (auth-trunc) or xfrm_algo_aead."""
    if kind in (XFRMA_ALG_AUTH_TRUNC, XFRMA_ALG_AEAD):
        name, key_bits, extra = XFRM_ALGO_AUTH.unpack_from(payload)
        key = payload[XFRM_ALGO_AUTH.size:XFRM_ALGO_AUTH.size + key_bits // 8]
        if kind == XFRMA_ALG_AEAD:
            return Algorithm(_cname(name), bytes(key), icv_bits=extra)
        return Algorithm(_cname(name), bytes(key), trunc_bits=extra)
    name, key_bits = XFRM_ALGO.unpack_from(payload)
    return Algorithm(_cname(name), bytes(payload[XFRM_ALGO.size:XFRM_ALGO.size + key_bits // 8]))


def encode_algo(alg: Algorithm, kind: int) -> bytes:
    name = alg.name.encode()
    if kind == XFRMA_ALG_AEAD:
        return XFRM_ALGO_AEAD.pack(name, alg.key_bits, alg.icv_bits or 0) + alg.key
    if kind == XFRMA_ALG_AUTH_TRUNC:
        return XFRM_ALGO_AUTH.pack(name, alg.key_bits, alg.trunc_bits or 0) + alg.key
    return XFRM_ALGO.pack(name, alg.key_bits) + alg.key


# --- states --------------------------------------------------------------------------------

@_decoder
def decode_usersa(info: bytes | memoryview, attrs: dict[int, bytes]) -> SA:
    """An SA from a struct xfrm_usersa_info and the attributes that followed it."""
    if len(info) < XFRM_USERSA_INFO_LEN:
        raise ValueError(f"xfrm_usersa_info truncated ({len(info)} < {XFRM_USERSA_INFO_LEN} bytes)")
    off = XFRM_SELECTOR.size
    daddr, spi, proto = XFRM_ID.unpack_from(info, off)
    off += XFRM_ID.size
    saddr = bytes(info[off:off + 16])
    off += 16
    cfg, cur = _lifetimes(info, off)
    off += XFRM_LIFETIME_CFG.size + XFRM_LIFETIME_CUR.size
    stats = dict(zip(STATS_KEYS, XFRM_STATS.unpack_from(info, off), strict=True))
    off += XFRM_STATS.size
    _seq, reqid, family, mode, replay_window, flagbits = XFRM_USERSA_TAIL.unpack_from(info, off)
    flags = [name for bit, name in STATE_FLAGS.items() if flagbits & bit]
    if XFRMA_SA_EXTRA_FLAGS in attrs:
        extra = U32.unpack_from(attrs[XFRMA_SA_EXTRA_FLAGS])[0]
        flags += [name for bit, name in EXTRA_FLAGS.items() if extra & bit]
    sa = SA(
        src=addr_to_str(saddr, family), dst=addr_to_str(daddr, family), spi=socket.ntohl(spi),
        proto=proto, mode=MODES.get(mode, str(mode)), family=family, reqid=reqid, flags=flags,
        selector=decode_selector(info, 0, family), lifetime_cfg=cfg, stats=stats,
    )
    sa.lifetime_cur = cur
    if XFRMA_LTIME_VAL in attrs:  # fresher than the copy inside usersa_info
        sa.lifetime_cur = dict(zip(LIFETIME_CUR_KEYS, XFRM_LIFETIME_CUR.unpack(attrs[XFRMA_LTIME_VAL]),
                                   strict=True))
    if XFRMA_ALG_AEAD in attrs:
        sa.aead = decode_algo(attrs[XFRMA_ALG_AEAD], XFRMA_ALG_AEAD)
    if XFRMA_ALG_CRYPT in attrs:
        sa.enc = decode_algo(attrs[XFRMA_ALG_CRYPT], XFRMA_ALG_CRYPT)
    # The kernel sends ALG_AUTH (untruncated view) *and* ALG_AUTH_TRUNC; the latter is the truth.
    if XFRMA_ALG_AUTH_TRUNC in attrs:
        sa.auth = decode_algo(attrs[XFRMA_ALG_AUTH_TRUNC], XFRMA_ALG_AUTH_TRUNC)
    elif XFRMA_ALG_AUTH in attrs:
        sa.auth = decode_algo(attrs[XFRMA_ALG_AUTH], XFRMA_ALG_AUTH)
    if XFRMA_ALG_COMP in attrs:
        sa.comp = decode_algo(attrs[XFRMA_ALG_COMP], XFRMA_ALG_COMP)
    if XFRMA_ENCAP in attrs:
        etype, sport, dport, oa = XFRM_ENCAP_TMPL.unpack_from(attrs[XFRMA_ENCAP])
        sa.encap = Encap(type=etype, sport=socket.ntohs(sport), dport=socket.ntohs(dport),
                         oa=addr_to_str(oa, family))
    esn = bool(flagbits & _FLAG_BITS["esn"])
    if XFRMA_REPLAY_ESN_VAL in attrs:
        raw = attrs[XFRMA_REPLAY_ESN_VAL]
        bmp_len, oseq, seq, oseq_hi, seq_hi, window = XFRM_REPLAY_STATE_ESN.unpack_from(raw)
        if bmp_len > XFRMA_REPLAY_ESN_MAX // 32 or window > 32 * bmp_len:  # xfrm_user.c verify_replay
            raise MalformedMessage(f"replay state of {bmp_len} bitmap words for a window of {window}")
        words = struct.unpack_from(f"={bmp_len}I", raw, XFRM_REPLAY_STATE_ESN.size)
        bitmap = sum(w << (32 * i) for i, w in enumerate(words))
        sa.replay = Replay(seq=seq, oseq=oseq, seq_hi=seq_hi, oseq_hi=oseq_hi, bitmap=bitmap,
                           window=window, esn=esn, extended=True)
    else:
        oseq = seq = bitmap = 0
        if XFRMA_REPLAY_VAL in attrs:
            oseq, seq, bitmap = XFRM_REPLAY_STATE.unpack_from(attrs[XFRMA_REPLAY_VAL])
        sa.replay = Replay(seq=seq, oseq=oseq, bitmap=bitmap, window=replay_window, esn=esn)
    if XFRMA_MARK in attrs:
        sa.mark = XFRM_MARK.unpack_from(attrs[XFRMA_MARK])
    if XFRMA_SET_MARK in attrs:
        mask = U32.unpack_from(attrs[XFRMA_SET_MARK_MASK])[0] if XFRMA_SET_MARK_MASK in attrs else 0xFFFFFFFF
        sa.output_mark = (U32.unpack_from(attrs[XFRMA_SET_MARK])[0], mask)
    if XFRMA_IF_ID in attrs:
        sa.if_id = U32.unpack_from(attrs[XFRMA_IF_ID])[0]
    if XFRMA_OFFLOAD_DEV in attrs:
        ifindex, oflags = XFRM_USER_OFFLOAD.unpack_from(attrs[XFRMA_OFFLOAD_DEV])
        sa.offload = {"ifindex": ifindex, "dir": "in" if oflags & XFRM_OFFLOAD_INBOUND else "out",
                      "packet": bool(oflags & XFRM_OFFLOAD_PACKET)}
    if XFRMA_SA_DIR in attrs:
        sa.direction = {XFRM_SA_DIR_IN: "in", XFRM_SA_DIR_OUT: "out"}.get(attrs[XFRMA_SA_DIR][0])
    return sa


def encode_usersa(sa: SA) -> tuple[bytes, bytes]:
    """(struct xfrm_usersa_info, attributes) as the kernel would send them for `sa`."""
    fam = sa.family or family_of(sa.dst)
    flagbits = 0
    extra = 0
    for name in sa.flags:
        if name in _FLAG_BITS:
            flagbits |= _FLAG_BITS[name]
        elif name in _EXTRA_BITS:
            extra |= _EXTRA_BITS[name]
    if sa.replay.esn:
        flagbits |= _FLAG_BITS["esn"]
    r = sa.replay
    info = (
        encode_selector(sa.selector, fam)
        + XFRM_ID.pack(addr_to_bytes(sa.dst, fam), socket.htonl(sa.spi), sa.proto)
        + addr_to_bytes(sa.src, fam)
        + _pack_lifetimes(sa.lifetime_cfg, sa.lifetime_cur)
        + XFRM_STATS.pack(*(sa.stats.get(k, 0) for k in STATS_KEYS))
        + XFRM_USERSA_TAIL.pack(0, sa.reqid, fam, _MODE_NUMBERS.get(sa.mode, 0),
                                0 if r.extended else min(r.window, 255), flagbits)
    )
    parts = []
    if sa.aead:
        parts.append(attr(XFRMA_ALG_AEAD, encode_algo(sa.aead, XFRMA_ALG_AEAD)))
    if sa.enc:
        parts.append(attr(XFRMA_ALG_CRYPT, encode_algo(sa.enc, XFRMA_ALG_CRYPT)))
    if sa.auth:
        if sa.auth.trunc_bits is not None:
            parts.append(attr(XFRMA_ALG_AUTH_TRUNC, encode_algo(sa.auth, XFRMA_ALG_AUTH_TRUNC)))
        else:
            parts.append(attr(XFRMA_ALG_AUTH, encode_algo(sa.auth, XFRMA_ALG_AUTH)))
    if sa.comp:
        parts.append(attr(XFRMA_ALG_COMP, encode_algo(sa.comp, XFRMA_ALG_COMP)))
    if sa.encap:
        e = sa.encap
        parts.append(attr(XFRMA_ENCAP, XFRM_ENCAP_TMPL.pack(
            e.type, socket.htons(e.sport), socket.htons(e.dport), addr_to_bytes(e.oa or _zero(fam), fam))))
    if r.extended:
        words = max(1, (r.window + 31) // 32, (r.bitmap.bit_length() + 31) // 32)
        bmp = [(r.bitmap >> (32 * i)) & 0xFFFFFFFF for i in range(words)]
        parts.append(attr(XFRMA_REPLAY_ESN_VAL, XFRM_REPLAY_STATE_ESN.pack(
            words, r.oseq, r.seq, r.oseq_hi, r.seq_hi, r.window) + struct.pack(f"={words}I", *bmp)))
    else:
        parts.append(attr(XFRMA_REPLAY_VAL, XFRM_REPLAY_STATE.pack(r.oseq, r.seq, r.bitmap)))
    parts.append(attr(XFRMA_LTIME_VAL, XFRM_LIFETIME_CUR.pack(
        *(sa.lifetime_cur.get(k, 0) for k in LIFETIME_CUR_KEYS))))
    if extra:
        parts.append(attr(XFRMA_SA_EXTRA_FLAGS, U32.pack(extra)))
    if sa.mark is not None:
        parts.append(attr(XFRMA_MARK, XFRM_MARK.pack(*sa.mark)))
    if sa.output_mark is not None:
        parts.append(attr(XFRMA_SET_MARK, U32.pack(sa.output_mark[0])))
        parts.append(attr(XFRMA_SET_MARK_MASK, U32.pack(sa.output_mark[1])))
    if sa.if_id is not None:
        parts.append(attr(XFRMA_IF_ID, U32.pack(sa.if_id)))
    if sa.offload is not None:
        oflags = (XFRM_OFFLOAD_IPV6 if fam == AF_INET6 else 0)
        oflags |= XFRM_OFFLOAD_INBOUND if sa.offload.get("dir") == "in" else 0
        oflags |= XFRM_OFFLOAD_PACKET if sa.offload.get("packet") else 0
        parts.append(attr(XFRMA_OFFLOAD_DEV, XFRM_USER_OFFLOAD.pack(sa.offload.get("ifindex", 0), oflags)))
    if sa.direction is not None:
        parts.append(attr(XFRMA_SA_DIR, U8.pack(XFRM_SA_DIR_IN if sa.direction == "in" else XFRM_SA_DIR_OUT)))
    return info, b"".join(parts)


def _zero(family: int) -> str:
    return "::" if family == AF_INET6 else "0.0.0.0"


def encode_state(sa: SA) -> bytes:
    """A whole XFRM_MSG_NEWSA netlink message for `sa`, as a dump would return it."""
    info, attrs = encode_usersa(sa)
    body = info + attrs
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), XFRM_MSG_NEWSA, NLM_F_MULTI, 0, 0) + body


@_decoder
def decode_state(msg: bytes) -> SA:
    """An SA from one XFRM_MSG_NEWSA / UPDSA message (nlmsghdr included)."""
    body = memoryview(msg)[NLMSGHDR.size:NLMSGHDR.unpack_from(msg)[0]]
    return decode_usersa(body[:XFRM_USERSA_INFO_LEN], parse_attrs(body, XFRM_USERSA_INFO_LEN))


# --- policies ------------------------------------------------------------------------------

@_decoder
def decode_tmpl(raw: bytes | memoryview, offset: int) -> Template:
    daddr, spi, proto = XFRM_ID.unpack_from(raw, offset)
    (family, saddr, reqid, mode, _share, optional, _a, _e, _c) = XFRM_USER_TMPL_TAIL.unpack_from(
        raw, offset + XFRM_ID.size)
    return Template(
        src=addr_to_str(saddr, family), dst=addr_to_str(daddr, family), spi=socket.ntohl(spi),
        proto=proto, mode=MODES.get(mode, str(mode)), reqid=reqid,
        level="use" if optional == 1 else "required", family=family,
    )


def encode_tmpl(t: Template) -> bytes:
    fam = t.family or family_of(t.dst)
    return XFRM_ID.pack(addr_to_bytes(t.dst, fam), socket.htonl(t.spi), t.proto) + XFRM_USER_TMPL_TAIL.pack(
        fam, addr_to_bytes(t.src, fam), t.reqid, _MODE_NUMBERS.get(t.mode, 0), 0,
        1 if t.level == "use" else 0, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)


@_decoder
def decode_userpolicy(info: bytes | memoryview, attrs: dict[int, bytes]) -> Policy:
    """A policy from a struct xfrm_userpolicy_info and its attributes."""
    if len(info) < XFRM_USERPOLICY_INFO_LEN:
        raise ValueError(f"xfrm_userpolicy_info truncated ({len(info)} bytes)")
    sel_family = XFRM_SELECTOR.unpack_from(info, 0)[6]
    sel = decode_selector(info, 0, sel_family or AF_INET) or Selector(family=sel_family)
    cfg, cur = _lifetimes(info, XFRM_SELECTOR.size)
    priority, index, direction, action, _flags, _share = XFRM_USERPOLICY_TAIL.unpack_from(
        info, XFRM_SELECTOR.size + XFRM_LIFETIME_CFG.size + XFRM_LIFETIME_CUR.size)
    if direction >= XFRM_POLICY_MAX:
        dname = "socket-" + POLICY_DIRS.get(direction - XFRM_POLICY_MAX, str(direction))
    else:
        dname = POLICY_DIRS.get(direction, str(direction))
    pol = Policy(selector=sel, direction=dname, action=POLICY_ACTIONS.get(action, str(action)),
                 priority=priority, index=index, lifetime_cfg=cfg, lifetime_cur=cur)
    raw = attrs.get(XFRMA_TMPL, b"")
    pol.templates = [decode_tmpl(raw, o) for o in range(0, len(raw) - XFRM_USER_TMPL_LEN + 1,
                                                         XFRM_USER_TMPL_LEN)]
    if XFRMA_MARK in attrs:
        pol.mark = XFRM_MARK.unpack_from(attrs[XFRMA_MARK])
    if XFRMA_IF_ID in attrs:
        pol.if_id = U32.unpack_from(attrs[XFRMA_IF_ID])[0]
    return pol


def _direction_number(name: str) -> int:
    """decode_userpolicy's direction name back to its number; a number it had no name for was
    kept as its digits ("socket-200": per-socket direction 200, not 203)."""
    dirs = {v: k for k, v in POLICY_DIRS.items()}
    if name.startswith("socket-"):
        base = name[7:]
        return dirs[base] + XFRM_POLICY_MAX if base in dirs else int(base)
    return dirs[name] if name in dirs else int(name)


def encode_policy(pol: Policy) -> bytes:
    """A whole XFRM_MSG_NEWPOLICY message for `pol`."""
    fam = pol.selector.family or family_of(pol.selector.dst)
    dnum = _direction_number(pol.direction)
    info = (encode_selector(pol.selector, fam) + _pack_lifetimes(pol.lifetime_cfg, pol.lifetime_cur)
            + XFRM_USERPOLICY_TAIL.pack(pol.priority, pol.index, dnum,
                                        1 if pol.action == "block" else 0, 0, 0))
    parts = []
    if pol.templates:
        parts.append(attr(XFRMA_TMPL, b"".join(encode_tmpl(t) for t in pol.templates)))
    if pol.mark is not None:
        parts.append(attr(XFRMA_MARK, XFRM_MARK.pack(*pol.mark)))
    if pol.if_id is not None:
        parts.append(attr(XFRMA_IF_ID, U32.pack(pol.if_id)))
    body = info + b"".join(parts)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), XFRM_MSG_NEWPOLICY, NLM_F_MULTI, 0, 0) + body


@_decoder
def decode_policy(msg: bytes) -> Policy:
    body = memoryview(msg)[NLMSGHDR.size:NLMSGHDR.unpack_from(msg)[0]]
    return decode_userpolicy(body[:XFRM_USERPOLICY_INFO_LEN], parse_attrs(body, XFRM_USERPOLICY_INFO_LEN))


# --- transport -----------------------------------------------------------------------------

def open_socket(netns: str | None = None, groups: int = 0) -> socket.socket:
    """A NETLINK_XFRM socket created inside `netns` (it stays bound to that namespace)."""
    with entered(netns):
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
        except OSError as err:
            raise UserError(f"cannot open an XFRM netlink socket: {err.strerror} "
                            "(is the xfrm_user module available?)") from err
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, groups))
    except OSError as err:
        sock.close()
        if err.errno == errno.EPERM:
            raise UserError("listening to XFRM events needs root (CAP_NET_ADMIN): run with sudo") from err
        raise
    return sock


def iter_messages(data: bytes) -> Iterator[tuple[int, int, memoryview]]:
    """(type, flags, whole message) for each netlink message in one datagram."""
    mv = memoryview(data)
    off = 0
    while off + NLMSGHDR.size <= len(mv):
        length, mtype, flags, _seq, _pid = NLMSGHDR.unpack_from(mv, off)
        if length < NLMSGHDR.size or off + length > len(mv):
            return
        yield mtype, flags, mv[off:off + length]
        off += (length + 3) & ~3


def _dump(msg_type: int, netns: str | None) -> Iterator[memoryview]:
    sock = open_socket(netns)
    try:
        seq = int.from_bytes(os.urandom(3), "little") + 1
        sock.send(NLMSGHDR.pack(NLMSGHDR.size, msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0))
        while True:
            data = sock.recv(1 << 20)
            for mtype, _flags, msg in iter_messages(data):
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", msg, NLMSGHDR.size)[0]
                    if code == 0:
                        continue
                    if code == errno.EPERM:
                        raise UserError("reading XFRM state needs root (CAP_NET_ADMIN): run with sudo")
                    raise UserError(f"XFRM dump failed: {os.strerror(code)}")
                yield msg
    finally:
        sock.close()


def dump_states(netns: str | None = None) -> list[SA]:
    """Every SA of the namespace, keys included."""
    try:
        return [decode_state(bytes(m)) for m in _dump(XFRM_MSG_GETSA, netns)]
    except MalformedMessage as err:
        raise UserError(f"the kernel's XFRM state dump has a message we cannot decode ({err}): "
                        "please report it with `ip xfrm state` output") from None


def dump_policies(netns: str | None = None) -> list[Policy]:
    """Every policy of the namespace (main and per-socket), templates included."""
    try:
        return [decode_policy(bytes(m)) for m in _dump(XFRM_MSG_GETPOLICY, netns)]
    except MalformedMessage as err:
        raise UserError(f"the kernel's XFRM policy dump has a message we cannot decode ({err}): "
                        "please report it with `ip xfrm policy` output") from None


def state_summary(sa: SA) -> dict[str, Any]:
    """The identifying fields of an SA, for events and tuples."""
    return {"src": sa.src, "dst": sa.dst, "proto": sa.proto}
