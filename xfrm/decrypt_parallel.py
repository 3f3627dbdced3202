"""`decrypt` on several cores: workers decrypt interleaved blocks of packets into fragments, and
the parent stitches the fragments together in packet order.

Why this shape: per packet, reading the capture is cheap (a slice), while decrypting and writing
the pcapng block are the expensive parts, and both are independent per packet. So every worker
reads the whole file but decrypts and writes only its own blocks (block b belongs to worker
b mod N), into a fragment of packet blocks. Workers agree on interface ids without talking,
because each one sees every packet's capture point in file order. What comes back is small:
where each of a worker's blocks starts in its fragment, its interfaces, and its per-SA counts.
The parent writes the section header and the interfaces, then splices the fragments' blocks in
order (copy_file_range: the packet bytes are not copied through Python again).

ESN: each worker infers high bits from the SA's replay state and follows the sequence numbers
it sees; skipping the other workers' blocks only moves it forward within the same 2^32
subspace or into the next, which the inference handles (and the ICV check confirms).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path

from ipsec_capture.capture.pcapng import PcapngWriter
from ipsec_capture.capture.pcapread import read_records
from ipsec_capture.xfrm.decrypt import DecryptSummary, decrypt_to_writer
from ipsec_capture.xfrm.esp import EspDecoder

from ipsec_capture.errors import UserError
from ipsec_capture.models import Record

BLOCK = 4096  # packets per block: a few dozen splices per million packets, workers stay busy
PARALLEL_FROM = 32 << 20  # bytes of input below which one process is as fast (startup, merge)
MAX_AUTO_JOBS = 4
PROGRESS_POLL_S = 1.0

Progress = Callable[[int, int], None]  # (packets done, ok so far)
PointNamer = Callable[[PcapngWriter], Callable[[str], object]]


def auto_jobs(path: str | os.PathLike[str]) -> int:
    """Processes for `--jobs 0`: the usable cores (up to 4) for a large file, else one."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return 1
    if size < PARALLEL_FROM:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_AUTO_JOBS))


@dataclass(slots=True)
class _Share:
    """What one worker reports: its fragment's block starts (then its end), its interfaces (the
    same for every worker), how many records it saw (all of them) and its counts, or an error."""

    offsets: list[int] = field(default_factory=list)
    interfaces: list[tuple[str, str]] = field(default_factory=list)
    seen: int = 0
    summary: DecryptSummary = field(default_factory=DecryptSummary)
    error: str = ""


def _my_blocks(records: Iterable[Record], k: int, jobs: int, block: int, new_point: Callable[[str], object],
               writer: PcapngWriter, share: _Share) -> Iterator[Record]:
    """The records of worker k's blocks. Every record's point is named (same ids everywhere);
    the writer's size is noted where each own block starts and, at the end, where the last ends
    (the consumer has written each record before it asks for the next)."""
    last: str | None = None
    mine = False
    i = -1
    for i, rec in enumerate(records):
        if rec.point != last:
            last = rec.point
            new_point(last)
        if i % block == 0:
            mine = (i // block) % jobs == k
            if mine:
                share.offsets.append(writer.size)
        if mine:
            yield rec
    share.offsets.append(writer.size)
    share.seen = i + 1


def _quiet(_msg: str) -> None:
    pass


def _worker(path: str, k: int, jobs: int, block: int, decoder: EspDecoder, fragment: str,
            name_points: PointNamer, conn: Connection, progress: object) -> None:
    """One worker process: decrypt its blocks into `fragment`, send its _Share, exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C ends
    share = _Share()

    def tick(s: DecryptSummary) -> None:
        progress[2 * k] = s.packets  # type: ignore[index]
        progress[2 * k + 1] = s.totals().get("ok", 0)  # type: ignore[index]

    try:
        with PcapngWriter(fragment, linktype="raw", fragment=True) as writer:
            # every worker reads the same file: one of them gives its warnings
            records = read_records(path, borrow=True) if k == 0 else read_records(path, _quiet, borrow=True)
            mine = _my_blocks(records, k, jobs, block, name_points(writer), writer, share)
            decrypt_to_writer(mine, decoder, share.summary, writer, None, tick, 8192)
        tick(share.summary)
        share.interfaces = writer.described
    except UserError as err:
        share.error = str(err)
    except OSError as err:
        share.error = f"cannot write {fragment}: {err.strerror or err}"
    except Exception as err:  # reported by the parent as one line, not lost with the process
        share.error = f"decrypt worker {k} failed: {type(err).__name__}: {err}"
    conn.send(share)
    conn.close()


def _merge_summaries(shares: list[_Share]) -> DecryptSummary:
    total = DecryptSummary()
    for share in shares:
        s = share.summary
        total.packets += s.packets
        total.not_esp += s.not_esp
        for key, tally in s.per_sa.items():
            have = total.per_sa.get(key)
            if have is None:
                total.per_sa[key] = replace(tally, counts=dict(tally.counts))
            else:
                for status, n in tally.counts.items():
                    have.counts[status] = have.counts.get(status, 0) + n
    return total


def _run_workers(path: str, decoder: EspDecoder, fragments: list[str], block: int,
                 name_points: PointNamer, progress: Progress | None) -> list[_Share]:
    """Start one process per fragment, report progress while they work, collect their shares."""
    jobs = len(fragments)
    ctx = multiprocessing.get_context("fork")  # workers inherit the decoder (keys, ciphers) as built
    counts = ctx.Array("q", 2 * jobs, lock=False)
    procs, conns = [], []
    try:
        for k, fragment in enumerate(fragments):
            parent_end, child_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, name=f"decrypt-{k}", daemon=True,
                               args=(path, k, jobs, block, decoder, fragment, name_points, child_end, counts))
            proc.start()
            child_end.close()
            procs.append(proc)
            conns.append(parent_end)
        shares: dict[int, _Share] = {}
        reported = 0
        while len(shares) < jobs:
            for conn in wait([c for k, c in enumerate(conns) if k not in shares], PROGRESS_POLL_S):
                k = conns.index(conn)  # type: ignore[arg-type]
                try:
                    shares[k] = conn.recv()  # type: ignore[union-attr]
                except EOFError:
                    procs[k].join(5)
                    raise UserError(f"decrypt worker {k} died (exit status {procs[k].exitcode})") from None
            done = sum(counts[0::2])
            if progress is not None and done >= reported + 50_000 and len(shares) < jobs:
                reported = done - done % 50_000
                progress(done, sum(counts[1::2]))
        return [shares[k] for k in range(jobs)]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
        for conn in conns:
            conn.close()


def decrypt_parallel(path: str, decoder: EspDecoder, out: str, jobs: int, name_points: PointNamer, *,
                     block: int = BLOCK, progress: Progress | None = None) -> DecryptSummary:
    """Decrypt `path` into the raw-IP pcapng `out` with `jobs` processes: the same packets,
    comments and counts as one process gives. `name_points(writer)` returns the function that
    gives a capture point its interface (called in file order by every worker, and by the
    parent with the interfaces the workers found)."""
    target = Path(out)
    fragments = [str(target.with_name(f".{target.name}.part{k}")) for k in range(jobs)]
    try:
        shares = _run_workers(path, decoder, fragments, block, name_points, progress)
        for share in shares:
            if share.error:
                raise UserError(share.error)
        if len({s.seen for s in shares}) != 1 or len({tuple(s.interfaces) for s in shares}) != 1:
            raise UserError(f"{path} changed while it was being decrypted: run decrypt again")
        summary = _merge_summaries(shares)
        _stitch(out, shares, fragments)
        return summary
    finally:
        for fragment in fragments:
            Path(fragment).unlink(missing_ok=True)


def _stitch(out: str, shares: list[_Share], fragments: list[str]) -> None:
    """OUT = section header, the interfaces, then block b of worker b mod N for every b."""
    jobs = len(shares)
    fds = [os.open(f, os.O_RDONLY | os.O_CLOEXEC) for f in fragments]
    try:
        with PcapngWriter(out, linktype="raw") as writer:
            for name, description in shares[0].interfaces:
                writer.interface(name, description)
            blocks = sum(len(s.offsets) - 1 for s in shares)
            for b in range(blocks):
                offsets = shares[b % jobs].offsets
                j = b // jobs
                writer.splice(fds[b % jobs], offsets[j], offsets[j + 1] - offsets[j])
    finally:
        for fd in fds:
            os.close(fd)
