"""The kernel half of the lab tests: real IPsec captured by the product, run once inside the VM.

    python tests/lab/capture_run.py OUT_DIR [--scenarios gcm,natt] [--kprobe] [--bcc]

Everything that needs a kernel with ESP happens here, through the product's own commands, and
leaves files in OUT_DIR (a read-write share); tests/lab/test_lab_e2e.py then checks them on the
host at native speed (tshark, decrypt, report work offline on a bundle, as they do for users).
Under TCG every command costs seconds, so one `lab up` per scenario serves all of:
  1. `lab traffic` captured by `start` in the left host, once per rule backend (nft, iptables),
     with the kernel's SA packet counters read before and after (`ip -s xfrm state`);
  2. `keys` reading the SAs from the kernel over XFRM netlink;
  3. the scenario's fault (`lab fault NAME`), captured by `start` on the side whose counter moves
     and, at the same time, on the other side (two bundles of one tunnel);
  4. `lab down`, and what is left afterwards.
Every `start` runs with the default `--kernel-events auto`: the shipped CO-RE probes where the
kernel has BTF. With --kprobe, one more lab (gcm, delete-sa) is captured with `--kernel-events
kprobe` (insisting on per-packet probes); with --bcc, the same with `--kernel-events bcc` (the
fallback, compiled in the guest: 6.1 only, bcc 0.26 cannot compile against 6.12's headers).
Writes OUT_DIR/<case>.json per case and prints a line per step; exits non-zero if a step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ipsec_capture.lab.faults import FAULTS
from ipsec_capture.lab.scenarios import SCENARIOS, STATE_DIR, parse_sa_packets

GROUP = 5
COUNT = 3  # pings and UDP echoes each way, per capture
BACKENDS = ("nft", "iptables")
# which fault each scenario's lab ends with (each fault once, on a scenario where it applies)
FAULT_FOR = {"gcm": "delete-sa", "natt": "wrong-key", "esn": "replay", "ipv6": "block-policy",
             "cbc-tunnel": "mtu"}


def say(msg: str) -> None:
    print(f"[capture_run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cli(*args: str, timeout: float = 300) -> dict:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "ipsec_capture", *args], capture_output=True, text=True,
                       timeout=timeout)
    return {"argv": list(args), "rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr,
            "seconds": round(time.monotonic() - t0, 1)}


def sa_packets(netns: str) -> dict[str, int]:
    text = subprocess.run(["ip", "-s", "-n", netns, "xfrm", "state"], capture_output=True, text=True,
                          timeout=60).stdout
    return {f"0x{spi:08x}": n for spi, n in parse_sa_packets(text).items()}


REKEY_SPI = 0x0BADC0DE


def rekey(netns: str, state: dict) -> dict:
    """What an IKE daemon does at a rekey, as far as keys go: a new inbound SA (same algorithms,
    new SPI and key). Returns the SPI and key for the test to find in the bundle's key file."""
    from ipsec_capture.lab.scenarios import LabState, sa_line

    lab = LabState.load(state["prefix"])
    key = os.urandom(len(bytes.fromhex(lab.r2l.enc_key))).hex()
    line = sa_line(lab, "r2l", enc_key=key).replace(f"spi {lab.r2l.spi:#010x}", f"spi {REKEY_SPI:#010x}")
    subprocess.run(["ip", "-n", netns, *line.split()], check=True, capture_output=True, timeout=60)
    time.sleep(0.5)  # the monitor notification reaches the key file keeper
    return {"spi": f"0x{REKEY_SPI:08x}", "enc_key": key}


def leftovers() -> dict[str, list[str]]:
    """Namespaces, lab state files and NAT-T helper processes that exist now."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    state = sorted(os.listdir(STATE_DIR)) if STATE_DIR.is_dir() else []
    helpers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ipsec_capture.lab.udp_encap" in args:
            helpers.append(f"{pid} {args}")
    return {"netns": netns, "state_files": state, "encap_helpers": helpers}


class Capture:
    """`ipsec-capture start` in the background, from `ready` to SIGINT."""

    def __init__(self, pcapng: Path, netns: str, backend: str = "auto", kernel_events: str = "auto",
                 ready_timeout: float = 400) -> None:
        self.argv = ["start", "--group", str(GROUP), "-w", str(pcapng), "--netns", netns, "--backend",
                     backend, "--kernel-events", kernel_events, "--quiet", "--json"]
        t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "ipsec_capture", *self.argv], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        self.before_ready = ""
        deadline = t0 + ready_timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.before_ready += line
            if line.startswith("ready"):
                self.ready_s = round(time.monotonic() - t0, 1)
                return
        self.proc.kill()
        raise RuntimeError(f"start did not get ready: {self.before_ready}{self.proc.stderr.read()}")

    def stop(self) -> dict:
        time.sleep(0.3)  # the last replies' NFLOG batch
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=120)
        return {"argv": self.argv, "rc": self.proc.returncode, "ready_s": self.ready_s,
                "summary": json.loads(out) if out.strip() else None, "stderr": self.before_ready + err}


def run_scenario(name: str, out: Path) -> dict:
    prefix = "e2e"
    case: dict = {"scenario": name, "captures": {}}
    cli("lab", "down", "--prefix", prefix)
    case["up"] = cli("lab", "up", "--scenario", name, "--prefix", prefix)
    if case["up"]["rc"]:
        return case
    state = json.loads(cli("lab", "status", "--json", "--prefix", prefix)["stdout"])
    case["state"] = state
    left = state["left"]
    try:
        case["sa_packets_before"] = {ns: sa_packets(ns) for ns in (state["left"], state["right"])}
        for backend in BACKENDS:
            pcapng = out / f"{name}-{backend}.pcapng"
            cap = Capture(pcapng, left, backend)
            traffic = cli("lab", "traffic", "--count", str(COUNT), "--prefix", prefix)
            if backend == BACKENDS[-1]:
                case["sa_packets_after"] = {ns: sa_packets(ns) for ns in (state["left"], state["right"])}
                case["rekey"] = rekey(left, state)  # an SA appears while `start` runs
            case["captures"][backend] = {"file": pcapng.name, "traffic": traffic, **cap.stop()}
            say(f"{name}/{backend}: ready in {cap.ready_s} s, traffic rc {traffic['rc']}")
        case["keys"] = cli("keys", "--netns", left, "-w", str(out / f"{name}.kernel.esp_sa"))
        fault = FAULT_FOR[name]
        netns = state[FAULTS[fault].side]
        pcapng = out / f"{name}-fault-{fault}.pcapng"
        cap = Capture(pcapng, netns)
        # the other end too, for the two-bundle join (sent at one end, verdict at the other)
        other = state["left"] if netns == state["right"] else state["right"]
        peer_pcapng = out / f"{name}-fault-{fault}-peer.pcapng"
        peer = Capture(peer_pcapng, other)
        result = cli("lab", "fault", fault, "--json", "--prefix", prefix)
        case["fault"] = {"name": fault, "netns": netns, "file": pcapng.name, "result": result, **cap.stop(),
                         "peer": {"netns": other, "file": peer_pcapng.name, **peer.stop()}}
        say(f"{name}: fault {fault} rc {result['rc']}")
    finally:
        case["down"] = cli("lab", "down", "--prefix", prefix)
        case["left_after_down"] = leftovers()
    return case


def run_kprobe(out: Path, kernel_events: str = "kprobe") -> dict:
    """gcm with the receiver's SA deleted mid-traffic, kernel events from per-packet probes."""
    prefix = "kp"
    case: dict = {"scenario": "gcm", "fault": "delete-sa", "kernel_events": kernel_events}
    cli("lab", "down", "--prefix", prefix)
    case["up"] = cli("lab", "up", "--scenario", "gcm", "--prefix", prefix)
    if case["up"]["rc"]:
        return case
    state = json.loads(cli("lab", "status", "--json", "--prefix", prefix)["stdout"])
    case["state"] = state
    try:
        pcapng = out / f"{kernel_events}-delete-sa.pcapng"
        cap = Capture(pcapng, state["right"], kernel_events=kernel_events, ready_timeout=600)
        say(f"{kernel_events}: ready in {cap.ready_s} s (a bcc compile included)")
        case["traffic"] = cli("lab", "traffic", "--count", str(COUNT), "--prefix", prefix)
        case["result"] = cli("lab", "fault", "delete-sa", "--json", "--prefix", prefix)
        case.update(file=pcapng.name, **cap.stop())
    finally:
        case["down"] = cli("lab", "down", "--prefix", prefix)
    return case


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--kprobe", action="store_true")
    ap.add_argument("--bcc", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    jobs = [(n, lambda n=n: run_scenario(n, out)) for n in args.scenarios.split(",") if n]
    if args.kprobe:
        jobs.append(("kprobe", lambda: run_kprobe(out)))
    if args.bcc:
        jobs.append(("bcc", lambda: run_kprobe(out, "bcc")))
    for name, job in jobs:
        t0 = time.monotonic()
        try:
            case = job()
        except Exception as err:  # one broken case must not hide the others
            case = {"error": repr(err)}
            failed += 1
        case["seconds"] = round(time.monotonic() - t0, 1)
        (out / f"{name}.json").write_text(json.dumps(case, indent=1))
        say(f"{name}: done in {case['seconds']} s" + (f" ERROR {case['error']}" if "error" in case else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
