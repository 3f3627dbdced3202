"""A generated bundle of any size with planted ICV failures, written by the real writers in the
order a live capture writes them.

One inbound SA at 20k packets/s, ciphertext points only. Every packet has its xfrm_input probe
(ret 0, its skb); a planted packet is sealed with another key (our decryption says icv-fail) and
gets the kernel's `icvfail` anchor and its kfree_skb drop in xfrm_input. /proc/net/xfrm_stat is
polled every 0.5 s (XfrmInStateProtoError +planted since the last poll). As in `start`, each
source writes from its own thread: the probe thread drains its perf buffer every 100 ms, so the
log holds a poll line before the probe lines of the last 100 ms it counted.
"""

from __future__ import annotations

import heapq
import random
import socket
from collections.abc import Iterator
from pathlib import Path

from ipsec_capture.bpf.eventlog import EventLogWriter, make_header
from ipsec_capture.capture.pcapng import PcapngWriter
from ipsec_capture.models import Event, Record
from ipsec_capture.xfrm.esp_sa import write_esp_sa
from tests.support.synthetic import esp4, gcm_sa, udp4

A, B, IA, IB = "192.0.2.1", "192.0.2.2", "10.1.0.1", "10.2.0.1"
SPI = 0xC0FFEE01
KEY, WRONG = bytes(range(20)), bytes(range(100, 120))
T0 = 1_700_000_000 * 1_000_000_000
GAP = 50_000  # ns between packets: 20k/s
POLL = 500_000_000  # xfrm_stat poll interval (ns)
BATCH = 100_000_000  # the probe thread's drain interval (ns)
NETNS = 4026532001
SOURCES = [{"name": "kprobe", "active": True}, {"name": "xfrm_stat", "active": True}]


def planted_seqs(n: int, planted: int, seed: int = 19) -> set[int]:
    """`planted` sequence numbers, spread over the poll windows; every other one falls in the last
    100 ms before a poll, where the poll's line precedes the probe thread's (the race that
    counts a failure twice when the join trusts the log's order)."""
    rng = random.Random(seed)
    per_poll, per_batch = POLL // GAP, BATCH // GAP
    windows = max(n // per_poll, 1)
    bad: set[int] = set()
    for i in range(planted):
        base = (i % windows) * per_poll
        late = i % 2 == 0
        offset = per_poll - rng.randrange(1, per_batch) if late else rng.randrange(1, per_poll - per_batch)
        seq = base + offset
        while seq in bad or not 1 <= seq <= n:
            seq = rng.randrange(1, n + 1)
        bad.add(seq)
    return bad


def _kernel_events(n: int, bad: set[int]) -> Iterator[tuple[int, int, Event]]:
    """(write time, order, event) of the probe thread's and the poll thread's lines."""
    k = 0
    for seq in range(1, n + 1):
        t = T0 + seq * GAP
        skb = f"0x{0xFFFF8880_0000_0000 + (seq % 512) * 0x100:x}"
        written = (t // BATCH + 1) * BATCH  # the next drain of the perf buffer
        k += 1
        yield written, k, Event(t + 1000, "kprobe", "xfrm_input", netns=NETNS, spi=SPI, seq=seq, ret=0,
                                detail={"skb": skb})
        if seq in bad:
            k += 2
            yield written, k - 1, Event(t + 1500, "kprobe", "icvfail", netns=NETNS, spi=SPI, seq=seq,
                                        detail={"skb": skb})
            yield written, k, Event(t + 2000, "kfree_skb", "drop", netns=NETNS, reason="NOT_SPECIFIED",
                                    detail={"location": "xfrm_input+0x2de", "skbaddr": skb})


def _polls(n: int, bad: set[int]) -> Iterator[tuple[int, int, Event]]:
    end = T0 + (n + 1) * GAP + POLL
    value = 0
    t = T0 + POLL
    last = T0
    while t <= end:
        delta = sum(1 for s in bad if last < T0 + s * GAP + 2000 <= t)
        value += delta
        yield t, 0, Event(t, "xfrm_stat", "counter", netns=NETNS, reason="XfrmInStateProtoError",
                          detail={"delta": delta, "value": value})
        last, t = t, t + POLL


def write_planted_bundle(stem: Path, n: int, planted: int, keys: bool = True) -> tuple[Path, set[int]]:
    """stem.pcapng, stem.events.jsonl and (with `keys`) stem.esp_sa; returns the capture and the
    planted sequence numbers."""
    bad = planted_seqs(n, planted)
    cap = stem.with_suffix(".pcapng")
    with PcapngWriter(cap, ifname=lambda i: f"if{i}") as w:
        w.interface("raw-pre-esp", "raw PREROUTING, ESP/AH")
        for seq in range(1, n + 1):
            inner = udp4(IA, IB, seq & 0xFFFF, b"x" * 40)
            packet = esp4(A, B, SPI, seq, inner, WRONG if seq in bad else KEY, ident=seq & 0xFFFF)
            w.write(Record(T0 + seq * GAP, "raw-pre-esp", packet, socket.AF_INET, hook=0, netns=NETNS))
    header = make_header(sources=SOURCES, netns={"name": "planted", "inode": NETNS})
    with EventLogWriter(f"{stem}.events.jsonl", header) as log:
        for _, _, ev in heapq.merge(_kernel_events(n, bad), _polls(n, bad), key=lambda x: (x[0], x[1])):
            log.write(ev)
    if keys:
        Path(f"{stem}.esp_sa").write_text(write_esp_sa([gcm_sa(SPI, A, B, KEY)]))
    return cap, bad
