"""Read pcap and pcapng files (ours, tcpdump's, Wireshark's) into Records.

Every offline command starts here, so it accepts what other tools write: pcap in both byte
orders with micro- or nanosecond stamps, pcapng with any number of sections and interfaces, and
the link types an IPsec capture comes in (NFLOG, raw IP, Ethernet with VLAN tags, Linux cooked
v1/v2). Record.payload is always the IP packet. A file cut short in its last block (a capture
that crashed) is read to the last whole packet with a warning; anything else malformed is a
UserError naming the offset.

The file is read in large chunks and records are sliced out of memory (two read() calls and a
memoryview per packet cost more than the rest of reading). Each payload is its own bytes object
(or a view of one), never a view of a chunk: callers keep Records, and a kept Record must not pin
megabytes of file.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from ipsec_capture.errors import UserError
from ipsec_capture.models import Record

from .nflog_tlv import BodyParser, detect_tlv_order, family_of

# pcap-linktype(7)
LINKTYPE_EN10MB = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_NFLOG = 239
LINKTYPE_LINUX_SLL2 = 276
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
VLAN_TPIDS = frozenset((0x8100, 0x88A8, 0x9100))

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
BT_SHB = 0x0A0D0D0A
BT_IDB = 0x00000001
BT_PB = 0x00000002  # obsolete Packet Block
BT_SPB = 0x00000003
BT_EPB = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D
OPT_COMMENT = 1
IF_NAME = 2
IF_TSRESOL = 9
IF_TSOFFSET = 14

_BE16 = struct.Struct("!H")
CHUNK = 1 << 22  # bytes per read(): few system calls, and little memory held at once
MAX_RECORD = 0x4000000  # 64 MiB: no packet or block is that big; the file is not what it claims
# Record.time_ns is what a pcapng block can hold at nanosecond resolution (an unsigned 64-bit
# stamp: 1970 to 2554); a stamp outside it (an if_tsoffset that goes before 1970, a tick count
# that overflows) is malformed, and refused here so no writer or report meets it.
MAX_TIME_NS = (1 << 64) - 1
RAW_LINKTYPES = frozenset((LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6))
# the link types we take IP packets out of; a file of any other is refused in one line
READABLE = {LINKTYPE_NFLOG: "NFLOG", LINKTYPE_RAW: "raw IP", LINKTYPE_IPV4: "IPv4",
            LINKTYPE_IPV6: "IPv6", LINKTYPE_EN10MB: "Ethernet", LINKTYPE_LINUX_SLL: "Linux cooked",
            LINKTYPE_LINUX_SLL2: "Linux cooked v2"}
# family_of() by the first byte of the packet (IP version in the high nibble), without a call
_FAMILY_BY_FIRST = tuple(socket.AF_INET if b >> 4 == 4 else socket.AF_INET6 if b >> 4 == 6 else 0
                         for b in range(256))

Warn = Callable[[str], None]


@dataclass(slots=True)
class Share:
    """One worker's share of a file (decrypt -j): the runs of `block` records numbered k,
    k + jobs, k + 2 jobs, ... A reader that can pass over the other runs without building their
    records (raw-IP pcap: one capture point, fixed-size record headers) sets `skips` when it
    starts and `count` (records in the file) when it ends; any other reader yields every record
    and leaves the choosing to the caller."""

    k: int
    jobs: int
    block: int
    skips: bool = False
    count: int = 0


def _stderr_warning(msg: str) -> None:
    print(f"ipsec-capture: warning: {msg}", file=sys.stderr)


@dataclass(slots=True)
class _Iface:
    linktype: int
    name: str
    ts_div: int  # file ticks per second
    ts_offset: int  # seconds added to every stamp (if_tsoffset)
    # NFLOG: a parser per TLV byte order, learning this interface's message shapes
    parsers: dict[struct.Struct, BodyParser] = field(default_factory=dict)


def _ip_from_frame(linktype: int, data: memoryview) -> memoryview | None:
    """The IP packet inside a non-NFLOG frame; None for frames that carry none (ARP, ...)."""
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
        return data
    if linktype == LINKTYPE_EN10MB:
        off = 12
        while off + 2 <= len(data):
            etype = _BE16.unpack_from(data, off)[0]
            if etype in VLAN_TPIDS:
                off += 4
                continue
            return data[off + 2:] if etype in (ETH_P_IP, ETH_P_IPV6) else None
        return None
    if linktype == LINKTYPE_LINUX_SLL:
        if len(data) < 16:
            return None
        return data[16:] if _BE16.unpack_from(data, 14)[0] in (ETH_P_IP, ETH_P_IPV6) else None
    if linktype == LINKTYPE_LINUX_SLL2:
        if len(data) < 20:
            return None
        return data[20:] if _BE16.unpack_from(data, 0)[0] in (ETH_P_IP, ETH_P_IPV6) else None
    raise AssertionError(f"link type {linktype} reached the frame parser")  # refused by _check_linktype


def _check_linktype(path: str, linktype: int, where: str) -> None:
    """Refuse a link type we cannot take IP packets out of, in one line that says which we can."""
    if linktype not in READABLE:
        names = ", ".join(f"{name} ({n})" for n, name in READABLE.items())
        raise UserError(f"{path}: link type {linktype} ({where}) is not one ipsec-capture reads: it "
                        f"reads {names}; capture on an IP interface or convert the file (editcap -T)")


def _record(path: str, off: int, iface: _Iface, time_ns: int, data: bytes, orig: int,
            comment: str | None) -> Record | None:
    """The Record of one frame; `data` is that frame's own bytes (views into it stay small)."""
    if iface.linktype == LINKTYPE_NFLOG:
        try:
            order = detect_tlv_order(data)
            parser = iface.parsers.get(order)
            if parser is None:
                parser = iface.parsers[order] = BodyParser(order)
            rec = parser.parse(memoryview(data), time_ns)
        except UserError as err:
            raise UserError(f"{path}: bad NFLOG packet in the block at offset {off}: {err}") from None
        rec.time_ns = time_ns
        rec.point = rec.point or iface.name
        if orig > len(data):
            rec.length = len(rec.payload) + orig - len(data)
    elif iface.linktype in RAW_LINKTYPES:
        rec = Record(time_ns, iface.name, data, _FAMILY_BY_FIRST[data[0]] if data else 0, orig)
    else:
        ip = _ip_from_frame(iface.linktype, memoryview(data))
        if ip is None:
            return None
        # the frame's own header is not part of the IP packet's length (an original length
        # shorter than that header says nothing: the packet's length is then what was captured)
        rec = Record(time_ns, iface.name, ip, family_of(ip), length=max(orig - (len(data) - len(ip)), 0))
    rec.family = rec.family or family_of(rec.payload)
    rec.comment = comment
    return rec


class _Window:
    """The unread part of the file as one bytes object, refilled a chunk at a time.

    `buf[pos:]` is what has not been consumed; `base` is the file offset of `buf[0]` (for error
    messages). Parsers read records straight out of `buf` and call `fill` only when the next one
    is not whole in memory. A regular file is re-read from the first unconsumed byte instead of
    joining the rest of a chunk to the next: one allocation of the same size per chunk, no copy,
    and the allocator reuses the freed chunk instead of growing and trimming the heap."""

    __slots__ = ("_fh", "_seekable", "base", "buf", "pos")

    # read() of a size allocates that size before the file says how much it has: a record that
    # claims more than a chunk is first checked against the bytes left in the file, so a length
    # field of a few GiB in a small file costs no more memory than the file

    def __init__(self, fh: BinaryIO, head: bytes) -> None:
        self._fh = fh
        self._seekable = fh.seekable()
        self.buf = head
        self.pos = 0
        self.base = 0

    def fill(self, need: int) -> bool:
        """Have at least `need` unconsumed bytes in `buf`; False when the file ends first (what is
        there stays in `buf[pos:]`)."""
        have = len(self.buf) - self.pos
        if have >= need:
            return True
        if need > CHUNK and self._seekable and self._fh.tell() + need - have > os.fstat(
                self._fh.fileno()).st_size:
            return False
        if self._seekable:
            self._fh.seek(-have, os.SEEK_CUR)
            self.base += self.pos
            self.pos = 0
            self.buf = self._fh.read(max(CHUNK, need))
            return len(self.buf) >= need
        parts = [self.buf[self.pos:]]
        while have < need:
            more = self._fh.read(CHUNK)  # what arrived, never what a length field claims
            if not more:
                break
            parts.append(more)
            have += len(more)
        self.base += self.pos
        self.buf = b"".join(parts)
        self.pos = 0
        return have >= need

    @property
    def offset(self) -> int:
        """File offset of the first unconsumed byte."""
        return self.base + self.pos

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos


def read_records(path: str, warn: Warn = _stderr_warning, *, borrow: bool = False,
                 share: Share | None = None) -> Iterator[Record]:
    """Every IP packet of a pcap or pcapng file, in file order.

    `borrow`: for a caller that is done with each record before taking the next (decrypt), the
    raw-IP pcap reader may hand out one Record object over and over, refilled per packet, with
    the payload a view into the reader's chunk: no copy and no new Record per packet. A record
    kept past the next one changes under the caller (and would pin megabytes of chunk).
    `share`: only that share's records, where the reader can skip (see Share)."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the generator's finally
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    try:
        head = fh.read(4)
        if len(head) < 4:
            raise UserError(f"{path}: not a pcap or pcapng file (only {len(head)} bytes)")
        magic_le = struct.unpack("<I", head)[0]
        if magic_le == BT_SHB:
            yield from _read_pcapng(_Window(fh, head), path, warn)
        elif magic_le in (PCAP_MAGIC_US, PCAP_MAGIC_NS) or struct.unpack(">I", head)[0] in (
                PCAP_MAGIC_US, PCAP_MAGIC_NS):
            yield from _read_pcap(_Window(fh, head), path, head, warn, borrow, share)
        else:
            raise UserError(f"{path}: not a pcap or pcapng file (magic 0x{magic_le:08x} at offset 0)")
    finally:
        fh.close()


def _read_pcap(win: _Window, path: str, head: bytes, warn: Warn, borrow: bool = False,
               share: Share | None = None) -> Iterator[Record]:
    """The file header, then the record loop for its link type (returned, not delegated to:
    each generator level costs every packet a resume)."""
    order = "<" if struct.unpack("<I", head)[0] in (PCAP_MAGIC_US, PCAP_MAGIC_NS) else ">"
    nsec = struct.unpack(order + "I", head)[0] == PCAP_MAGIC_NS
    if not win.fill(24):
        raise UserError(f"{path}: pcap file header cut short at offset {win.left}")
    linktype = struct.unpack_from(order + "HHiIII", win.buf, 4)[5] & 0x0FFFFFFF  # upper bits: FCS info
    _check_linktype(path, linktype, "pcap file header")
    iface = _Iface(linktype, f"if{0}", 1_000_000_000 if nsec else 1_000_000, 0)
    win.pos = 24
    if linktype in RAW_LINKTYPES:
        return _pcap_raw(win, path, order, 1 if nsec else 1000, iface.name, warn, borrow, share)
    return _pcap_frames(win, path, order, 1 if nsec else 1000, iface, warn)


def _pcap_cut(win: _Window, path: str, count: int, warn: Warn) -> None:
    """At the end of the file: warn if it stops inside a record (a capture that crashed)."""
    if win.left >= 16:
        warn(f"{path}: last packet at offset {win.offset} is cut short; read {count} packets")
    elif win.left:
        warn(f"{path}: last packet header at offset {win.offset} is cut short; read {count} packets")


def _pcap_raw(win: _Window, path: str, order: str, mult: int, point: str, warn: Warn,
              borrow: bool = False, share: Share | None = None) -> Iterator[Record]:
    """Raw-IP pcap, the common case, kept tight: each packet is one slice and one Record (when
    borrowing: a view of the chunk, and the same Record refilled). With a share, the other
    workers' runs cost a header unpack a record."""
    unpack = struct.Struct(order + "IIII").unpack_from
    family = _FAMILY_BY_FIRST
    count = 0
    rec = Record(0, point, b"")  # the borrowed record
    skip = left = others = block = 0  # records to pass over next; left of this worker's run
    if share is not None:
        share.skips = True
        block, others = share.block, share.block * (share.jobs - 1)
        skip, left = share.k * share.block, share.block
    while True:
        buf, pos = win.buf, win.pos
        end = len(buf)
        cut = memoryview(buf) if borrow else buf  # what packets are sliced from
        need = 16
        while pos + 16 <= end:
            sec, frac, incl, orig = unpack(buf, pos)
            if incl > MAX_RECORD:
                raise UserError(f"{path}: malformed pcap record at offset {win.base + pos}: "
                                f"captured length {incl}")
            stop = pos + 16 + incl
            if stop > end:
                need = 16 + incl
                break
            if skip:
                skip -= 1
                pos = stop
                count += 1
                continue
            data = cut[pos + 16:stop]
            pos = stop
            count += 1
            time_ns = sec * 1_000_000_000 + frac * mult
            fam = family[data[0]] if data else 0
            if left:
                left -= 1
                if not left:  # this worker's run ends here: the others' runs follow
                    left, skip = block, others
            if borrow:
                rec.time_ns, rec.payload, rec.family, rec.length = time_ns, data, fam, orig
                yield rec
            else:
                yield Record(time_ns, point, data, fam, orig)
        win.pos = pos
        if not win.fill(need):
            _pcap_cut(win, path, count, warn)
            if share is not None:
                share.count = count
            return


def _pcap_frames(win: _Window, path: str, order: str, mult: int, iface: _Iface,
                 warn: Warn) -> Iterator[Record]:
    """Pcap of any other link type: each frame through `_record`."""
    unpack = struct.Struct(order + "IIII").unpack_from
    count = 0
    while True:
        if not win.fill(16):
            _pcap_cut(win, path, count, warn)
            return
        off = win.offset
        sec, frac, incl, orig = unpack(win.buf, win.pos)
        if incl > MAX_RECORD:
            raise UserError(f"{path}: malformed pcap record at offset {off}: captured length {incl}")
        if not win.fill(16 + incl):
            _pcap_cut(win, path, count, warn)
            return
        data = win.buf[win.pos + 16:win.pos + 16 + incl]
        win.pos += 16 + incl
        rec = _record(path, off, iface, sec * 1_000_000_000 + frac * mult, data, orig, None)
        if rec is not None:
            count += 1
            yield rec


def _options(body: memoryview, start: int, order: str) -> Iterator[tuple[int, memoryview]]:
    opt = struct.Struct(order + "HH")
    off = start
    while off + 4 <= len(body):
        code, length = opt.unpack_from(body, off)
        if code == 0:
            return
        value = body[off + 4: off + 4 + length]
        if len(value) < length:
            return  # options run past the block: ignore the rest rather than refuse the packet
        yield code, value
        off += 4 + length + (-length % 4)


def _text(value: memoryview) -> str:
    return bytes(value).rstrip(b"\0").decode("utf-8", "replace")


def _read_pcapng(win: _Window, path: str, warn: Warn) -> Iterator[Record]:
    order = "<"
    ifaces: list[_Iface] = []
    count = 0
    while True:
        off = win.offset
        if not win.fill(8):
            if win.left:
                warn(f"{path}: last block at offset {off} is cut short; read {count} packets")
            return
        btype = struct.unpack_from(order + "I", win.buf, win.pos)[0]
        if btype == BT_SHB:
            if not win.fill(12):
                warn(f"{path}: section header at offset {off} is cut short; read {count} packets")
                return
            bom = win.buf[win.pos + 8:win.pos + 12]
            if struct.unpack("<I", bom)[0] == BYTE_ORDER_MAGIC:
                order = "<"
            elif struct.unpack(">I", bom)[0] == BYTE_ORDER_MAGIC:
                order = ">"
            else:
                raise UserError(f"{path}: bad byte-order magic in the section header at offset {off}")
            ifaces = []
        blen = struct.unpack_from(order + "I", win.buf, win.pos + 4)[0]
        if blen < 12 or blen % 4 or blen > MAX_RECORD:
            raise UserError(f"{path}: malformed pcapng block at offset {off}: length {blen}")
        if not win.fill(blen):
            warn(f"{path}: last block at offset {off} is cut short; read {count} packets")
            return
        pos = win.pos
        if struct.unpack_from(order + "I", win.buf, pos + blen - 4)[0] != blen:
            raise UserError(f"{path}: malformed pcapng block at offset {off}: trailing length differs")
        win.pos = pos + blen
        if btype == BT_IDB:
            body = memoryview(win.buf)[pos + 8:pos + blen - 4]
            ifaces.append(_idb(path, off, body, order, len(ifaces)))
        elif btype in (BT_EPB, BT_PB, BT_SPB):
            body = memoryview(win.buf)[pos + 8:pos + blen - 4]
            rec = _packet(path, off, btype, body, order, ifaces)
            if rec is not None:
                count += 1
                yield rec


def _idb(path: str, off: int, body: memoryview, order: str, index: int) -> _Iface:
    if len(body) < 8:
        raise UserError(f"{path}: malformed interface block at offset {off}")
    linktype = struct.unpack_from(order + "H", body)[0]
    iface = _Iface(linktype, f"if{index}", 1_000_000, 0)
    for code, value in _options(body, 8, order):
        if code == IF_NAME:
            iface.name = _text(value) or iface.name
        elif code == IF_TSRESOL and len(value) >= 1:
            r = value[0]
            iface.ts_div = 2 ** (r & 0x7F) if r & 0x80 else 10 ** min(r, 18)
        elif code == IF_TSOFFSET and len(value) >= 8:
            iface.ts_offset = struct.unpack_from(order + "q", value)[0]
    return iface


def _packet(path: str, off: int, btype: int, body: memoryview, order: str,
            ifaces: list[_Iface]) -> Record | None:
    """The Record of a packet block; `body` is a view of the chunk, so the packet is copied out."""
    if btype == BT_SPB:
        if len(body) < 4 or not ifaces:
            raise UserError(f"{path}: malformed simple packet block at offset {off}")
        orig = struct.unpack_from(order + "I", body)[0]
        data = bytes(body[4:4 + min(orig, len(body) - 4)])
        if ifaces[0].linktype not in READABLE:
            _check_linktype(path, ifaces[0].linktype, f"interface 0, simple packet block at offset {off}")
        return _record(path, off, ifaces[0], 0, data, orig, None)
    if btype == BT_EPB:
        if len(body) < 20:
            raise UserError(f"{path}: malformed packet block at offset {off}")
        iid, hi, lo, caplen, orig = struct.unpack_from(order + "IIIII", body)
        start = 20
    else:
        if len(body) < 20:
            raise UserError(f"{path}: malformed packet block at offset {off}")
        iid, _drops, hi, lo, caplen, orig = struct.unpack_from(order + "HHIIII", body)
        start = 20
    if iid >= len(ifaces):
        raise UserError(f"{path}: packet block at offset {off} names interface {iid}, "
                        f"but only {len(ifaces)} are defined")
    if start + caplen > len(body):
        raise UserError(f"{path}: malformed packet block at offset {off}: captured length {caplen}")
    data = bytes(body[start:start + caplen])  # the packet's own bytes: body is a view of a chunk
    comment = None
    for code, value in _options(body, start + caplen + (-caplen % 4), order):
        if code == OPT_COMMENT:
            comment = _text(value)
            break
    iface = ifaces[iid]
    if iface.linktype not in READABLE:
        _check_linktype(path, iface.linktype, f"interface {iid}, packet block at offset {off}")
    ticks = (hi << 32) | lo
    sec, frac = divmod(ticks, iface.ts_div)
    time_ns = (sec + iface.ts_offset) * 1_000_000_000 + frac * 1_000_000_000 // iface.ts_div
    if not 0 <= time_ns <= MAX_TIME_NS:
        raise UserError(f"{path}: packet block at offset {off} has a time stamp out of range "
                        f"({sec + iface.ts_offset} s: before 1970 or after 2554)")
    return _record(path, off, iface, time_ns, data, orig, comment)
