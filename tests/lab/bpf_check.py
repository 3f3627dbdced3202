"""The per-packet probe sources on a real kernel with ESP (run inside the lab VM, as root):

    ipsec-capture lab vm [--kernel 6.12] --rw /tmp/ict-bpf -- \\
        python3 tests/lab/bpf_check.py /tmp/ict-bpf [fentry|kprobe] [core|bcc]

Two namespaces, ESP transport with rfc4106(gcm(aes)) (20-byte key, ICV 128) set up by hand with
`ip xfrm`. Proves: the probes compile and attach; each ping gives xfrm_output in the sender's
namespace and xfrm_input in the receiver's, with the right SPI, consecutive sequence numbers and
ret 0; after the receiver's SA is deleted, xfrm_input still says ret 0 (the trap) while notfound
anchors and kfree_skb drops in xfrm_input name the packets, and XfrmInNoStates moves by as many.
The second argument picks the mechanism (default fentry, which the lab kernels have: the check
fails if it falls back), the third the loader: the shipped CO-RE object (default; the same object
on 6.1 and 6.12) or bcc (compiled here; 6.1 only). All must give the same events. With CO-RE the
namespace filter is data: at the end namespace a is taken out of the loaded object's filter and
its packets must stop showing.
Prints `N passed, M failed` and exits 0 only if all passed; writes the events log to OUT_DIR.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from ipsec_capture.bpf.core import CoreSource
from ipsec_capture.bpf.eventlog import EventLogWriter, clock_offsets, make_header, read_events
from ipsec_capture.bpf.kprobes import KprobeSource
from ipsec_capture.bpf.xfrm_stat import XfrmStatReader
from ipsec_capture.models import EncodedEvent, Event
from ipsec_capture.netns import netns_inode

A, B = "ict-bpf-a", "ict-bpf-b"
A4, B4 = "192.0.2.1", "192.0.2.2"
SPI_AB, SPI_BA = 0x1000AB01, 0x2000BA02
KEY_AB = "0x" + "11" * 20
KEY_BA = "0x" + "22" * 20
PINGS, AFTER_DELETE = 5, 3

results: list[tuple[bool, str]] = []


def check(ok: bool, what: str) -> None:
    results.append((ok, what))
    print(f"{'PASS' if ok else 'FAIL'} {what}", flush=True)


def sh(*argv: str, ns: str | None = None, check_rc: bool = True) -> str:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    p = subprocess.run(full, capture_output=True, text=True, timeout=60)
    if check_rc and p.returncode:
        raise RuntimeError(f"{' '.join(full)}: {p.stderr.strip()}")
    return p.stdout


def setup() -> None:
    for ns in (A, B):
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
    sh("ip", "link", "add", "ictbpfa", "type", "veth", "peer", "name", "ictbpfb")
    sh("ip", "link", "set", "ictbpfa", "netns", A, "name", "veth0")
    sh("ip", "link", "set", "ictbpfb", "netns", B, "name", "veth0")
    for ns, me in ((A, A4), (B, B4)):
        sh("ip", "addr", "add", f"{me}/24", "dev", "veth0", ns=ns)
        sh("ip", "link", "set", "veth0", "up", ns=ns)
    for ns in (A, B):
        for src, dst, spi, key in ((A4, B4, SPI_AB, KEY_AB), (B4, A4, SPI_BA, KEY_BA)):
            sh("ip", "xfrm", "state", "add", "src", src, "dst", dst, "proto", "esp", "spi", hex(spi),
               "mode", "transport", "aead", "rfc4106(gcm(aes))", key, "128", ns=ns)
    for ns, me, peer in ((A, A4, B4), (B, B4, A4)):
        for d, s_, t in (("out", me, peer), ("in", peer, me)):
            sh("ip", "xfrm", "policy", "add", "src", s_, "dst", t, "dir", d,
               "tmpl", "src", s_, "dst", t, "proto", "esp", "mode", "transport", ns=ns)


def teardown() -> None:
    for ns in (A, B):
        sh("ip", "netns", "del", ns, check_rc=False)


def ping(count: int) -> None:
    sh("ping", "-c", str(count), "-i", "0.2", "-W", "1", B4, ns=A, check_rc=False)


def settle(src: KprobeSource | CoreSource) -> None:
    time.sleep(0.5)
    src.poll()


def main() -> int:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "/tmp/ict-bpf"
    mechanism = sys.argv[2] if len(sys.argv) > 2 else "fentry"
    loader = sys.argv[3] if len(sys.argv) > 3 else "core"
    returns = "fexit" if mechanism == "fentry" else "kretprobe"
    os.makedirs(out_dir, exist_ok=True)
    teardown()
    setup()
    ino_a, ino_b = netns_inode(A), netns_inode(B)
    clock = clock_offsets()
    path = os.path.join(out_dir, f"bpf-check-{loader}-{mechanism}.events.jsonl")
    events: list[Event] = []
    writer = EventLogWriter(path, make_header(clock=clock, sources=[{"name": "kprobe", "active": True,
                                                                     "why": "lab check"}]))

    def emit(ev: Event | EncodedEvent) -> None:
        writer.write(ev)
        events.append(Event.from_dict(json.loads(ev.to_json())))  # checked as the log holds it

    src: KprobeSource | CoreSource
    if loader == "core":
        src = CoreSource(clock["wall_minus_mono_ns"], netns=[ino_a, ino_b], mechanism=mechanism)
    else:
        src = KprobeSource(clock["wall_minus_mono_ns"], progress=lambda m: print(m, flush=True),
                           mechanism=mechanism)
    t0 = time.monotonic()
    try:
        src.attach()
        ready_s = time.monotonic() - t0
        compile_s = getattr(src, "compile_s", 0.0)
        print(f"COMPILE loader={loader} ready_s={ready_s:.2f} compile_s={compile_s:.1f} "
              f"attached={src.attached} missing={src.missing}", flush=True)
        check(src.mechanism == mechanism, f"probes compile and attach as {mechanism}: {src.mechanism}")
        check(f"{returns}:xfrm_input" in src.attached and f"{returns}:xfrm_output" in src.attached,
              f"{returns} on xfrm_input and xfrm_output attached")
        check(not src.missing and sum(a.startswith(f"{'fentry' if mechanism == 'fentry' else 'kprobe'}:"
                                                   "xfrm_audit_state_") for a in src.attached) == 5,
              f"all five audit anchors attached (this kernel has them): missing {src.missing}")
        check("raw_tracepoint:kfree_skb" in src.attached, "drops from the kfree_skb raw tracepoint")
        src.start(emit)
        t_wall0 = time.time_ns()
        ping(PINGS)
        settle(src)
        t_wall1 = time.time_ns()

        outs = [e for e in events if e.kind == "xfrm_output" and e.spi == SPI_AB]
        ins = [e for e in events if e.kind == "xfrm_input" and e.spi == SPI_AB]
        check(len(outs) == PINGS, f"xfrm_output events for spi {SPI_AB:#x}: {len(outs)} == {PINGS}")
        seqs = list(range(1, PINGS + 1))
        check([e.seq for e in outs] == seqs, f"output seqs 1..{PINGS}: {[e.seq for e in outs]}")
        check(all(e.ret == 0 and e.netns == ino_a for e in outs), "output ret 0 in namespace a")
        check(all(e.tuple == {"src": A4, "dst": B4, "proto": 50} for e in outs), f"output SA tuple {outs[:1]}"
              )
        check(all(e.inner and e.inner["proto"] == 1 for e in outs), "output inner packet is ICMP")
        check(len(ins) == PINGS, f"xfrm_input events for spi {SPI_AB:#x}: {len(ins)} == {PINGS} "
                                 "(entry/return paired by frame)")
        check([e.seq for e in ins] == seqs, f"input seqs 1..{PINGS}: {[e.seq for e in ins]}")
        check(all(e.ret == 0 and e.netns == ino_b for e in ins), "input ret 0 in namespace b")
        check(all(e.tuple and e.tuple["src"] == A4 and e.tuple["proto"] == 50 for e in ins),
              "input outer tuple")
        replies = [e for e in events if e.kind == "xfrm_input" and e.spi == SPI_BA]
        check(len(replies) == PINGS, f"replies decapsulated in a: {len(replies)}")
        check(all(t_wall0 - 10**9 < e.time_ns < t_wall1 + 10**9 for e in outs + ins), "times are wall clock")

        # fault: the receiver loses its SA
        stat = XfrmStatReader(B)
        before = stat.read()
        sh("ip", "xfrm", "state", "del", "src", A4, "dst", B4, "proto", "esp", "spi", hex(SPI_AB), ns=B)
        mark = len(events)
        ping(AFTER_DELETE)
        settle(src)
        after = stat.read()
        stat.close()
        new = events[mark:]
        ins2 = [e for e in new if e.kind == "xfrm_input" and e.spi == SPI_AB]
        nf = [e for e in new if e.kind == "notfound" and e.spi == SPI_AB]
        drops = [e for e in new if e.kind == "drop" and e.detail["location"].startswith("xfrm_input")]
        moved = after["XfrmInNoStates"] - before["XfrmInNoStates"]
        check(moved == AFTER_DELETE, f"XfrmInNoStates +{moved}")
        check(len(ins2) == AFTER_DELETE and all(e.ret == 0 for e in ins2),
              f"xfrm_input ret 0 on the drop path (the trap): {[(e.seq, e.ret) for e in ins2]}")
        check([e.seq for e in nf] == list(range(PINGS + 1, PINGS + 1 + AFTER_DELETE)),
              f"notfound anchors with spi and seqs: {[e.seq for e in nf]}")
        check(all(e.netns == ino_b for e in nf), "notfound in namespace b")
        check(len(drops) >= AFTER_DELETE, f"kfree_skb drops in xfrm_input: "
                                          f"{[(e.reason, e.detail['location']) for e in drops]}")
        check(all(e.netns == ino_b for e in drops), "drops carry namespace b")
        check(all(e.reason == "NOT_SPECIFIED" for e in drops), "the no-state drop is NOT_SPECIFIED, named "
              f"as this kernel numbers it: {sorted({e.reason for e in drops})}")
        if isinstance(src, CoreSource):
            # the loaded object's namespace filter is data: take a out, a's packets stop showing
            src.remove_netns(ino_a)
            mark = len(events)
            sh("ip", "xfrm", "state", "add", "src", A4, "dst", B4, "proto", "esp", "spi", hex(SPI_AB),
               "mode", "transport", "aead", "rfc4106(gcm(aes))", KEY_AB, "128", ns=B)
            ping(2)
            settle(src)
            left = events[mark:]
            check(not [e for e in left if e.netns == ino_a], "namespace a taken out of the filter: "
                  f"no events of a ({sorted({(e.kind, e.netns) for e in left})})")
            check(sum(e.kind == "xfrm_input" and e.netns == ino_b for e in left) == 2,
                  "b's xfrm_input still reported")
            check(src.drops_seen >= src.drops_sent >= AFTER_DELETE,
                  f"drops seen in the kernel {src.drops_seen}, sent to us {src.drops_sent}")
    finally:
        src.stop()
        writer.close()
        teardown()
    _, logged = read_events(path)
    check(sum(1 for _ in logged) == len(events), f"events log holds all {len(events)} events")
    print(f"SUMMARY loader={loader} mechanism={src.mechanism} per_kind={src.per_kind} lost={src.lost} "
          f"ready_s={ready_s:.2f}")
    failed = sum(1 for ok, _ in results if not ok)
    print(f"{len(results) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
