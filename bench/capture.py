"""Benchmark: the CPU a capture costs, `ipsec-capture start` against `tcpdump -i nflog:N -w`.

    python -m bench.capture [--seconds 3] [--rates 20000,50000,100000,0] [--repeats 2]
                            [--drops on,off] [--ours-args "..."]

Inside a namespace of its own (ict-bench-*, loopback only) one NFLOG rule of ours
(`rules install --points raw-out-ike`) copies every UDP packet to port 4500 that a small C
sender (compiled with gcc here) emits with sendmmsg, paced to an offered rate (0: as fast as it
goes). Both readers read that group: tcpdump as `tcpdump -i nflog:G -w FILE`, ours as
`ipsec-capture start --no-rules` with every other option at its DEFAULT (kernel events on: the
skb:kfree_skb source where kprobes are missing, the XFRM monitor and counters, the key file), so
the table shows what a user pays. Background drops:
  - on: port 4500 is closed, so the kernel frees every packet it logged (kfree_skb NO_SOCKET,
    which a drop source sees, as a gateway sees its background drops);
  - off: the sender itself binds the port and reads everything back (consume_skb: no drop).
Per step, readers alternate (tcpdump first in even repeats, ours first in odd ones). For each
reader it measures its CPU (user + system, from wait4 on the reader's own process, start-up
included) per packet captured and the loss (packets sent minus packets in its file); an idle
run (no traffic) gives each reader's fixed cost, so `steady` = (CPU - idle CPU) / packets.
It prints one row per (drops, rate) with the medians over the repeats, the ratio ours/tcpdump
(target <= 1.5 at 50k pkt/s with drops on), and how busy the machine was (all CPUs, from
/proc/stat, while the step ran), and of that what was neither the reader nor the sender (other
jobs on the machine; also the softirq work the kernel charges to no process).
Not a test: the numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

GROUP = 61
PORT = 4500  # the raw-out-ike point logs UDP to this port
BATCH = 16  # packets per sendmmsg
ROOT = Path(__file__).parent.parent
SENDER_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
/* sender N RATE SINK PORT BATCH: N UDP packets (100 bytes: a non-zero SPI-like word 0x1000 and a
   sequence number, then 0xa5) to 127.0.0.1:PORT with sendmmsg, BATCH at a time, paced to RATE/s
   by sleeping (0: as fast as possible). SINK 1: bind the port first and read every packet back
   (no drops); 0: nobody listens (the kernel frees each packet). Prints the rate achieved. */
#define MAXB 64
static double now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
    long n = atol(argv[1]); double rate = atof(argv[2]); int sink = atoi(argv[3]);
    int port = atoi(argv[4]); int batch = atoi(argv[5]);
    if (batch < 1 || batch > MAXB) batch = MAXB;
    struct sockaddr_in d = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &d.sin_addr);
    int r = -1;
    if (sink) {
        r = socket(AF_INET, SOCK_DGRAM, 0);
        int big = 16 << 20;
        setsockopt(r, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
        if (bind(r, (struct sockaddr *)&d, sizeof d) < 0) { perror("bind"); return 1; }
    }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&d, sizeof d) < 0) { perror("socket"); return 1; }
    static unsigned char buf[MAXB][100], rbuf[MAXB][128];
    struct mmsghdr msg[MAXB], rmsg[MAXB]; struct iovec iov[MAXB], riov[MAXB];
    memset(msg, 0, sizeof msg); memset(rmsg, 0, sizeof rmsg);
    for (int j = 0; j < MAXB; j++) {
        memset(buf[j], 0xa5, 100);
        uint32_t spi = htonl(0x1000); memcpy(buf[j], &spi, 4);
        iov[j].iov_base = buf[j]; iov[j].iov_len = 100;
        msg[j].msg_hdr.msg_iov = &iov[j]; msg[j].msg_hdr.msg_iovlen = 1;
        riov[j].iov_base = rbuf[j]; riov[j].iov_len = sizeof rbuf[j];
        rmsg[j].msg_hdr.msg_iov = &riov[j]; rmsg[j].msg_hdr.msg_iovlen = 1;
    }
    double t0 = now();
    for (long i = 0; i < n;) {
        int k = n - i < batch ? (int)(n - i) : batch;
        for (int j = 0; j < k; j++) {
            uint32_t seq = htonl((uint32_t)(i + j + 1)); memcpy(buf[j] + 4, &seq, 4);
        }
        if (rate > 0) {
            double due = t0 + i / rate, wait = due - now();
            if (wait > 0) {
                struct timespec ts = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
                nanosleep(&ts, NULL);
            }
        }
        int sent = sendmmsg(s, msg, k, 0);
        if (sent < 0) { if (errno == ECONNREFUSED) continue; perror("sendmmsg"); return 1; }
        i += sent;
        if (sink) while (recvmmsg(r, rmsg, MAXB, MSG_DONTWAIT, NULL) > 0) ;
    }
    double took = now() - t0;
    if (sink) { struct timespec ts = {0, 20000000}; nanosleep(&ts, NULL);
                while (recvmmsg(r, rmsg, MAXB, MSG_DONTWAIT, NULL) > 0) ; }
    printf("%.0f\n", n / took);
    return 0;
}
"""


def sh(*argv: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs so far (/proc/stat), for how loaded the machine was."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


@dataclass(slots=True)
class Run:
    reader: str
    drops: bool
    rate: int  # offered (0: max)
    sent: int
    achieved: int
    captured: int
    cpu: float  # reader's CPU seconds, start-up included
    busy: float  # machine's busy CPUs (0..ncpu) during the run
    others: float  # of those, what neither the reader nor the sender used (other jobs, the kernel's own)

    @property
    def lost(self) -> int:
        return max(self.sent - self.captured, 0)


def _wait(proc: subprocess.Popen, timeout: float = 120) -> float:
    """Reap the reader and return its own CPU seconds (user + system, its children included)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.02)


class Bench:
    def __init__(self, ns: str, sender: Path, work: Path, ours_args: list[str]) -> None:
        self.ns, self.sender, self.work, self.ours_args = ns, sender, work, ours_args
        self.sender_cpu = 0.0

    def send(self, n: int, rate: int, drops: bool) -> int:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            return self._send(n, rate, drops)
        finally:
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            self.sender_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)

    def _send(self, n: int, rate: int, drops: bool) -> int:
        if not n:
            time.sleep(1.0)
            return 0
        out = sh("ip", "netns", "exec", self.ns, str(self.sender), str(n), str(rate),
                 "0" if drops else "1", str(PORT), str(BATCH)).stdout
        return int(float(out))

    def ours(self, n: int, rate: int, drops: bool) -> Run:
        out = self.work / "ours.pcapng"
        b0 = busy_jiffies()
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "ipsec_capture", "start", "--group", str(GROUP),
                                 "-w", str(out), "--netns", self.ns, "--no-rules", "--json", "--quiet",
                                 *self.ours_args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            line = proc.stderr.readline()
            if not line.startswith("ready"):
                raise SystemExit(f"ipsec-capture did not start: {line}{proc.stderr.read()}")
            achieved = self.send(n, rate, drops)
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            stdout = proc.stdout.read()
            proc.stderr.read()
            cpu = _wait(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
        return Run("ours", drops, rate, n, achieved, json.loads(stdout)["packets"], cpu,
                   *_busy_since(b0, t0, cpu + self.sender_cpu))

    def tcpdump(self, n: int, rate: int, drops: bool) -> Run:
        out = self.work / "tcpdump.pcap"
        b0 = busy_jiffies()
        t0 = time.monotonic()
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "tcpdump", "-i", f"nflog:{GROUP}", "-s",
                                 "262144", "-w", str(out)], text=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            line = proc.stderr.readline()
            if "listening" not in line:
                raise SystemExit(f"tcpdump did not start: {line}{proc.stderr.read()}")
            achieved = self.send(n, rate, drops)
            time.sleep(1.2)  # libpcap leaves the kernel's 1 s batch timeout
            proc.send_signal(signal.SIGINT)
            err = proc.stderr.read()
            cpu = _wait(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
        m = re.search(r"(\d+) packets? captured", err)
        return Run("tcpdump", drops, rate, n, achieved, int(m.group(1)) if m else 0, cpu,
                   *_busy_since(b0, t0, cpu + self.sender_cpu))


def _busy_since(b0: tuple[int, int], t0: float, ours: float) -> tuple[float, float]:
    """(busy CPUs, busy CPUs not ours) since b0/t0; `ours` is the reader's and sender's CPU s."""
    b1 = busy_jiffies()
    total = b1[1] - b0[1]
    busy = (b1[0] - b0[0]) / total * (os.cpu_count() or 1) if total else 0.0
    return busy, max(busy - ours / max(time.monotonic() - t0, 1e-9), 0.0)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(runs: list[Run], idle: dict[tuple[str, bool], float]) -> list[str]:
    rows = ["| drops | offered pkt/s | achieved pkt/s | tcpdump us/pkt (steady) | ours us/pkt (steady) "
            "| ratio ours/tcpdump (steady) | lost tcpdump / ours | machine busy (CPUs of "
            f"{os.cpu_count()}) | of it others |", "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r.drops, r.rate) for r in runs}, key=lambda k: (not k[0], k[1] or 1 << 40))
    for drops, rate in keys:
        cell: dict[str, tuple[float, float, int, int]] = {}
        for reader in ("tcpdump", "ours"):
            rs = [r for r in runs if r.reader == reader and r.drops == drops and r.rate == rate]
            per = _median([r.cpu / max(r.captured, 1) * 1e6 for r in rs])
            steady = _median([(r.cpu - idle[(reader, drops)]) / max(r.captured, 1) * 1e6 for r in rs])
            cell[reader] = (per, steady, sum(r.lost for r in rs), len(rs))
        sel = [r for r in runs if r.drops == drops and r.rate == rate]
        achieved = _median([r.achieved for r in sel])
        busy = [r.busy for r in sel]
        others = [r.others for r in sel]
        t, o = cell["tcpdump"], cell["ours"]
        rows.append(f"| {'on' if drops else 'off'} | {rate or 'max'} | {achieved:,.0f} "
                    f"| {t[0]:.2f} ({t[1]:.2f}) "
                    f"| {o[0]:.2f} ({o[1]:.2f}) | {o[0] / t[0]:.2f} ({o[1] / t[1]:.2f}) | {t[2]} / {o[2]} "
                    f"(of {t[3]}+{o[3]} runs) | {min(busy):.2f}-{max(busy):.2f} "
                    f"| {min(others):.2f}-{max(others):.2f} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="packets per step = rate * seconds")
    ap.add_argument("--rates", default="20000,50000,100000,0",
                    help="offered rates in packets/s; 0 = as fast as the sender goes (default: %(default)s)")
    ap.add_argument("--max-packets", type=int, default=600000, help="packets at the maximum rate")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each reader per step (medians)")
    ap.add_argument("--drops", default="on,off", help="background drops: on, off or both (default)")
    ap.add_argument("--ours-args", default="", help="extra options for ipsec-capture start (default none)")
    args = ap.parse_args()
    for tool in ("gcc", "tcpdump", "nft"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench needs {tool}")
    rates = [int(r) for r in args.rates.split(",")]
    modes = [m.strip() == "on" for m in args.drops.split(",")]
    print(f"load average before: {loadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        work = Path(tmp)
        sender = work / "sender"
        (work / "sender.c").write_text(SENDER_C)
        sh("gcc", "-O2", "-o", str(sender), str(work / "sender.c"))
        ns = f"ict-bench-{secrets.token_hex(3)}"
        sh("ip", "netns", "add", ns)
        runs: list[Run] = []
        idle: dict[tuple[str, bool], float] = {}
        try:
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh(sys.executable, "-m", "ipsec_capture", "rules", "install", "--group", str(GROUP),
               "--netns", ns, "--points", "raw-out-ike", "--backend", "nft", cwd=ROOT)
            b = Bench(ns, sender, work, shlex.split(args.ours_args))
            readers = {"tcpdump": b.tcpdump, "ours": b.ours}
            for drops in modes:
                for name, run in readers.items():
                    idle[(name, drops)] = _median([run(0, 0, drops).cpu for _ in range(args.repeats)])
                    print(f"idle {name:8} drops {'on' if drops else 'off'}: "
                          f"{idle[(name, drops)]:.3f} s CPU", flush=True)
                for rate in rates:
                    n = int(rate * args.seconds) if rate else args.max_packets
                    for rep in range(args.repeats):
                        order = ("tcpdump", "ours") if rep % 2 == 0 else ("ours", "tcpdump")
                        for name in order:
                            r = readers[name](n, rate, drops)
                            runs.append(r)
                            print(f"{name:8} drops {'on ' if drops else 'off'} offered {rate or 'max':>7} "
                                  f"achieved {r.achieved:>7}/s captured {r.captured}/{n} lost {r.lost} "
                                  f"CPU {r.cpu:.3f} s = {r.cpu / max(r.captured, 1) * 1e6:.2f} us/pkt "
                                  f"(busy {r.busy:.2f} CPUs, others {r.others:.2f})", flush=True)
        finally:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    print(f"load average after: {loadavg()}")
    print("\n".join(table(runs, idle)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
