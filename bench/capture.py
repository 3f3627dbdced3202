"""Benchmark: `ipsec-capture start` against `tcpdump -i nflog:N -w`, the same rule and sender.

    python -m bench.capture [--seconds 1.0] [--rates 20000,50000,...] [--keep DIR]

Inside a namespace of its own (ict-bench-*, loopback only) one NFLOG rule (`rules install
--points raw-out-esp`) copies every ESP packet a small C sender (compiled with gcc here) emits at
a paced rate. For each offered rate, each reader in turn captures `seconds` worth of packets;
a step is lossless when the file holds every packet sent. It prints, per reader, the highest
lossless rate and the ratio ours/tcpdump (target >= 1.0), and per step the reader's CPU time per
packet (startup included; the sender's own CPU is not charged to it). Not a test: the numbers depend on the
machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GROUP = 61
ROOT = Path(__file__).parent.parent
SENDER_C = r"""
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
/* sender N RATE: N ESP packets (SPI 0x1000, seq 1..N, 100 bytes) to 127.0.0.1, paced to RATE/s
   (0: as fast as possible); prints the rate achieved. */
static double now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
    long n = atol(argv[1]); double rate = atof(argv[2]);
    int s = socket(AF_INET, SOCK_RAW, 50);
    if (s < 0) { perror("socket"); return 1; }
    struct sockaddr_in d = {.sin_family = AF_INET};
    inet_pton(AF_INET, "127.0.0.1", &d.sin_addr);
    unsigned char buf[100]; memset(buf, 0xa5, sizeof buf);
    uint32_t spi = htonl(0x1000); memcpy(buf, &spi, 4);
    double t0 = now();
    for (long i = 0; i < n; i++) {
        uint32_t seq = htonl((uint32_t)i + 1); memcpy(buf + 4, &seq, 4);
        if (rate > 0) while (now() - t0 < i / rate) ;
        if (sendto(s, buf, sizeof buf, 0, (struct sockaddr *)&d, sizeof d) < 0) {
            perror("sendto"); return 1;
        }
    }
    printf("%.0f\n", n / (now() - t0));
    return 0;
}
"""


def sh(*argv: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def children_cpu() -> float:
    """CPU seconds (user + system) of the children waited for so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def send(ns: str, sender: Path, n: int, rate: int) -> tuple[int, float]:
    """Run the sender; the rate it achieved and its CPU seconds (so readers are charged only theirs)."""
    before = children_cpu()
    rate = int(float(sh("ip", "netns", "exec", ns, str(sender), str(n), str(rate)).stdout))
    return rate, children_cpu() - before


def run_ours(ns: str, sender: Path, n: int, rate: int, out: Path) -> tuple[int, int, float]:
    """Packets captured, rate achieved, and the reader's CPU seconds."""
    before = children_cpu()
    proc = subprocess.Popen([sys.executable, "-m", "ipsec_capture", "start", "--group", str(GROUP), "-w",
                             str(out), "--netns", ns, "--no-rules", "--json", "--quiet",
                             # packets only, like tcpdump: no kernel event sources, no key file
                             "--kernel-events", "off", "--no-keys"], cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if not proc.stderr.readline().startswith("ready"):
            raise SystemExit(f"ipsec-capture did not start: {proc.stderr.read()}")
        achieved, sender_cpu = send(ns, sender, n, rate)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return json.loads(stdout)["packets"], achieved, children_cpu() - before - sender_cpu


def run_tcpdump(ns: str, sender: Path, n: int, rate: int, out: Path) -> tuple[int, int, float]:
    before = children_cpu()
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-i", f"nflog:{GROUP}", "-s", "262144",
                             "-w", str(out)], text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if "listening" not in proc.stderr.readline():
            raise SystemExit(f"tcpdump did not start: {proc.stderr.read()}")
        achieved, sender_cpu = send(ns, sender, n, rate)
        time.sleep(1.5)  # libpcap leaves the kernel's 1 s batch timeout
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    m = re.search(r"(\d+) packets? captured", err)
    return (int(m.group(1)) if m else 0), achieved, children_cpu() - before - sender_cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1.0, help="packets per step = rate * seconds")
    ap.add_argument("--rates", default="20000,50000,100000,150000,200000,300000,0",
                    help="offered rates in packets/s, ascending; 0 = as fast as the sender goes")
    args = ap.parse_args()
    for tool in ("gcc", "tcpdump", "nft"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench needs {tool}")
    rates = [int(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        work = Path(tmp)
        sender = work / "sender"
        (work / "sender.c").write_text(SENDER_C)
        sh("gcc", "-O2", "-o", str(sender), str(work / "sender.c"))
        ns = f"ict-bench-{secrets.token_hex(3)}"
        sh("ip", "netns", "add", ns)
        try:
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh(sys.executable, "-m", "ipsec_capture", "rules", "install", "--group", str(GROUP),
               "--netns", ns, "--points", "raw-out-esp", "--backend", "nft", cwd=ROOT)
            best: dict[str, int] = {}
            saturated: dict[str, bool] = {}
            for name, runner in (("tcpdump", run_tcpdump), ("ipsec-capture", run_ours)):
                best[name] = 0
                for rate in rates:
                    n = int((rate or 300000) * args.seconds)
                    got, achieved, cpu = runner(ns, sender, n, rate, work / f"{name}.pcap")
                    lossless = got >= n
                    print(f"{name:14} offered {rate or 'max':>7} achieved {achieved:>7}/s  "
                          f"captured {got}/{n}  {'lossless' if lossless else 'LOSS':8}  "
                          f"reader CPU {cpu / max(got, 1) * 1e6:.1f} us/pkt", flush=True)
                    if not lossless:
                        break
                    best[name] = max(best[name], achieved)
                    saturated[name] = rate == 0
        finally:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    ratio = best["ipsec-capture"] / best["tcpdump"] if best["tcpdump"] else float("inf")
    print(f"highest lossless rate: tcpdump {best['tcpdump']}/s, ipsec-capture {best['ipsec-capture']}/s; "
          f"ratio ours/tcpdump {ratio:.2f} (target >= 1.0)")
    if all(saturated.values()):
        print("both readers kept up with the sender's maximum: the sender, not the reader, set the limit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
