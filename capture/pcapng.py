"""Our pcapng writer: one interface per capture point, NFLOG or raw IP, comments and direction.

Blocks are assembled in memory and written with os.write in whole blocks only, so a crash (or a
full disk, where we cut back to the last complete write) leaves a file that ends on a block
boundary and that tshark reads to the end. Pending blocks sit in one preallocated buffer, each
packet block filled in place: `reserve` says where a packet's bytes go, the caller (or `write`)
puts them there, and `commit_packet` packs the header and options around them.
So decrypt writes a plaintext straight into its block, and no packet is copied more than once
before the write. Per-packet options (direction flag and comment) repeat for every packet of a
flow, so their encoded bytes are cached per (point, hook, devices, mark); a caller's per-packet
comment (decrypt's "ESP SPI ... seq N") goes in with the cached rest in one pack, so a packet
costs two packs into the buffer and no string work here.
Files are created mode 0600: captures hold cleartext.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import struct
from collections.abc import Callable
from types import TracebackType

from ipsec_capture.errors import UserError
from ipsec_capture.models import Record

from .nflog_tlv import INBOUND_HOOKS, OUTBOUND_HOOKS, build_body

# pcapng (draft-ietf-opsawg-pcapng) block types and option codes
BT_SHB = 0x0A0D0D0A
BT_IDB = 0x00000001
BT_EPB = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D
OPT_ENDOFOPT = 0
OPT_COMMENT = 1
SHB_HARDWARE = 2
SHB_OS = 3
SHB_USERAPPL = 4
IF_NAME = 2
IF_DESCRIPTION = 3
IF_TSRESOL = 9
EPB_FLAGS = 2
EPB_INBOUND, EPB_OUTBOUND = 0x1, 0x2  # epb_flags bits 0-1: direction

# pcap-linktype(7)
LINKTYPES = {"nflog": 239, "raw": 101}

_HDR = struct.Struct("<II")  # block type, block total length
_SHB_BODY = struct.Struct("<IHHq")  # byte-order magic, major, minor, section length (-1: unknown)
_IDB_BODY = struct.Struct("<HHI")  # linktype, reserved, snaplen
_EPB_HEAD = struct.Struct("<IIIIIII")  # type, length, interface id, ts high, ts low, caplen, origlen
_OPT = struct.Struct("<HH")
_U32 = struct.Struct("<I")
_END = _OPT.pack(OPT_ENDOFOPT, 0)
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")
EPB_HEAD_LEN = _EPB_HEAD.size  # where a packet's bytes start in its block

FLUSH_AT = 1 << 20  # bytes pending before write() flushes by itself
_BLOCK_ROOM = 512  # room reserved past a packet's bytes for its options (a longer comment grows the buffer)

_pack_head = _EPB_HEAD.pack_into

# What follows a packet's bytes is packed at once: `lead` (the data's padding, then the comment
# option's header, or with no comment the cached options), the caller's comment, `tail` (the
# cached rest of the options) and the block's closing length. One Struct per shape.
_tails: dict[tuple[int, int, int], Callable[..., None]] = {}


def _tail_packer(lead: int, clen: int, tail: int) -> Callable[..., None]:
    pack = _tails.get((lead, clen, tail))
    if pack is None:
        pack = struct.Struct(f"<{lead}s{clen}s{tail}sI").pack_into
        if len(_tails) < 4096:
            _tails[(lead, clen, tail)] = pack
    return pack


# A tail shape of one point: (pack, block length minus packet length, lead, tail); by caller's
# comment length << 2 | packet length mod 4.
_Shape = tuple[Callable[..., None], int, bytes, bytes]
# Per (point, hook, devices, mark): (interface id, its shapes met so far, the options without a
# caller's comment, the length of the "; where" text joined to a caller's comment, the bytes
# after that comment by its length mod 4).
_PointOptions = tuple[int, dict[int, _Shape], bytes, int, tuple[bytes, ...]]


MAX_OPTION = 0xFFFC  # an option's length is a u16: a longer text (a name read from someone's file) is cut
_MAX_WHERE = 1024  # the "point in=... out=..." text of a comment, cut (a point name can be any text)
# a caller's comment is cut so that it and the "; where" text joined to it fit one option
_MAX_COMMENT = MAX_OPTION - 2 - _MAX_WHERE
MAX_ORIG = 0xFFFFFFFF  # an original length is a u32: a longer one (an NFLOG body around a 4 GiB
                       # packet's header) is written as the most the field holds


def option(code: int, value: bytes) -> bytes:
    value = value[:MAX_OPTION]
    return _OPT.pack(code, len(value)) + value + b"\0" * (-len(value) % 4)


def _block(btype: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return _HDR.pack(btype, total) + body + _U32.pack(total)


def _ifname_lookup() -> Callable[[int], str]:
    names: dict[int, str] = {}

    def lookup(index: int) -> str:
        name = names.get(index)
        if name is None:
            try:
                name = socket.if_indextoname(index)
            except OSError:
                name = f"if{index}"
            names[index] = name
        return name

    return lookup


def _shape(caplen: int, clen: int, alone: bytes, joined_len: int, after: tuple[bytes, ...]) -> _Shape:
    """How a block ends after `caplen` bytes of packet and a caller's comment of `clen` bytes."""
    pad = _PAD[caplen & 3]
    if clen:
        lead, tail = pad + _OPT.pack(OPT_COMMENT, clen + joined_len), after[clen & 3]
    else:
        lead, tail = pad + alone, b""
    return (_tail_packer(len(lead), clen, len(tail)), EPB_HEAD_LEN + len(lead) + clen + len(tail) + 4,
            lead, tail)


def _whole_blocks(blocks: memoryview, done: int) -> tuple[int, int]:
    """(bytes, packet blocks) of the whole blocks within the first `done` bytes of `blocks`
    (a run of our own blocks): where a failed write may cut the file. Walked only on failure."""
    at = packets = 0
    while at + 8 <= done:
        btype, total = _HDR.unpack_from(blocks, at)
        if at + total > done:
            break
        at += total
        packets += btype == BT_EPB
    return at, packets


class PcapngWriter:
    """Write Records to a pcapng file: `interface(point)` once per point, then `write(record)`."""

    def __init__(self, path: str | os.PathLike[str] | None, *, linktype: str = "nflog", snaplen: int = 262144,
                 application: str = "ipsec-capture", comment: str | None = None,
                 ifname: Callable[[int], str] | None = None, names_from_comments: bool = False) -> None:
        """`path` None: no file and no section header; blocks collect in memory until `take()`,
        for a caller that places them in a file itself (decrypt/parallel.py).
        `names_from_comments`: records read back from a capture name their devices as its
        comments do (`in=NAME`), not as this host would (decrypt on another machine)."""
        if linktype not in LINKTYPES:
            raise UserError(f"unknown link type {linktype!r}: choose from {', '.join(LINKTYPES)}")
        self.path = os.fspath(path) if path is not None else None
        self.linktype = linktype
        self.snaplen = snaplen
        self._nflog = linktype == "nflog"
        lookup = ifname or _ifname_lookup()
        self._learned: dict[int, str] | None = {} if names_from_comments else None
        learned = self._learned
        self._ifname = lookup if learned is None else (lambda index: learned.get(index) or lookup(index))
        self._ifaces: dict[str, int] = {}
        self._opts: dict[tuple, _PointOptions] = {}
        # whole blocks not yet written: buf[:_used]. `buf` and `view` are public for callers that
        # fill a reserved packet in place; both change only when the buffer grows (in reserve).
        self.buf = bytearray(2 * FLUSH_AT)
        self.view = memoryview(self.buf)
        self._used = 0
        self._reserved: _PointOptions = (0, {}, b"", 0, ())  # of the packet between reserve and commit
        self._spare: list[bytearray] = []  # buffers given back after take()
        self.committed = 0  # bytes on disk, always at a block boundary
        self.packets = 0
        self.packets_committed = 0  # packets in `committed` (what a crash or full disk keeps)
        self._failed = False
        self._flush_at = FLUSH_AT
        if self.path is None:
            self._fd, self._flush_at = -1, 1 << 62  # in memory: only take() empties it
            return
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise UserError(f"cannot write {self.path}: {err.strerror}") from None
        os.fchmod(self._fd, 0o600)  # an existing file keeps its mode on O_TRUNC
        self._section_header(application, comment)

    def _section_header(self, application: str, comment: str | None) -> None:
        uname = platform.uname()
        opts = option(SHB_HARDWARE, uname.machine.encode())
        opts += option(SHB_OS, f"{uname.system} {uname.release}".encode())
        opts += option(SHB_USERAPPL, application.encode())
        opts += option(OPT_COMMENT, f"hostname: {socket.gethostname()}".encode())
        if comment:
            opts += option(OPT_COMMENT, comment.encode())
        self._add_block(_block(BT_SHB, _SHB_BODY.pack(BYTE_ORDER_MAGIC, 1, 0, -1) + opts + _END))

    @property
    def size(self) -> int:
        """Bytes written so far, including what is still buffered."""
        return self.committed + self._used

    def _add_block(self, block: bytes) -> None:
        at = self._room(len(block))
        self.buf[at:at + len(block)] = block
        self._used = at + len(block)

    def _room(self, need: int) -> int:
        """Where `need` more bytes go: flushed first when the buffer cannot hold them, grown
        when even an empty one cannot (or when there is no file to flush to)."""
        used = self._used
        if used + need <= len(self.buf):
            return used
        if self._fd >= 0 and used:
            self.flush()
            used = 0
        if used + need > len(self.buf):
            self._grow(used + need, used)
        return used

    def _grow(self, size: int, keep: int) -> bytearray:
        """A bigger buffer (at least `size` bytes, twice the old one) with the old one's first
        `keep` bytes."""
        bigger = bytearray(max(size, 2 * len(self.buf)))
        bigger[:keep] = self.view[:keep]
        self.buf, self.view = bigger, memoryview(bigger)
        return bigger

    def reserve(self, record: Record, need: int) -> int:
        """Room for `record`'s packet block with up to `need` bytes of packet: the offset in
        `buf` where the packet's bytes go. The caller writes them there (anything past the
        packet may be scribbled on; `commit_packet` overwrites it) and then calls commit_packet.
        A point's first packet gets its interface block here, before the room is handed out."""
        point_opts = self._opts.get((record.point, record.hook, record.indev, record.outdev, record.mark))
        if point_opts is None:
            point_opts = self._point_options(record)
        self._reserved = point_opts
        need += EPB_HEAD_LEN + _BLOCK_ROOM
        used = self._used
        if used + need > len(self.buf):
            used = self._room(need)
        return used + EPB_HEAD_LEN

    def interface(self, name: str, description: str = "", emit: bool = True) -> int:
        """Interface id for capture point `name`, adding its IDB the first time (`emit` False:
        only the id, for a caller whose IDB goes in another part of the file)."""
        iid = self._ifaces.get(name)
        if iid is not None:
            return iid
        iid = len(self._ifaces)
        self._ifaces[name] = iid
        if not emit:
            return iid
        opts = option(IF_NAME, name.encode())
        if description:
            opts += option(IF_DESCRIPTION, description.encode())
        opts += option(IF_TSRESOL, b"\x09")  # timestamps in nanoseconds
        body = _IDB_BODY.pack(LINKTYPES[self.linktype], 0, self.snaplen) + opts + _END
        self._add_block(_block(BT_IDB, body))
        return iid

    def _point_options(self, rec: Record) -> _PointOptions:
        """A (point, hook, devices, mark) seen for the first time: its interface (the IDB goes
        before its first packet) and option bytes, cached for the packets that follow."""
        iid = self._ifaces.get(rec.point)
        if iid is None:
            iid = self.interface(rec.point or "unknown")
        if self._learned is not None and rec.comment:
            self._learn_names(rec, self._learned)
        point_opts = self._encode_point_options(rec, iid)
        if len(self._opts) < 65536:
            self._opts[(rec.point, rec.hook, rec.indev, rec.outdev, rec.mark)] = point_opts
        return point_opts

    def _learn_names(self, rec: Record, learned: dict[int, str]) -> None:
        """The device names of a record's own comment (`in=NAME out=NAME`, as we write them)
        into `learned` (self._learned, when names are learned from comments)."""
        for word in rec.comment.split() if rec.comment else ():
            if word.startswith("in=") and rec.indev:
                learned[rec.indev] = word[3:]
            elif word.startswith("out=") and rec.outdev:
                learned[rec.outdev] = word[4:]

    def _encode_point_options(self, rec: Record, iid: int) -> _PointOptions:
        """Comment: the caller's text first, then where the packet was seen (point, devices, mark)
        when the source said so (NFLOG metadata); a bare IP record gets no automatic comment.

        Returns (interface id, options without a caller's comment, length of the "; where" part,
        and per caller's comment length mod 4 the bytes that follow that comment: "; where",
        padding, direction flag, end of options)."""
        where = b""
        if rec.hook is not None or rec.indev or rec.outdev or rec.mark is not None:
            words = [rec.point or "?"]
            if rec.indev:
                words.append(f"in={self._ifname(rec.indev)}")
            if rec.outdev:
                words.append(f"out={self._ifname(rec.outdev)}")
            if rec.mark is not None:
                words.append(f"mark=0x{rec.mark:x}")
            where = " ".join(words).encode()[:_MAX_WHERE]
        flags = b""
        if rec.hook in INBOUND_HOOKS:
            flags = option(EPB_FLAGS, _U32.pack(EPB_INBOUND))
        elif rec.hook in OUTBOUND_HOOKS:
            flags = option(EPB_FLAGS, _U32.pack(EPB_OUTBOUND))
        alone = (option(OPT_COMMENT, where) if where else b"") + flags + _END
        joined = b"; " + where if where else b""
        after = tuple(joined + _PAD[(k + len(joined)) & 3] + flags + _END for k in range(4))
        return iid, {}, alone, len(joined), after

    def write(self, record: Record, comment: str | None = None) -> None:
        """Append one packet on its point's interface (created on first use). The live capture
        writes every packet through here, so what `reserve` does is inline."""
        if self._nflog:
            data = record.nflog if record.nflog is not None else build_body(record)
            orig = len(data) + record.wire_length - len(record.payload)
        else:
            data = record.payload
            orig = record.wire_length
        point_opts = self._opts.get((record.point, record.hook, record.indev, record.outdev, record.mark))
        if point_opts is None:
            point_opts = self._point_options(record)
        self._reserved = point_opts
        caplen = len(data)
        at = self._used + EPB_HEAD_LEN
        if at + caplen + _BLOCK_ROOM > len(self.buf):
            at = self._room(EPB_HEAD_LEN + caplen + _BLOCK_ROOM) + EPB_HEAD_LEN
        self.buf[at:at + caplen] = data  # a packet over the snap length is cut in commit_packet
        self.commit_packet(record, caplen, orig, comment.encode() if comment else b"")

    def commit_packet(self, record: Record, caplen: int, orig: int, comment: bytes = b"") -> None:
        """Close the packet block of the last `reserve(record, ...)`, whose `caplen` bytes the
        caller put where it said: pack its header, `record`'s time and the options of its point
        and metadata, and `comment` (encoded; b"": none). A packet longer than the snap length
        is cut to it."""
        if caplen > self.snaplen:
            caplen = self.snaplen
        if orig > MAX_ORIG:
            orig = MAX_ORIG
        if len(comment) > _MAX_COMMENT:
            comment = comment[:_MAX_COMMENT]
        iid, shapes, alone, joined_len, after = self._reserved
        key = len(comment) << 2 | caplen & 3
        shape = shapes.get(key)
        if shape is None:
            shape = shapes[key] = _shape(caplen, len(comment), alone, joined_len, after)
        pack, extra, lead, tail = shape
        start = self._used
        total = caplen + extra
        end = start + total
        buf = self.buf
        if end > len(buf):  # a block longer than reserved (a long comment): the packet is kept
            buf = self._grow(end, len(buf))
        pack(buf, start + EPB_HEAD_LEN + caplen, lead, comment, tail, total)
        ts = record.time_ns
        _pack_head(buf, start, BT_EPB, total, iid, ts >> 32, ts & 0xFFFFFFFF, caplen, orig)
        self.packets += 1
        self._used = end
        if end >= self._flush_at:
            self.flush()

    def flush(self) -> None:
        """Write every whole block buffered so far. On an error (ENOSPC, EFBIG) the file is cut
        back to the last whole block the kernel took (a full disk takes part of a write first),
        so it still ends on a block boundary and keeps every packet that fit, and the OSError
        propagates."""
        if not self._used:
            return
        view = self.view[:self._used]
        self._used = 0
        done = 0
        try:
            while done < len(view):
                done += os.write(self._fd, view[done:])
        except OSError:
            keep, packets = _whole_blocks(view, done)
            try:
                os.ftruncate(self._fd, self.committed + keep)
            except OSError:
                keep = packets = 0
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self.committed)
            self.committed += keep
            self.packets_committed += packets
            self._failed = True
            raise
        self.committed += done
        self.packets_committed = self.packets

    def take(self) -> memoryview:
        """The blocks collected since the last take() (an in-memory writer's output, for a
        caller that writes them where it wants), removed from the writer, which goes on in a
        buffer of its own (one given back with `give_back` if there is one: a fresh buffer of
        megabytes costs a page fault every 4 KiB on first use)."""
        blocks = self.view[:self._used]
        self.buf = self._spare.pop() if self._spare else bytearray(len(self.buf))
        self.view = memoryview(self.buf)
        self._used = 0
        return blocks

    def give_back(self, blocks: memoryview) -> None:
        """What take() gave, once written: its buffer serves again."""
        if isinstance(blocks.obj, bytearray) and len(blocks.obj) >= len(self.buf):
            self._spare.append(blocks.obj)

    def hand_off(self) -> None:
        """Another process writes this file from now on (start's unprivileged reader, forked
        after a flush): close our descriptor and write nothing more, not even at close. What
        that process ends with is set in `committed` / `packets_committed` by the caller."""
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._used = -1, 0

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            if not self._failed:  # after a failed flush the file already ends where it must
                self.flush()
        finally:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> PcapngWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
