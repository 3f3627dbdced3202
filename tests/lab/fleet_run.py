"""Three lab nodes, one bundle each, run inside the VM (real ESP):

    python tests/lab/fleet_run.py OUT_DIR

Nodes n1, n2, n3 (network namespaces on one bridge) with a transport-mode AES-GCM SA for every
ordered pair (SPI 0x1000 + 16*i + j, the same SA installed at both ends) and policies for UDP.
`start` captures on every node at once; UDP goes n1 -> n2 (5), n2 -> n3 (5), n1 -> n3 (3); then
n1 -> n3's SA is deleted on n3 (a fault on one pair) and 3 more go n1 -> n3. OUT_DIR gets
n1.pcapng, n2.pcapng, n3.pcapng (bundles) and fleet.json; tests/lab/test_lab_watch.py joins them
with `report n1 n2 n3` on the host.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "ipsec_capture"]
NODES = ("fleet-n1", "fleet-n2", "fleet-n3")
ADDR = {n: f"198.51.100.{11 + i}" for i, n in enumerate(NODES)}
BRIDGE = "brfleet"
PORT = 7777
SENT = {("fleet-n1", "fleet-n2"): 5, ("fleet-n2", "fleet-n3"): 5, ("fleet-n1", "fleet-n3"): 3}
AFTER_FAULT = 3


def sh(*argv: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    full = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
    p = subprocess.run(full, capture_output=True, text=True, timeout=120)
    if check and p.returncode:
        raise RuntimeError(f"{' '.join(full)}: {p.stderr}")
    return p


def spi(i: int, j: int) -> int:
    return 0x1000 + 16 * i + j


def build() -> dict:
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "link", "set", BRIDGE, "up")
    for k, n in enumerate(NODES):
        sh("ip", "netns", "add", n)
        sh("ip", "link", "add", f"vf{k}", "type", "veth", "peer", "name", f"vf{k}p")
        sh("ip", "link", "set", f"vf{k}p", "master", BRIDGE, "up")
        sh("ip", "link", "set", f"vf{k}", "netns", n, "name", "eth0")
        sh("ip", "addr", "add", f"{ADDR[n]}/24", "dev", "eth0", netns=n)
        sh("ip", "link", "set", "eth0", "up", netns=n)
        sh("ip", "link", "set", "lo", "up", netns=n)
    keys = {}
    for i, a in enumerate(NODES, 1):
        for j, b in enumerate(NODES, 1):
            if a == b:
                continue
            key = "0x" + secrets.token_hex(20)
            keys[f"{i}{j}"] = key
            state = ["xfrm", "state", "add", "src", ADDR[a], "dst", ADDR[b], "proto", "esp", "spi",
                     hex(spi(i, j)), "mode", "transport", "aead", "rfc4106(gcm(aes))", key, "128"]
            for n in (a, b):
                sh("ip", *state, netns=n)
            sh("ip", "xfrm", "policy", "add", "src", ADDR[a], "dst", ADDR[b], "proto", "udp", "dir", "out",
               "tmpl", "src", ADDR[a], "dst", ADDR[b], "proto", "esp", "mode", "transport", netns=a)
            sh("ip", "xfrm", "policy", "add", "src", ADDR[a], "dst", ADDR[b], "proto", "udp", "dir", "in",
               "tmpl", "src", ADDR[a], "dst", ADDR[b], "proto", "esp", "mode", "transport", netns=b)
    return keys


def teardown() -> None:
    for n in NODES:
        sh("ip", "netns", "del", n, check=False)
    sh("ip", "link", "del", BRIDGE, check=False)


SEND = r"""
import socket, sys, time
dst, port, n, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    s.sendto(f"{tag} {i}".encode() * 8, (dst, port))
    time.sleep(0.2)
"""
SINK = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
time.sleep(float(sys.argv[3]))
"""


def send(a: str, b: str, n: int, tag: str) -> None:
    sh(sys.executable, "-c", SEND, ADDR[b], str(PORT), str(n), tag, netns=a)


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"nodes": list(NODES), "addresses": ADDR,
                 "sent": {f"{a}>{b}": n for (a, b), n in SENT.items()}, "after_fault": AFTER_FAULT,
                 "faulted": f"{NODES[0]}>{NODES[2]}", "spi_faulted": hex(spi(1, 3))}
    teardown()
    procs = []
    sinks = []
    try:
        build()
        for n in NODES:
            sinks.append(subprocess.Popen(["ip", "netns", "exec", n, sys.executable, "-c", SINK, ADDR[n],
                                           str(PORT), "600"]))
        for n in NODES:
            procs.append(subprocess.Popen([*CLI, "start", "--netns", n, "-g", "5", "-w",
                                           str(out / f"{n.split('-')[1]}.pcapng"), "--kernel-events",
                                           "tracepoint", "-q", "--json"], cwd=ROOT, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for p in procs:
            line = p.stderr.readline()
            while line and not line.startswith("ready"):
                line = p.stderr.readline()
            if not line:
                raise RuntimeError(f"start did not get ready: {p.stderr.read()}")
        for (a, b), n in SENT.items():
            send(a, b, n, f"{a}>{b}")
        sh("ip", "xfrm", "state", "delete", "src", ADDR[NODES[0]], "dst", ADDR[NODES[2]], "proto", "esp",
           "spi", hex(spi(1, 3)), netns=NODES[2])
        send(NODES[0], NODES[2], AFTER_FAULT, "after")
        time.sleep(1.5)  # the xfrm_stat poll and the NFLOG batch
        res["xfrm_stat_n3"] = sh("cat", "/proc/net/xfrm_stat", netns=NODES[2]).stdout
    finally:
        summaries = []
        for p in procs:
            p.send_signal(signal.SIGINT)
            o, e = p.communicate(timeout=120)
            summaries.append({"rc": p.returncode, "summary": json.loads(o) if o.strip() else None,
                              "stderr": e[-2000:]})
        res["starts"] = summaries
        for s in sinks:
            s.kill()
        teardown()
        (out / "fleet.json").write_text(json.dumps(res, indent=1))
    ok = all(s["rc"] == 0 for s in res["starts"])
    print("fleet_run done" + ("" if ok else f": {res['starts']}"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
