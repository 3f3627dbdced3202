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
NF_LOG_PREFIXLEN = 128  # <linux/netfilter/nf_log.h>
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
        # the kernel's prefixes are short (NF_LOG_PREFIXLEN 128); a point named by someone's file
        # may be any text: cut it so the TLV length (a u16) holds it
        parts.append(_tlv(NFULA_PREFIX, rec.point.encode()[:NF_LOG_PREFIXLEN - 1] + b"\0"))
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


class _Layout:
    """One learned message shape: the TLVs before the payload (lengths, types, prefix text) and
    where the fields we keep sit. `parse` returns None when a body is not of this shape."""

    __slots__ = ("build", "expect", "head", "payload_at", "tlv", "values")

    def __init__(self, body: memoryview, tlv: struct.Struct) -> None:
        """Learn from `body`, which parse_body accepted; raises ValueError if it has no payload
        or anything after the payload (those keep taking the general walk)."""
        head_fmt, value_fmt, exprs = [tlv.format[0]], ["!B"], {"family": "v[0]"}
        pos, nvalues, off, n = 1, 1, 4, len(body)  # pos: where the value struct has got to
        point = ""
        while True:
            if off + 4 > n:
                raise ValueError("no payload")
            tlen, ttype = tlv.unpack_from(body, off)
            ttype &= NLA_TYPE_MASK
            v, end = off + 4, off + ((tlen + 3) & ~3)
            if ttype == NFULA_PAYLOAD:
                if off + tlen != n and end != n:
                    raise ValueError("TLVs after the payload")
                break
            head_fmt.append("HH")
            field: list[tuple[str, int, str]] = []  # (name, offset, format) of what this TLV gives
            if ttype == NFULA_PREFIX:
                head_fmt.append(f"{tlen - 4}s{end - off - tlen}x")
                point = _prefix(bytes(body[v:off + tlen]))
            else:
                head_fmt.append(f"{end - v}x")
                if tlen == 8 and ttype in _U32_FIELDS:
                    field = [(_U32_FIELDS[ttype], v, "I")]
                elif ttype == NFULA_PACKET_HDR and tlen >= 8:
                    field = [("hook", v + 2, "B")]
                elif ttype == NFULA_TIMESTAMP and tlen >= 20:
                    field = [("sec", v, "Q"), ("usec", v + 8, "Q")]
            for name, at, fmt in field:
                value_fmt.append(f"{at - pos}x{fmt}")
                pos = at + struct.calcsize("!" + fmt)
                exprs[name] = f"v[{nvalues}]"
                nvalues += 1
            off = end
        self.tlv = tlv
        self.head = struct.Struct("".join(head_fmt)).unpack_from
        self.expect = self.head(body, 4)
        self.values = struct.Struct("".join(value_fmt)).unpack_from
        self.payload_at = off
        when = f"{exprs['sec']} * 1_000_000_000 + {exprs['usec']} * 1000" if "sec" in exprs else "t"
        fields = ", ".join(exprs.get(name, "None") for name in (
            "hook", "indev", "outdev", "mark", "uid", "gid", "seq", "seq_global"))
        # The constructor call for this shape, written out once: positional arguments in
        # Record's field order, absent fields None, so a packet costs one call and no lookups.
        # (eval of text made above from our own field names and indices, never from packet bytes)
        self.build = eval(
            f"lambda v, t, p, m: Record({when}, point, p, {exprs['family']}, 0, {fields}, None, m)",
            {"Record": Record, "point": point})

    def parse(self, body: memoryview, recv_ns: int) -> Record | None:
        if len(body) < self.payload_at + 4 or self.head(body, 4) != self.expect:
            return None
        at = self.payload_at
        plen, ptype = self.tlv.unpack_from(body, at)
        if ptype & NLA_TYPE_MASK != NFULA_PAYLOAD or plen < 4 or len(body) - at not in (plen, plen + 3 & ~3):
            return None  # not the payload, or not where it ends the body
        return self.build(self.values(body), recv_ns, body[at + 4:at + plen], body)


class BodyParser:
    """parse_body for a stream of bodies that repeat a few shapes (a live group: each capture
    point's messages carry the same TLVs, only the values and the payload change). The shapes
    seen are learned; a body of a known shape costs two struct unpacks and a tuple compare
    instead of a walk over its TLVs. Anything else takes parse_body, with the same result."""

    MAX_LAYOUTS = 32  # more shapes than this: the rest are walked

    def __init__(self, tlv: struct.Struct = TLV_NATIVE) -> None:
        self._tlv = tlv
        self._layouts: list[_Layout] = []
        self._last: _Layout | None = None

    def parse(self, body: memoryview, recv_ns: int = 0) -> Record:
        last = self._last
        if last is not None:
            rec = last.parse(body, recv_ns)
            if rec is not None:
                return rec
        for layout in self._layouts:
            rec = layout.parse(body, recv_ns)
            if rec is not None:
                self._last = layout
                return rec
        rec = parse_body(body, recv_ns, self._tlv)
        if len(self._layouts) < self.MAX_LAYOUTS:
            try:
                self._last = _Layout(body, self._tlv)
            except ValueError:
                return rec
            self._layouts.append(self._last)
        return rec
