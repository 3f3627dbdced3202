"""Benchmark: what the kprobes cost the traffic they watch, on the lab kernel.

    python -m bench.kprobes [--seconds 5] [--rounds 5] [--mechanism auto|fentry|kprobe] [--empty]
                                                                (boots the kernel lab VM)

In a gcm lab (ESP transport, AES-GCM-128) a UDP blaster in the left host sends 1000-byte
datagrams to the right host as fast as it can for `seconds`; the rate is what the receiver's
kernel decrypted (its inbound SA's packet counter, `ip -s xfrm state`), so the number is the
IPsec path's throughput, not a Python receiver's. A consumer process runs what `start` runs for
kernel events (KprobeSource writing the events log, filtered to the receiver's namespace: probes
on xfrm_input/xfrm_output and the audit anchors, the skb:kfree_skb raw tracepoint), compiled once;
`--mechanism` picks how they attach (default auto: fentry/fexit on this BTF kernel, `kprobe` for
kprobe/kretprobe), and `--empty` puts programs that return at once at the same points (the
mechanism's cost alone). Each round runs four phases back to back, their order rotating (a drift
of the rate over time cancels): probes detached; attached; attached with the consumer stopped
(the probes' kernel-side cost alone); and detached with a busy loop on the consumer's vCPU (what
any busy second vCPU costs the first here, where QEMU's two vCPU threads share a 2-core host).
The traffic runs on the VM's first CPU and the consumer on the other (as on a real host, where
the consumer does not share the core carrying the packets), and the consumer's own CPU use is
printed. It prints the median rate of each phase and the overhead (target: under 5%). Not a
test: under TCG the absolute rates mean little, the ratio is the point.
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


def empty_program(mechanism: str) -> str:
    """Programs that return at once, under the names xfrm_probes.c gives them for `mechanism`."""
    from ipsec_capture.bpf.kprobes import DROP_TRACEPOINT, probes

    text = "#include <uapi/linux/ptrace.h>\n"
    for p in probes(mechanism):
        if p.kind == "fentry":
            text += f"KFUNC_PROBE({p.target}) {{ return 0; }}\n"
        elif p.kind == "fexit":
            text += f"KRETFUNC_PROBE({p.target}) {{ return 0; }}\n"
        else:
            text += f"int {p.fn}(struct pt_regs *ctx) {{ return 0; }}\n"
    return text + f"RAW_TRACEPOINT_PROBE({DROP_TRACEPOINT}) {{ return 0; }}\n"


def consumer(netns: str, log: Path, empty: bool = False, mechanism: str = "auto") -> int:
    """The events side, in its own process: the product's KprobeSource writing the product's
    events log, compiled once; on stdin `off` detaches every probe and `on` attaches them again
    (no recompile), each answered `ok` on stdout, so the rounds can alternate. Prints `ready
    MECHANISM` once attached."""
    from ipsec_capture.bpf.eventlog import EventLogWriter, clock_offsets, make_header
    from ipsec_capture.bpf.kprobes import DROP_FN, DROP_TRACEPOINT, KprobeSource, load_bcc, manual_bpf, probes
    from ipsec_capture.netns import netns_inode

    writer = EventLogWriter(log, make_header())
    if empty:
        # the same attach points, every program `return 0`: what the probe mechanism costs alone
        BPF = load_bcc()
        if mechanism == "auto":
            mechanism = "fentry" if BPF.support_kfunc() else "kprobe"
        bpf = manual_bpf(BPF)(text=empty_program(mechanism))
        wanted = []
        for p in probes(mechanism):
            with contextlib.suppress(Exception):  # an anchor this kernel lacks
                p.attach(bpf)
                wanted.append(p)
        bpf.attach_raw_tracepoint(tp=DROP_TRACEPOINT, fn_name=DROP_FN)
        source = None
    else:
        source = KprobeSource(clock_offsets()["wall_minus_mono_ns"], netns_inode(netns), mechanism=mechanism,
                              progress=lambda m: print(m, file=sys.stderr, flush=True))
        source.start(writer.write)
        bpf, wanted, mechanism = source.bpf, source.probes, source.mechanism
    print(f"ready {mechanism} {' '.join(p.label for p in wanted)}", flush=True)
    attached = True
    for line in sys.stdin:
        want = line.strip() == "on"
        if want == attached:
            pass
        elif not want:
            for p in wanted:
                p.detach(bpf)
            bpf.detach_raw_tracepoint(tp=DROP_TRACEPOINT)
        else:
            for p in wanted:  # entries before returns, as probes() lists them
                p.attach(bpf)
            bpf.attach_raw_tracepoint(tp=DROP_TRACEPOINT, fn_name=DROP_FN)
        attached = want
        print("ok", flush=True)
    if source is not None:
        source.stop()
    else:
        bpf.cleanup()
    writer.close()
    return 0


def here(seconds: float, rounds: int, out: Path, empty: bool = False, mechanism: str = "auto") -> dict:
    from ipsec_capture.lab import scenarios

    scenarios.teardown(PREFIX)
    state = scenarios.up("gcm", PREFIX)
    phases: dict[str, list[float]] = {"off": [], "kprobes": [], "probes only": [], "off, vCPU busy": []}
    cpus = sorted(os.sched_getaffinity(0))
    # The traffic (blaster and the softirqs it raises) on the first CPU, the events process on
    # the others: on a real host the consumer does not share the core that carries the packets,
    # and what is measured is then the probes' cost on the IPsec path itself.
    traffic_cpu, consumer_cpus = {cpus[0]}, set(cpus[1:]) or {cpus[0]}
    os.sched_setaffinity(0, traffic_cpu)
    # the log on the guest's tmpfs: in `out` (the host's, over 9p) every write would wake a QEMU
    # I/O thread on the host cores that also run the vCPUs
    log = Path("/dev/shm/bench-kprobes.events.jsonl")
    argv = [sys.executable, "-m", "bench.kprobes", "--consumer", state.right, "--out", str(log),
            "--mechanism", mechanism, *(["--empty"] if empty else [])]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, consumer_cpus))
    assert proc.stdin is not None and proc.stdout is not None

    def command(word: str) -> None:
        proc.stdin.write(word + "\n")
        proc.stdin.flush()
        if proc.stdout.readline().strip() != "ok":
            raise RuntimeError(f"the consumer did not take {word!r} (exit {proc.poll()})")

    try:
        t0 = time.monotonic()
        ready = proc.stdout.readline()
        if not ready.startswith("ready"):
            raise RuntimeError(f"the kprobe consumer never got ready (exit {proc.wait()})")
        ready_words = ready.split()
        used, attached = ready_words[1], ready_words[2:]
        attach_s = time.monotonic() - t0
        command("off")
        blast(state, 3.0)  # warm up (ARP, route caches)
        cpu_on = time_on = 0.0
        # The phases rotate each round (a drift of the rate over time cancels). "probes only":
        # attached, the consumer stopped (SIGSTOP): the kernel-side cost alone, its perf buffer
        # filling up and then dropping samples, no process to wake. "off, vCPU busy": detached,
        # a spinning process where the consumer runs.
        order = tuple(phases)
        for r in range(rounds):
            for phase in order[r % len(order):] + order[:r % len(order)]:
                command("off" if phase.startswith("off") else "on")
                if phase == "probes only":
                    proc.send_signal(signal.SIGSTOP)
                burner = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                          preexec_fn=lambda: os.sched_setaffinity(0, consumer_cpus)) \
                    if phase == "off, vCPU busy" else None
                cpu0, t = process_cpu(proc.pid), time.monotonic()
                phases[phase].append(blast(state, seconds) / seconds)
                if phase == "kprobes":
                    cpu_on += process_cpu(proc.pid) - cpu0
                    time_on += time.monotonic() - t
                if phase == "probes only":
                    proc.send_signal(signal.SIGCONT)
                if burner is not None:
                    burner.kill()
                    burner.wait()
        proc.stdin.close()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        scenarios.teardown(PREFIX)
    events = sum(1 for _ in log.open()) - 1
    log.unlink()
    off = statistics.median(phases["off"])
    on = statistics.median(phases["kprobes"])
    # each round's phases ran back to back: their differences have the least drift in them
    paired = {name: [round(100 * (a - b) / a, 1) for a, b in zip(phases["off"], phases[name], strict=True)
                     if a] for name in ("kprobes", "probes only", "off, vCPU busy")}
    return {"phases": phases, "median_off_pps": round(off), "median_kprobes_pps": round(on),
            "overhead_pct": round(100 * (off - on) / off, 1) if off else None,
            "paired_pct": paired,
            "attach_s": round(attach_s, 1), "events": events, "mechanism": used, "attached": attached,
            "consumer_cpu": round(cpu_on / time_on, 2) if time_on else None,
            "traffic_cpu": sorted(traffic_cpu), "consumer_cpus": sorted(consumer_cpus)}


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_cpu() -> tuple[float, float, float]:
    """(wall s, host CPU s busy, CPU s of our child processes: the QEMU running the lab VM)."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    me = os.getpid()
    children = Path(f"/proc/{me}/task/{me}/children").read_text().split()
    ours = sum(process_cpu(int(pid)) for pid in children if Path(f"/proc/{pid}").exists())
    return time.monotonic(), busy / ticks, ours


def other_load(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Host cores used by anything but the lab VM between two host_cpu() samples: the benchmark
    cannot stop another job on a shared machine, but it can say that one ran."""
    wall = after[0] - before[0]
    return max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / wall if wall > 0 else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--here", action="store_true", help="run on this kernel (it must do ESP)")
    ap.add_argument("--consumer", metavar="NETNS", help=argparse.SUPPRESS)
    ap.add_argument("--empty", action="store_true",
                    help="attach programs that do nothing to the same points: the mechanism's cost alone")
    ap.add_argument("--mechanism", choices=("auto", "fentry", "kprobe"), default="auto",
                    help="how the probes attach (default auto: fentry/fexit where the kernel allows)")
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.consumer:
        return consumer(args.consumer, Path(args.out), args.empty, args.mechanism)
    if args.here:
        out = Path(args.out or tempfile.mkdtemp(prefix="bench-kprobes-"))
        result = here(args.seconds, args.rounds, out, args.empty, args.mechanism)
        (out / "bench-kprobes.json").write_text(json.dumps(result))
        print(json.dumps(result), flush=True)
        return 0
    from ipsec_capture.lab.vm import LabVM

    out = Path(tempfile.mkdtemp(prefix="bench-kprobes-"))
    with LabVM(memory="2G", cpus=2, rw=[str(out)]) as vm:
        host0 = host_cpu()
        r = vm.run([sys.executable, "-m", "bench.kprobes", "--here", "--out", str(out), "--seconds",
                    str(args.seconds), "--rounds", str(args.rounds), "--mechanism", args.mechanism,
                    *(["--empty"] if args.empty else [])],
                   timeout=1800)
        other = other_load(host0, host_cpu())
    if r.rc != 0:
        print(r.stdout, r.stderr, file=sys.stderr)
        return 1
    res = json.loads((out / "bench-kprobes.json").read_text())
    print("kprobe overhead on the IPsec path (lab VM, TCG; ESP AES-GCM-128, 1000-byte UDP, left -> right)"
          + (": EMPTY programs at the same points" if args.empty else ""))
    print(f"  mechanism {res['mechanism']}: {', '.join(res['attached'])}, raw_tracepoint:kfree_skb")
    for name, rates in res["phases"].items():
        print(f"  {name:<14} " + "  ".join(f"{r:8.0f} pkt/s" for r in rates))
    print(f"  median without kprobes {res['median_off_pps']} pkt/s, with {res['median_kprobes_pps']} pkt/s: "
          f"overhead {res['overhead_pct']}% (target < 5%); attach took {res['attach_s']} s (bcc compile)")
    for name, paired in res["paired_pct"].items():
        print(f"  {name} vs off, per round: {', '.join(f'{p:+.1f}%' for p in paired)}; "
              f"mean {statistics.mean(paired):+.1f}%")
    print(f"  host: {other:.2f} of {os.cpu_count()} cores busy with other work on average during the run "
          "(the VM's two vCPUs need two: more than ~0.1 here and the rates above are contended)")
    print(f"  traffic on CPU {res['traffic_cpu']}, the consumer (KprobeSource writing the events log) on CPU "
          f"{res['consumer_cpus']}: {res['consumer_cpu']} CPU while attached, {res['events']} events")
    return 0


if __name__ == "__main__":
    sys.exit(main())
