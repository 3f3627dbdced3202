"""Benchmark: the correlation join over synthetic streams, at several sizes, in one run.

    python -m bench.correlate [--sizes 100000,1000000] [--clear]

Each size N runs in its own process (so peak RSS is that size's alone): N ESP Records at
raw-pre-esp (one SA, opaque ciphertext, 20k packets/s) merged with N kprobe `xfrm_input` Events
(SPI, seq, skb) and a counter poll every 0.5 s, through `Joiner.run` and the report Summary.
Both streams are generated lazily, so memory shows what the join holds, not the input. The peer
is the same generators merged by time without the join (the floor any join pays); the ratio
join/peer is printed. Targets: 1M + 1M under 10 s; peak RSS flat from 100k to 1M+ (streaming).
`--clear` adds a cleartext Record per packet (mangle-pre-in) to exercise the cleartext match.
Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import heapq
import json
import resource
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

from ipsec_capture.correlate.join import Joiner
from ipsec_capture.correlate.summary import Summary
from ipsec_capture.models import Event, Record

SPI = 0xC0FFEE01
T0 = 1_700_000_000 * 1_000_000_000
GAP = 50_000  # ns between packets: 20k packets/s
_ESP = struct.Struct("!II")


def _template() -> bytearray:
    from tests.support.synthetic import esp4, udp4

    return bytearray(esp4("192.0.2.1", "192.0.2.2", SPI, 1, udp4("10.1.0.1", "10.2.0.1", 1, b"x" * 64)))


# Both rows pay for these generators, so they are lean (locals, positional fields, no per-item
# branch for the poll): what they cost is not the join's, and a cheaper floor shows the join's share.
def records(n: int, clear: bool) -> Iterator[Record]:
    tmpl = _template()
    head, tail = bytes(tmpl[:20]), bytes(tmpl[28:])  # the ESP header (SPI, seq) between them
    inner = bytes(tmpl[28:28 + 20 + 8 + 64])
    pack, af = _ESP.pack, socket.AF_INET
    for i in range(n):
        t = T0 + i * GAP
        yield Record(t, "raw-pre-esp", head + pack(SPI, i + 1) + tail, af, 0, 0)  # length 0, hook 0
        if clear:
            yield Record(t + 2000, "mangle-pre-in", inner, af, 0, 0)


def events(n: int) -> Iterator[Event]:
    poll = 10_000  # packets between counter polls (0.5 s at 20k/s)
    for start in range(0, n, poll):
        for i in range(start, min(start + poll, n)):
            # fields: time, source, kind, netns, spi, seq, ret, reason, tuple, inner, detail
            yield Event(T0 + i * GAP + 1000, "kprobe", "xfrm_input", None, SPI, i + 1, 0, None, None, None,
                        {"skb": hex(i)})
        if start + poll <= n:  # the poll after the last packet of a full round
            i = start + poll - 1
            yield Event(T0 + i * GAP + 2000, "xfrm_stat", "counter", None, None, None, None, "XfrmInNoStates",
                        None, None, {"delta": 1, "value": i})


def one(n: int, clear: bool) -> dict[str, float]:
    t = time.perf_counter()
    count = sum(1 for _ in heapq.merge(records(n, clear), events(n), key=lambda x: x.time_ns))
    peer = time.perf_counter() - t
    rss_peer = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    joiner = Joiner(header={"sources": [{"name": "kprobe"}]})
    summary = Summary()
    for p in joiner.run(records(n, clear), events(n)):
        summary.add(p)
    summary.finish(joiner)
    wall = time.perf_counter() - t
    assert summary.totals["ok"] + summary.totals["failed"] + summary.totals["unknown"] >= n
    return {"n": n, "items": count, "join_s": wall, "peer_s": peer,
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_peer_mib": rss_peer / 1024,
            "ok": summary.totals["ok"], "failed": summary.totals["failed"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000", help="packet counts, comma separated")
    ap.add_argument("--clear", action="store_true", help="add a cleartext record per packet")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.clear)))
        return 0
    print(f"{'packets':>10} {'+events':>10} {'join s':>8} {'peer s':>8} {'ratio':>6} {'pkts/s':>10} "
          f"{'peak RSS MiB':>13} {'peer RSS MiB':>13}")
    for n in (int(s) for s in args.sizes.split(",")):
        cmd = [sys.executable, "-m", "bench.correlate", "--one", str(n)] + (["--clear"] if args.clear else [])
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(f"{n:>10} {n:>10} {r['join_s']:>8.2f} {r['peer_s']:>8.2f} {r['join_s'] / r['peer_s']:>6.1f} "
              f"{n / r['join_s']:>10.0f} {r['rss_mib']:>13.1f} {r['rss_peer_mib']:>13.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
