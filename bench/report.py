"""Benchmark: `ipsec-capture report` end to end on a bundle on disk, at several sizes, in one run.

    python -m bench.report [--sizes 100000,1000000] [--dir DIR] [--format text]

bench/correlate measures the join over streams made in memory; this one writes what `start`
writes and times the command a user runs. For each size N it writes, with the real writers
(PcapngWriter, EventLogWriter, esp_sa), a bundle X.pcapng + X.events.jsonl + X.esp_sa: N ESP
packets of one tunnel-mode AES-GCM SA at raw-pre-esp (really encrypted, so the keys fit), each
one's decapsulated inner packet at mangle-pre-in, an xfrm_input kprobe event per packet, a
counter poll every 10k packets, an SA snapshot first. Then `ipsec-capture report X.pcapng
[--format F] -o OUT` runs as its own process; the table gives its wall time, its CPU and its peak
RSS (wait4), and the bundle's size. Targets: 1M packets under 10 s; peak RSS flat from 100k to 1M.
Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ipsec_capture.bpf.eventlog import EventLogWriter, make_header
from ipsec_capture.capture.nflog_tlv import NF_INET_PRE_ROUTING
from ipsec_capture.capture.pcapng import PcapngWriter
from ipsec_capture.models import Event, Record
from ipsec_capture.xfrm.esp_sa import write_esp_sa
from tests.support.synthetic import gcm_sa, ip4, sa_dict, udp4

ROOT = Path(__file__).parent.parent
SPI = 0xC0FFEE01
A, B, IA, IB = "192.0.2.1", "192.0.2.2", "10.1.0.1", "10.2.0.1"
KEY = bytes(range(20))  # AES-128 key + 4-byte salt
T0 = 1_700_000_000 * 1_000_000_000
GAP = 50_000  # ns between packets: 20k packets/s
POLL = 10_000  # packets between counter polls
IPPROTO_ESP, IPPROTO_IPIP = 50, 4
_ESP = struct.Struct("!II")


def write_bundle(stem: Path, n: int) -> int:
    """The bundle of `n` packets; returns its size in bytes."""
    aead, salt = AESGCM(KEY[:-4]), KEY[-4:]
    af = socket.AF_INET
    header = make_header(sources=[{"name": "kprobe"}, {"name": "xfrm_stat"}])
    with (PcapngWriter(stem.with_suffix(".pcapng"), ifname=lambda i: f"if{i}") as w,
          EventLogWriter(f"{stem}.events.jsonl", header) as ev):
        w.interface("raw-pre-esp")
        w.interface("mangle-pre-in")
        ev.write(Event(T0 - 1000, "sa_snapshot", "sa", spi=SPI, detail={"sa": sa_dict(SPI, A, B)}))
        for i in range(n):
            seq, t = i + 1, T0 + i * GAP
            inner = udp4(IA, IB, seq & 0xFFFF, b"x" * 64)
            pad = -(len(inner) + 2) % 4
            plain = inner + bytes(range(1, pad + 1)) + bytes((pad, IPPROTO_IPIP))
            head, iv = _ESP.pack(SPI, seq), seq.to_bytes(8, "big")
            outer = ip4(A, B, IPPROTO_ESP, head + iv + aead.encrypt(salt + iv, plain, head), seq & 0xFFFF)
            w.write(Record(t, "raw-pre-esp", outer, af, hook=NF_INET_PRE_ROUTING))
            ev.write(Event(t + 1000, "kprobe", "xfrm_input", spi=SPI, seq=seq, ret=0,
                           detail={"skb": hex(0xFFFF888000000000 + (i & 0xFFFF) * 256)}))
            w.write(Record(t + 2000, "mangle-pre-in", inner, af, hook=NF_INET_PRE_ROUTING))
            if seq % POLL == 0:
                ev.write(Event(t + 3000, "xfrm_stat", "counter", reason="XfrmInNoStates",
                               detail={"delta": 0, "value": 0}))
    Path(f"{stem}.esp_sa").write_text(write_esp_sa([gcm_sa(SPI, A, B, KEY)]))
    return sum(os.path.getsize(p) for p in (stem.with_suffix(".pcapng"), Path(f"{stem}.events.jsonl")))


def run_report(cap: Path, fmt: str, out: Path) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of one `ipsec-capture report` process."""
    argv = [sys.executable, "-m", "ipsec_capture", "report", str(cap), "-o", str(out)]
    if fmt != "text":
        argv[5:5] = ["--format", fmt]
    t = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"report failed: {proc.stderr.read().decode()}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="packets per bundle, comma separated")
    ap.add_argument("--format", default="text", choices=("text", "json", "html"))
    ap.add_argument("--dir", help="where the bundles go (default: a temporary directory, removed)")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-report-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"{'packets':>10} {'records':>10} {'bundle MiB':>10} {'wall s':>8} {'CPU s':>8} "
              f"{'pkts/s':>10} {'peak RSS MiB':>13}", flush=True)
        for n in (int(s) for s in args.sizes.split(",")):
            stem = work / f"b{n}"
            size = write_bundle(stem, n)
            out = work / f"r{n}.{args.format}"
            wall, cpu, rss = run_report(stem.with_suffix(".pcapng"), args.format, out)
            print(f"{n:>10} {2 * n:>10} {size / 2**20:>10.0f} {wall:>8.2f} {cpu:>8.2f} {n / wall:>10.0f} "
                  f"{rss:>13.1f}", flush=True)
            for p in work.glob(f"b{n}.*"):
                p.unlink()
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
