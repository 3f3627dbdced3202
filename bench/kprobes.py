"""Benchmark: what the kprobes cost the traffic they watch, on the lab kernel.

    python -m bench.kprobes [--seconds 5] [--rounds 5]      (boots the kernel lab VM)

In a gcm lab (ESP transport, AES-GCM-128) a UDP blaster in the left host sends 1000-byte
datagrams to the right host as fast as it can for `seconds`; the rate is what the receiver's
kernel decrypted (its inbound SA's packet counter, `ip -s xfrm state`), so the number is the
IPsec path's throughput, not a Python receiver's. Rounds run without kernel events, then with
`ipsec-capture events --kernel-events kprobe` attached to the receiver's namespace (kprobes on
xfrm_input/xfrm_output, the audit anchors and skb:kfree_skb, all global), then without again.
The traffic runs on the VM's first CPU and the events process on the other (as on a real host,
where the consumer does not share the core carrying the packets), and the consumer's own CPU use
is printed. It prints the median rate of each phase and the overhead on/off (target: under 5%).
Not a test: under TCG the absolute rates mean little, the ratio is the point.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PREFIX = "bench"
PORT = 5600
SIZE = 1000


def blast(state, seconds: float) -> int:
    """Send from left to right for `seconds`; returns how many the right host's SA took in."""
    from ipsec_capture.lab.scenarios import sa_packets
    from ipsec_capture.netns import entered

    spi = state.l2r.spi
    with entered(state.right):
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind((state.right_host, PORT))  # never read: no ICMP unreachable back through ESP
    with entered(state.left):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"\xa5" * SIZE
    before = sa_packets(state.right).get(spi, 0)
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            for _ in range(64):
                with contextlib.suppress(OSError):  # ENOBUFS under load: the queue is full, go on
                    tx.sendto(payload, (state.right_host, PORT))

    t = threading.Thread(target=send, daemon=True)
    t.start()
    time.sleep(seconds)
    stop.set()
    t.join()
    time.sleep(0.5)
    tx.close()
    sink.close()
    return sa_packets(state.right).get(spi, 0) - before


def here(seconds: float, rounds: int, out: Path) -> dict:
    from ipsec_capture.lab import scenarios

    scenarios.teardown(PREFIX)
    state = scenarios.up("gcm", PREFIX)
    phases: dict[str, list[float]] = {"off": [], "kprobes": [], "off-after": []}
    cpus = sorted(os.sched_getaffinity(0))
    # The traffic (blaster and the softirqs it raises) on the first CPU, the events process on
    # the others: on a real host the consumer does not share the core that carries the packets,
    # and what is measured is then the probes' cost on the IPsec path itself.
    traffic_cpu, consumer_cpus = {cpus[0]}, set(cpus[1:]) or {cpus[0]}
    os.sched_setaffinity(0, traffic_cpu)
    try:
        blast(state, 3.0)  # warm up (ARP, route caches)
        for _ in range(rounds):
            phases["off"].append(blast(state, seconds) / seconds)
        # the log on the guest's tmpfs: in `out` (the host's, over 9p) every write would wake a
        # QEMU I/O thread on the host cores that also run the vCPUs
        log = Path("/dev/shm/bench-kprobes.events.jsonl")
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "ipsec_capture", "events", "-w", str(log), "--netns",
                                 state.right, "--kernel-events", "kprobe"],
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: os.sched_setaffinity(0, consumer_cpus))
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("ready"):
                break
        else:
            raise RuntimeError(f"events never got ready (exit {proc.wait()})")
        attach_s = time.monotonic() - t0
        cpu_before, t_before = process_cpu(proc.pid), time.monotonic()
        for _ in range(rounds):
            phases["kprobes"].append(blast(state, seconds) / seconds)
        consumer_load = (process_cpu(proc.pid) - cpu_before) / (time.monotonic() - t_before)
        proc.send_signal(signal.SIGINT)
        tail = proc.communicate(timeout=120)[1]
        for _ in range(rounds):
            phases["off-after"].append(blast(state, seconds) / seconds)
    finally:
        scenarios.teardown(PREFIX)
    off = statistics.median(phases["off"] + phases["off-after"])
    on = statistics.median(phases["kprobes"])
    return {"phases": phases, "median_off_pps": round(off), "median_kprobes_pps": round(on),
            "overhead_pct": round(100 * (off - on) / off, 1) if off else None,
            "attach_s": round(attach_s, 1), "events_summary": tail.strip().splitlines()[-1:],
            "consumer_cpu": round(consumer_load, 2), "traffic_cpu": sorted(traffic_cpu),
            "consumer_cpus": sorted(consumer_cpus)}


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--here", action="store_true", help="run on this kernel (it must do ESP)")
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.here:
        out = Path(args.out or tempfile.mkdtemp(prefix="bench-kprobes-"))
        result = here(args.seconds, args.rounds, out)
        (out / "bench-kprobes.json").write_text(json.dumps(result))
        print(json.dumps(result), flush=True)
        return 0
    from ipsec_capture.lab.vm import LabVM

    out = Path(tempfile.mkdtemp(prefix="bench-kprobes-"))
    with LabVM(memory="2G", cpus=2, rw=[str(out)]) as vm:
        r = vm.run([sys.executable, "-m", "bench.kprobes", "--here", "--out", str(out), "--seconds",
                    str(args.seconds), "--rounds", str(args.rounds)], timeout=1800)
    if r.rc != 0:
        print(r.stdout, r.stderr, file=sys.stderr)
        return 1
    res = json.loads((out / "bench-kprobes.json").read_text())
    print("kprobe overhead on the IPsec path (lab VM, TCG; ESP AES-GCM-128, 1000-byte UDP, left -> right)")
    for name, rates in res["phases"].items():
        print(f"  {name:<10} " + "  ".join(f"{r:8.0f} pkt/s" for r in rates))
    print(f"  median without kprobes {res['median_off_pps']} pkt/s, with {res['median_kprobes_pps']} pkt/s: "
          f"overhead {res['overhead_pct']}% (target < 5%); attach took {res['attach_s']} s (bcc compile)")
    print(f"  traffic on CPU {res['traffic_cpu']}, the events process on CPU {res['consumer_cpus']} "
          f"used {res['consumer_cpu']:.2f} CPU while the kprobes were attached")
    return 0


if __name__ == "__main__":
    sys.exit(main())
