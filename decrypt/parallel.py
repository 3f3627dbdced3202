"""`decrypt` on several cores: worker processes decrypt interleaved blocks of packets and write
them straight into OUT at offsets the parent hands out in packet order.

Why this shape: per packet, reading the capture is cheap (a slice), while decrypting and
building the pcapng block are the expensive parts, and both are independent per packet. So
every worker reads the whole file but decrypts only its own blocks (block b belongs to worker
b mod N), building each in memory. Where a block goes in OUT depends on the sizes of all the
blocks before it, so a worker tells the parent each block's size, and the parent, which sees
the sizes arrive, answers with the block's offset as soon as every earlier block's size is
known; the worker then writes it there (pwrite) and frees it. Packet bytes cross no pipe and
are written once. A worker keeps at most MAX_PENDING built blocks waiting for their offsets.

Interfaces: every worker sees every packet's capture point in file order, so all number the
points alike; the worker whose block holds a point's first packet writes its IDB, right before
that packet, as one process would. The output is the one-process output, byte for byte.

ESN: each worker infers high bits from the SA's replay state and follows the sequence numbers
it sees; skipping the other workers' blocks only moves it forward within the same 2^32
subspace or into the next, which the inference handles (and the ICV check confirms).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import cast

from ipsec_capture.capture.pcapng import PcapngWriter
from ipsec_capture.capture.pcapread import Share, read_records
from ipsec_capture.errors import UserError
from ipsec_capture.models import Record

from .decoder import EspDecoder
from .pipeline import DecryptSummary, decrypt_to_writer

BLOCK = 4096  # packets per block: a few hundred messages per million packets
MAX_PENDING = 3  # built blocks a worker holds while it waits for their offsets
PARALLEL_FROM = 32 << 20  # bytes of input below which one process is as fast (startup)
MAX_AUTO_JOBS = 4
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

Progress = Callable[[int, int], None]  # (packets done, ok so far)
PointNamer = Callable[[PcapngWriter], Callable[..., object]]


def auto_jobs(path: str | os.PathLike[str]) -> int:
    """Processes for `--jobs 0`: the usable cores (up to 4) for a large file, else one."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return 1
    if size < PARALLEL_FROM:
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), MAX_AUTO_JOBS))


def _quiet(_msg: str) -> None:
    pass


def write_at(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (pwrite may write less, rarely on a regular file)."""
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class _Worker:
    """One worker process's side: build its blocks, announce their sizes, write them where the
    parent says. Messages to the parent: ("size", block, bytes, packets, ok), ("done", records
    seen, summary) or ("error", text); from the parent: (block, offset)."""

    def __init__(self, k: int, jobs: int, block: int, out: str, conn: Connection,
                 writer: PcapngWriter) -> None:
        self.k, self.jobs, self.block, self.conn, self.writer = k, jobs, block, conn, writer
        self.share = Share(k, jobs, block)  # what the reader may skip for us
        self.fd = os.open(out, os.O_WRONLY | os.O_CLOEXEC)
        self.pending: dict[int, memoryview] = {}
        self.summary = DecryptSummary()
        self.seen = 0  # records in the file (every worker reads them all)
        self._counted = (0, 0)  # packets and ok of the summary at the last block's end

    def blocks(self, records: Iterable[Record], new_point: Callable[..., object]) -> Iterator[Record]:
        """The records of this worker's blocks; every record's point is numbered, in file order.
        A block is complete when the next record is asked for (the consumer writes each record
        before it asks for the next). `records` come from read_records with this worker's
        share: where the reader skips the others' blocks (one capture point), the j-th record
        handed over is the file's record i below, and its point was first seen in block 0."""
        last: str | None = None
        mine = False
        b = i = -1
        share, size, jobs = self.share, self.block, self.jobs
        for j, rec in enumerate(records):
            i = (j // size * jobs + self.k) * size + j % size if share.skips else j
            if i % self.block == 0:
                if mine:
                    self._finished(b)
                b = i // self.block
                mine = b % self.jobs == self.k
            if rec.point != last:
                last = rec.point
                new_point(last, mine and (i == 0 or not share.skips))
            if mine:
                yield rec
        if mine:
            self._finished(b)
        self.seen = share.count if share.skips else i + 1

    def _finished(self, b: int) -> None:
        blocks = self.writer.take()
        ok = self.summary.totals().get("ok", 0)
        packets = self.summary.packets
        self.conn.send(("size", b, len(blocks), packets - self._counted[0], ok - self._counted[1]))
        self._counted = (packets, ok)
        self.pending[b] = blocks
        self._place(block=len(self.pending) > MAX_PENDING)

    def _place(self, block: bool) -> None:
        """Write the blocks whose offsets have come (waiting for one if `block`)."""
        while self.conn.poll(None if block else 0):
            b, offset = self.conn.recv()
            blocks = self.pending.pop(b)
            write_at(self.fd, blocks, offset)
            self.writer.give_back(blocks)
            block = len(self.pending) > MAX_PENDING

    def finish(self) -> None:
        while self.pending:
            self._place(block=True)
        os.close(self.fd)
        self.conn.send(("done", self.seen, self.summary))


def _work(path: str, k: int, jobs: int, block: int, decoder: EspDecoder, out: str,
          name_points: PointNamer, conn: Connection) -> None:
    """A worker process's whole life; any failure goes to the parent as one line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C ends
    with contextlib.suppress(OSError, AttributeError):  # and a parent killed outright takes us along
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        writer = PcapngWriter(None, linktype="raw", names_from_comments=True)
        worker = _Worker(k, jobs, block, out, conn, writer)
        # every worker reads the same file: one of them gives its warnings
        records = (read_records(path, borrow=True, share=worker.share) if k == 0
                   else read_records(path, _quiet, borrow=True, share=worker.share))
        decrypt_to_writer(worker.blocks(records, name_points(writer)), decoder, worker.summary,
                          writer, None)
        worker.finish()
    except UserError as err:
        conn.send(("error", str(err)))
    except OSError as err:
        conn.send(("error", f"cannot write {out}: {err.strerror or err}"))
    except Exception as err:  # reported by the parent as one line, not lost with the process
        conn.send(("error", f"decrypt worker {k} failed: {type(err).__name__}: {err}"))
    finally:
        conn.close()


def _terminated(signum: int, _frame: object) -> None:
    """SIGTERM while workers run: unwind like Ctrl-C, so they are stopped and no partial file stays."""
    raise SystemExit(128 + signum)


def decrypt_parallel(path: str, decoder: EspDecoder, out: str, jobs: int, name_points: PointNamer, *,
                     block: int = BLOCK, progress: Progress | None = None, every: int = 50_000
                     ) -> DecryptSummary:
    """Decrypt `path` into the raw-IP pcapng `out` with `jobs` processes: the file and counts
    one process gives. `name_points(writer)` returns the function that gives a capture point
    its interface; `progress` is called about every `every` packets, as decrypt_to_writer does.
    The blocks land out of order, so the file is written under a temporary name
    beside OUT and renamed when whole: a failure, Ctrl-C or SIGTERM leaves OUT as it was (and
    UserError says why); only SIGKILL can leave the hidden `.OUT.partial-PID` behind."""
    target = Path(out)
    partial = str(target.with_name(f".{target.name}.partial-{os.getpid()}"))
    with PcapngWriter(partial, linktype="raw") as head:  # the section header; blocks follow it
        head.flush()
        end = head.committed
    ctx = multiprocessing.get_context("fork")  # workers inherit the decoder (keys, ciphers) as built
    procs: list[multiprocessing.context.ForkProcess] = []
    conns: list[Connection] = []
    ok = False
    old_term = signal.signal(signal.SIGTERM, _terminated)
    try:
        for k in range(jobs):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_work, name=f"decrypt-{k}", daemon=True,
                               args=(path, k, jobs, block, decoder, partial, name_points, child_end))
            proc.start()
            child_end.close()
            procs.append(proc)
            conns.append(parent_end)
        sizes: dict[int, int] = {}
        done: dict[int, tuple[int, DecryptSummary]] = {}  # worker -> (records it saw, its counts)
        next_block, reported, packets, oks = 0, 0, 0, 0
        while len(done) < jobs:
            # wait() returns the objects it was given, here Connections (its stub says any waitable)
            for conn in cast(list[Connection], wait([c for k, c in enumerate(conns) if k not in done])):
                k = conns.index(conn)
                try:
                    msg = conn.recv()
                except EOFError:
                    procs[k].join(5)
                    raise UserError(f"decrypt worker {k} died (exit status {procs[k].exitcode})") from None
                if msg[0] == "error":
                    raise UserError(msg[1])
                if msg[0] == "done":
                    done[k] = msg[1:]
                    continue
                _, b, size, n, n_ok = msg
                sizes[b] = size
                packets, oks = packets + n, oks + n_ok
                while next_block in sizes:  # every earlier block is placed: this one goes next
                    with contextlib.suppress(BrokenPipeError):  # its worker failed: its error is coming
                        conns[next_block % jobs].send((next_block, end))
                    end += sizes.pop(next_block)
                    next_block += 1
                if progress is not None and packets >= reported + every:
                    reported = packets - packets % every
                    progress(packets, oks)
        if sizes or len({seen for seen, _ in done.values()}) != 1:
            raise UserError(f"{path} changed while it was being decrypted: run decrypt again")
        os.truncate(partial, end)
        os.replace(partial, out)
        ok = True
        return DecryptSummary.merged([done[k][1] for k in range(jobs)])
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
        for conn in conns:
            conn.close()
        signal.signal(signal.SIGTERM, old_term)
        if not ok:
            Path(partial).unlink(missing_ok=True)
