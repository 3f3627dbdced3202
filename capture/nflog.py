"""Our own nfnetlink_log reader: bind an NFLOG group on a NETLINK_NETFILTER socket, read Records.

Why our own: scapy has no nflog socket, and libpcap's `nflog:N` stalls on batched messages
(DESIGN.md §3). The kernel batches packets into one skb (up to `nlbufsiz` bytes, flushed after
`qthresh` packets or `timeout` hundredths of a second); one recv returns one batch, which we
split with memoryviews into the same bytes object, so a packet costs one Record and, once its
message shape has been seen, no TLV walk (BodyParser).
Loss is never hidden: ENOBUFS on recv (the kernel could not queue a batch) and gaps in the
per-instance sequence number (NFULNL_CFG_F_SEQ) are both counted.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from dataclasses import dataclass
from types import TracebackType

from ipsec_capture.errors import UserError, require_root
from ipsec_capture.netns import entered, netns_inode

from .nflog_tlv import BodyParser

NETLINK_NETFILTER = 12  # <linux/netlink.h>
SOL_NETLINK = 270  # <linux/socket.h>
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>
NLMSG_ERROR = 2  # <linux/netlink.h>
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NFNL_SUBSYS_ULOG = 4  # <linux/netfilter/nfnetlink.h>
NFNETLINK_V0 = 0
# <linux/netfilter/nfnetlink_log.h>
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1  # struct nfulnl_msg_config_cmd { __u8 command; }
NFULA_CFG_MODE = 2  # struct nfulnl_msg_config_mode { __be32 copy_range; __u8 copy_mode; __u8 _pad; }
NFULA_CFG_NLBUFSIZ = 3  # __be32
NFULA_CFG_TIMEOUT = 4  # __be32, 1/100 s
NFULA_CFG_QTHRESH = 5  # __be32
NFULA_CFG_FLAGS = 6  # __be16
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_CFG_CMD_PF_BIND = 3
NFULNL_CFG_CMD_PF_UNBIND = 4
NFULNL_COPY_PACKET = 2
NFULNL_CFG_F_SEQ = 0x0001
NFULNL_CFG_F_SEQ_GLOBAL = 0x0002
NFULNL_COPY_RANGE_MAX = 0xFFFF - 4  # kernel clamps copy_range to this

MSG_PACKET = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
MSG_CONFIG = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLMSG_HEAD = struct.Struct("=IH")  # what the hot path needs: len, type
NLA = struct.Struct("=HH")
NFGENMSG = struct.Struct("!BBH")
ERRNO = struct.Struct("=i")
BE32 = struct.Struct("!I")
MODE = struct.Struct("!IBB")

DEFAULT_RCVBUF = 8 << 20  # with SO_RCVBUFFORCE; without it the kernel caps at rmem_max
PLAIN_RCVBUF = 131072  # DESIGN.md: what SO_RCVBUF honours here without FORCE
NLBUFSIZ = 65536  # batch skb size: fewer recv calls per packet
QTHRESH = 256  # packets per batch at most: fewer, fuller wake-ups (64 KiB hold ~300 small packets)
TIMEOUT_CS = 1  # flush a partial batch after 10 ms: packets arrive promptly
RECV_SIZE = 1 << 18


def stamp_late_ns(timeout_cs: int) -> int:
    """How late a packet's stamp may be: one the kernel did not stamp (outbound hooks, and inbound
    ones while no socket asked for timestamps) is stamped when its batch is read, up to the
    group's flush timeout later (the events log header says it: bpf.eventlog.make_header)."""
    return timeout_cs * 10_000_000


def _attr(atype: int, value: bytes) -> bytes:
    return NLA.pack(4 + len(value), atype) + value + b"\0" * (-len(value) % 4)


@dataclass(slots=True)
class ReaderStats:
    received: int = 0  # NFLOG packet messages parsed
    lost: int = 0  # packets missing from the sequence numbers
    enobufs: int = 0  # recv calls that reported the kernel dropped messages
    batches: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"received": self.received, "lost": self.lost, "enobufs": self.enobufs,
                "batches": self.batches}


class NflogReader:
    """One bound NFLOG group. `read_batch()` never blocks; wait on `fileno()` with select/poll."""

    def __init__(self, group: int, *, snaplen: int = 262144, netns: str | None = None,
                 rcvbuf: int | None = None, qthresh: int = QTHRESH, timeout_cs: int = TIMEOUT_CS) -> None:
        require_root("reading an NFLOG group")
        if not 0 <= group <= 0xFFFF:
            raise UserError(f"NFLOG group {group} out of range: use 0..65535")
        self.group = group
        self.stats = ReaderStats()
        self._next_seq: int | None = None
        self._seq = 0
        self._parse = BodyParser().parse
        self.netns_inode = netns_inode(netns)
        with entered(netns):
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                       NETLINK_NETFILTER)
        try:
            self._sock.bind((0, 0))
            self._set_rcvbuf(rcvbuf)
            self._configure(snaplen, qthresh, timeout_cs)
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise

    def _set_rcvbuf(self, size: int | None) -> None:
        want = DEFAULT_RCVBUF if size is None else size
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, want)
        except OSError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, min(want, PLAIN_RCVBUF))

    @property
    def rcvbuf(self) -> int:
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def fileno(self) -> int:
        return self._sock.fileno()

    def _request(self, family: int, res_id: int, attrs: bytes) -> int:
        """Send one config message and wait for its ack; returns the errno (0 = ok)."""
        self._seq += 1
        body = NFGENMSG.pack(family, NFNETLINK_V0, res_id) + attrs
        msg = NLMSGHDR.pack(16 + len(body), MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, self._seq, 0) + body
        self._sock.send(msg)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            self._sock.settimeout(max(deadline - time.monotonic(), 0.01))
            data = self._sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                mlen, mtype, _flags, seq, _pid = NLMSGHDR.unpack_from(data, off)
                if mlen < 16:
                    break
                if mtype == NLMSG_ERROR and seq == self._seq:
                    return -ERRNO.unpack_from(data, off + 16)[0]
                off += (mlen + 3) & ~3
        raise UserError("the kernel did not answer the NFLOG configuration request (nfnetlink_log loaded?)")

    def _configure(self, snaplen: int, qthresh: int, timeout_cs: int) -> None:
        for family in (socket.AF_INET, socket.AF_INET6):
            # Old kernels need the nfnetlink_log logger bound per family; newer ones treat these
            # as no-ops, and a failure here only matters if packets then never come.
            self._request(family, 0, _attr(NFULA_CFG_CMD, bytes((NFULNL_CFG_CMD_PF_UNBIND,))))
            self._request(family, 0, _attr(NFULA_CFG_CMD, bytes((NFULNL_CFG_CMD_PF_BIND,))))
        err = self._request(socket.AF_UNSPEC, self.group, _attr(NFULA_CFG_CMD, bytes((NFULNL_CFG_CMD_BIND,))))
        # The kernel answers EPERM when another socket owns the group (nfulnl_recv_config); we
        # checked for root already, so EPERM here means busy, as do EBUSY/EEXIST.
        if err in (errno.EPERM, errno.EBUSY, errno.EEXIST):
            raise UserError(f"NFLOG group {self.group} is already read by another process "
                            f"(tcpdump? another ipsec-capture?): stop it or use another --group")
        if err:
            raise UserError(f"cannot bind NFLOG group {self.group}: {os.strerror(err)} "
                            f"(is nfnetlink_log available? modprobe nfnetlink_log)")
        copy_range = min(max(snaplen, 1), NFULNL_COPY_RANGE_MAX)
        attrs = (_attr(NFULA_CFG_MODE, MODE.pack(copy_range, NFULNL_COPY_PACKET, 0))
                 + _attr(NFULA_CFG_NLBUFSIZ, BE32.pack(NLBUFSIZ))
                 + _attr(NFULA_CFG_TIMEOUT, BE32.pack(timeout_cs))
                 + _attr(NFULA_CFG_QTHRESH, BE32.pack(qthresh))
                 + _attr(NFULA_CFG_FLAGS, struct.pack("!H", NFULNL_CFG_F_SEQ | NFULNL_CFG_F_SEQ_GLOBAL)))
        err = self._request(socket.AF_UNSPEC, self.group, attrs)
        if err:
            raise UserError(f"cannot configure NFLOG group {self.group}: {os.strerror(err)}")

    def read_batch(self, max_recv: int = 64) -> list:
        """Records of up to `max_recv` queued batches ([] if none). They share each batch's bytes."""
        out: list = []
        sock = self._sock
        stats = self.stats
        head = NLMSG_HEAD.unpack_from
        parse = self._parse
        append = out.append
        for _ in range(max_recv):
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    stats.enobufs += 1
                    continue
                raise
            now = time.time_ns()
            stats.batches += 1
            mv = memoryview(data)
            n = len(data)
            off = 0
            while off + 16 <= n:
                mlen, mtype = head(mv, off)
                if mlen < 16 or off + mlen > n:
                    break
                if mtype == MSG_PACKET:
                    append(parse(mv[off + 16:off + mlen], now))
                off += (mlen + 3) & ~3
        if out:
            ino = self.netns_inode
            for rec in out:
                rec.netns = ino
            self._check_seq(out)
        stats.received += len(out)
        return out

    def _check_seq(self, recs: list) -> None:
        """Count packets missing from the sequence numbers. The kernel numbers each instance's
        packets in order, so a read whose first number is the one expected and whose last is
        len - 1 further lost nothing: one check a read; only a read with a gap is walked."""
        first, last = recs[0].seq, recs[-1].seq
        expect = self._next_seq
        if (first is not None and last is not None and (expect is None or first == expect)
                and (last - first) & 0xFFFFFFFF == len(recs) - 1):
            self._next_seq = (last + 1) & 0xFFFFFFFF
            return
        for rec in recs:
            seq = rec.seq
            if seq is None:
                continue
            expect = self._next_seq
            if expect is not None and seq != expect:
                gap = (seq - expect) & 0xFFFFFFFF
                if gap < 0x80000000:
                    self.stats.lost += gap
            self._next_seq = (seq + 1) & 0xFFFFFFFF

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        try:
            self._sock.setblocking(True)
            self._request(socket.AF_UNSPEC, self.group, _attr(NFULA_CFG_CMD, bytes((NFULNL_CFG_CMD_UNBIND,))))
        except (OSError, UserError):
            pass  # closing the socket unbinds too
        finally:
            self._sock.close()

    def __enter__(self) -> NflogReader:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
