"""The README's main command (`./dev.sh demo`): real IPsec, captured, explained, on any machine.

If this kernel can do ESP, the demo runs here: `lab up` (AES-GCM transport), `start` on the
receiving host (all capture points, kernel events: per-packet probes where the kernel allows),
`lab traffic` both ways, then a fault (the receiver's SA deleted while traffic flows), SIGINT,
`report` on the bundle and a few tshark lines with ESP decrypted by the bundle's key file.
Otherwise the same script runs inside the kernel lab VM with the output directory shared
read-write, so the bundle lands on this machine either way.
"""

from __future__ import annotations

import argparse
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ipsec_capture.errors import UserError, require_root

# start's --kernel-events modes (bpf.sources.MODES; the lab does not import bpf: a test holds them equal)
KERNEL_EVENT_MODES = ("auto", "kprobe", "bcc", "tracepoint", "tracefs", "off")

PREFIX = "demo"
READY_TIMEOUT = 600  # `start` under TCG: rules, sockets, and a bcc compile of the kprobes (~90 s)
FAULT = "delete-sa"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ipsec_capture", *args]


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def start_capture(netns: str, pcapng: Path, kernel_events: str) -> subprocess.Popen | None:
    """`ipsec-capture start` in the background; None if it never said it was ready."""
    argv = cli("start", "--group", "5", "-w", str(pcapng), "--netns", netns, "--kernel-events",
               kernel_events)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + READY_TIMEOUT
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            say(f"start exited {proc.returncode}: {proc.stderr.read().strip()}")
            return None
        if select.select([proc.stderr], [], [], 0.5)[0]:
            line = proc.stderr.readline()
            if line:
                say(f"start: {line.strip()}")
            if line.startswith("ready"):
                return proc
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    say(f"start did not say `ready` within {READY_TIMEOUT} s")
    return None


def stop_capture(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    for line in (out + err).strip().splitlines():
        say(f"start: {line}")
    return proc.returncode


def tshark_lines(pcapng: Path, esp_sa: Path, count: int = 12) -> str:
    if shutil.which("tshark") is None:
        return "(tshark is not installed)"
    extra: list[str] = []
    if esp_sa.exists():
        r = subprocess.run(cli("keys", "--from-text", str(esp_sa), "--tshark-args"), capture_output=True,
                           text=True)
        if r.returncode == 0:
            extra = shlex.split(r.stdout)
    fields = ("frame.number", "frame.interface_name", "ip.src", "ip.dst", "esp.spi", "_ws.col.Protocol",
              "_ws.col.Info")
    r = subprocess.run(["tshark", "-n", "-r", str(pcapng), "-c", str(count), *extra, "-T", "fields",
                        "-E", "separator=\t", *(a for f in fields for a in ("-e", f))],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return r.stderr.strip()
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    rows = [row for row in rows if len(row) == len(fields)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(fields))] if rows else []
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def run_here(out: Path, scenario: str, kernel_events: str) -> int:
    """The demo on this kernel (which must do ESP)."""
    from . import faults, scenarios, traffic

    out.mkdir(parents=True, exist_ok=True)
    pcapng = out / "capture.pcapng"
    esp_sa, events = pcapng.with_suffix(".esp_sa"), pcapng.with_suffix(".events.jsonl")
    scenarios.teardown(PREFIX)  # a previous demo interrupted hard
    state = scenarios.up(scenario, PREFIX)
    rc = 0
    try:
        say(f"lab up: {state.spec.summary}; {state.left} {state.left_host} <-> {state.right} "
            f"{state.right_host}")
        say(f"capturing on the receiving host {state.right}")
        capture = start_capture(state.right, pcapng, kernel_events)
        if capture is None:
            return 1
        try:
            for r in traffic.exchange(state, count=5):
                say(r.line())
                rc = rc or (0 if r.ok else 1)
            say(f"fault: {faults.fault(FAULT).summary}")
            say(faults.inject(state, FAULT).line())
            time.sleep(1)  # one more xfrm_stat sample lands in the events log
        finally:
            rc = stop_capture(capture) or rc
    finally:
        scenarios.teardown(PREFIX)
    say("report (ipsec-capture report " + str(pcapng) + "):")
    report = subprocess.run(cli("report", str(pcapng), "--limit", "12"), capture_output=True, text=True)
    print(report.stdout.rstrip() or report.stderr.rstrip(), flush=True)
    rc = rc or report.returncode
    say(f"first packets (tshark, ESP decrypted with {esp_sa.name}):")
    print(tshark_lines(pcapng, esp_sa), flush=True)
    made = [p for p in (pcapng, events, esp_sa) if p.exists()]
    say("bundle: " + ", ".join(str(p) for p in made))
    say(f"HTML report: ipsec-capture report {pcapng} --format html -o {out / 'report.html'}")
    return rc


def run_in_vm(out: Path, scenario: str, kernel_events: str) -> int:
    from .scenarios import esp_supported
    from .vm import LabVM

    _, why = esp_supported()
    say(f"this kernel ({os.uname().release}) cannot do ESP ({why}); "
        "running the demo in the kernel lab VM")
    out.mkdir(parents=True, exist_ok=True)

    def stream(kind: str, chunk: bytes) -> None:
        target = sys.stdout.buffer if kind == "out" else sys.stderr.buffer
        target.write(chunk)
        target.flush()

    t0 = time.monotonic()
    with LabVM(memory="2G", cpus=2, rw=[out]) as vm:
        say(f"VM booted in {vm.boot_seconds:.1f} s")
        result = vm.run([sys.executable, "-m", "ipsec_capture.lab.demo", "--here", "--out", str(out),
                         "--scenario", scenario, "--kernel-events", kernel_events], timeout=1200,
                        on_output=stream)
    say(f"VM done in {time.monotonic() - t0:.0f} s; the bundle is on this machine in {out}")
    return result.rc


def main(argv: list[str] | None = None) -> int:
    from .scenarios import SCENARIOS, esp_supported

    parser = argparse.ArgumentParser(
        prog="python -m ipsec_capture.lab.demo",
        description="Build an IPsec lab, capture it with ipsec-capture start, write the keys, show the "
                    "bundle. Runs in the kernel lab VM when this kernel has no ESP.")
    parser.add_argument("--out", default="ipsec-capture-demo",
                        help="bundle directory (default ./ipsec-capture-demo)")
    parser.add_argument("--scenario", default="gcm", choices=list(SCENARIOS))
    parser.add_argument("--kernel-events", default="auto", choices=KERNEL_EVENT_MODES,
                        help="as for `start` (default auto: the shipped CO-RE probes where the kernel "
                             "has BTF, else bcc, else the kfree_skb tracepoint)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--here", action="store_true", help="run on this kernel (it must do ESP)")
    where.add_argument("--vm", action="store_true",
                       help="run in the kernel lab VM even if this kernel does ESP")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    try:
        require_root("the demo")
        if args.here or (not args.vm and esp_supported()[0]):
            return run_here(out, args.scenario, args.kernel_events)
        return run_in_vm(out, args.scenario, args.kernel_events)
    except UserError as err:
        print(f"ipsec-capture demo: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
