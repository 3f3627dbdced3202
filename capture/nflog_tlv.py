"""The NFLOG message body (nfgenmsg + TLVs): parse it into a Record, or build one from a Record.

The body of an nfnetlink_log packet message, without its nlmsghdr, is exactly what LINKTYPE_NFLOG
(239) stores, so the same parser serves the live socket and pcap files. TLV length and type are in
the byte order of the host that logged the packet (netlink attributes); the values are big endian
(the kernel's __be32 fields). Parsing walks the TLVs once and keeps the payload as a memoryview.
"""

from __future__ import annotations

import socket
import struct

from ipsec_capture.errors import UserError
from ipsec_capture.models import Record

# <linux/netfilter/nfnetlink_log.h>: enum nfulnl_attr_type
NFULA_PACKET_HDR = 1  # struct nfulnl_msg_packet_hdr { __be16 hw_protocol; __u8 hook; __u8 _pad; }
NFULA_MARK = 2  # __be32
NFULA_TIMESTAMP = 3  # struct nfulnl_msg_packet_timestamp { __aligned_be64 sec, usec; }
NFULA_IFINDEX_INDEV = 4  # __be32
NFULA_IFINDEX_OUTDEV = 5  # __be32
NFULA_IFINDEX_PHYSINDEV = 6
NFULA_IFINDEX_PHYSOUTDEV = 7
NFULA_HWADDR = 8
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10  # NUL-terminated string
NFULA_UID = 11  # __be32
NFULA_SEQ = 12  # __be32, per instance
NFULA_SEQ_GLOBAL = 13  # __be32
NFULA_GID = 14  # __be32
NFULA_HWTYPE = 15
NFULA_HWHEADER = 16
NFULA_HWLEN = 17
NLA_TYPE_MASK = 0x3FFF  # <linux/netlink.h>: ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)
NFNETLINK_V0 = 0  # <linux/netfilter/nfnetlink.h>

# <linux/netfilter.h>: enum nf_inet_hooks
NF_INET_PRE_ROUTING, NF_INET_LOCAL_IN, NF_INET_FORWARD, NF_INET_LOCAL_OUT, NF_INET_POST_ROUTING = range(5)
INBOUND_HOOKS = frozenset((NF_INET_PRE_ROUTING, NF_INET_LOCAL_IN, NF_INET_FORWARD))
OUTBOUND_HOOKS = frozenset((NF_INET_LOCAL_OUT, NF_INET_POST_ROUTING))

NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (the group, big endian)
TLV_NATIVE = struct.Struct("=HH")  # length (incl. this header), type
TLV_LE = struct.Struct("<HH")
TLV_BE = struct.Struct(">HH")
U32 = struct.Struct("!I")
PACKET_HDR = struct.Struct("!HBB")
TIMESTAMP = struct.Struct("!QQ")
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
MAX_TLV_VALUE = 0xFFFF - 4 - 3  # a TLV length is a u16; keep the padded length in range

_prefixes: dict[bytes, str] = {}


def _prefix(raw: bytes) -> str:
    """Decode a prefix once: the few distinct prefixes repeat on every packet."""
    name = _prefixes.get(raw)
    if name is None:
        name = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        if len(_prefixes) < 4096:
            _prefixes[raw] = name
    return name


def parse_body(body: bytes | memoryview, recv_ns: int = 0, tlv: struct.Struct = TLV_NATIVE,
               keep_body: bool = True) -> Record:
    """One NFLOG body -> Record. Raises UserError on malformed input (never anything else).

    `recv_ns` stamps packets without NFULA_TIMESTAMP (the kernel adds it only on the inbound
    hooks). `tlv` is the TLV header byte order: native for the live socket, detected for files.
    """
    mv = body if isinstance(body, memoryview) else memoryview(body)
    n = len(mv)
    if n < 4:
        raise UserError(f"NFLOG body too short ({n} bytes)")
    family = mv[0]
    rec = Record(recv_ns, "", b"", family, nflog=mv if keep_body else None)
    off = 4
    unpack = tlv.unpack_from
    while off + 4 <= n:
        tlen, ttype = unpack(mv, off)
        if tlen < 4 or off + tlen > n:
            raise UserError(f"NFLOG TLV at offset {off} has bad length {tlen} (body is {n} bytes)")
        ttype &= NLA_TYPE_MASK
        v = off + 4
        end = off + tlen
        if ttype == NFULA_PAYLOAD:
            rec.payload = mv[v:end]
        elif ttype == NFULA_PREFIX:
            rec.point = _prefix(bytes(mv[v:end]))
        elif tlen == 8 and ttype in _U32_FIELDS:
            setattr(rec, _U32_FIELDS[ttype], U32.unpack_from(mv, v)[0])
        elif ttype == NFULA_PACKET_HDR and tlen >= 8:
            rec.hook = mv[v + 2]
        elif ttype == NFULA_TIMESTAMP and tlen >= 20:
            sec, usec = TIMESTAMP.unpack_from(mv, v)
            rec.time_ns = sec * 1_000_000_000 + usec * 1000
        off += (tlen + 3) & ~3
    return rec


_U32_FIELDS = {
    NFULA_MARK: "mark", NFULA_IFINDEX_INDEV: "indev", NFULA_IFINDEX_OUTDEV: "outdev",
    NFULA_UID: "uid", NFULA_GID: "gid", NFULA_SEQ: "seq", NFULA_SEQ_GLOBAL: "seq_global",
}


def detect_tlv_order(body: bytes | memoryview) -> struct.Struct:
    """Byte order of a file's TLV headers: the one whose first TLV length fits the body."""
    n = len(body)
    if n < 8:
        return TLV_LE
    le_len, le_type = TLV_LE.unpack_from(body, 4)
    if 4 <= le_len <= n - 4 and (le_type & NLA_TYPE_MASK) < 64:
        return TLV_LE
    return TLV_BE


def _tlv(ttype: int, value: bytes) -> bytes:
    pad = -(len(value)) % 4
    return TLV_NATIVE.pack(4 + len(value), ttype) + value + b"\0" * pad


def family_of(payload: bytes | memoryview) -> int:
    if payload:
        version = payload[0] >> 4
        if version == 4:
            return socket.AF_INET
        if version == 6:
            return socket.AF_INET6
    return 0


def build_body(rec: Record, group: int = 0) -> bytes:
    """A Record as an NFLOG body, the fields in the kernel's order (for writers without one)."""
    family = rec.family or family_of(rec.payload)
    proto = ETH_P_IPV6 if family == socket.AF_INET6 else ETH_P_IP
    parts = [NFGENMSG.pack(family, NFNETLINK_V0, group & 0xFFFF)]
    if rec.hook is not None:
        parts.append(_tlv(NFULA_PACKET_HDR, PACKET_HDR.pack(proto, rec.hook & 0xFF, 0)))
    if rec.point:
        parts.append(_tlv(NFULA_PREFIX, rec.point.encode() + b"\0"))
    for ttype, attr in ((NFULA_IFINDEX_INDEV, rec.indev), (NFULA_IFINDEX_OUTDEV, rec.outdev),
                        (NFULA_MARK, rec.mark)):
        if attr is not None:
            parts.append(_tlv(ttype, U32.pack(attr & 0xFFFFFFFF)))
    if rec.time_ns:
        sec, ns = divmod(rec.time_ns, 1_000_000_000)
        parts.append(_tlv(NFULA_TIMESTAMP, TIMESTAMP.pack(sec, ns // 1000)))
    for ttype, attr in ((NFULA_UID, rec.uid), (NFULA_GID, rec.gid), (NFULA_SEQ, rec.seq),
                        (NFULA_SEQ_GLOBAL, rec.seq_global)):
        if attr is not None:
            parts.append(_tlv(ttype, U32.pack(attr & 0xFFFFFFFF)))
    parts.append(_tlv(NFULA_PAYLOAD, bytes(rec.payload[:MAX_TLV_VALUE])))
    return b"".join(parts)
