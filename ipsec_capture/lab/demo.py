"""The README's main command (`./dev.sh demo`): real IPsec, captured, with keys, on any machine.

If this kernel can do ESP, the demo runs here: `lab up` (AES-GCM transport), `start` capturing in
the left host's namespace, `lab traffic`, SIGINT, `keys` from the kernel, and a few tshark lines.
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

PREFIX = "demo"
READY_TIMEOUT = 120  # `start` under TCG: rule install + socket setup


def available_commands() -> set[str]:
    """Subcommands this build of ipsec-capture has (others are still being written)."""
    from ipsec_capture.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ipsec_capture", *args]


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def start_capture(netns: str, pcapng: Path) -> subprocess.Popen | None:
    """`ipsec-capture start` in the background; None if it never said it was ready."""
    argv = ["ip", "netns", "exec", netns, *cli("start", "-w", str(pcapng))]
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
            if "ready" in line:
                return proc
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    say(f"start did not say `ready` within {READY_TIMEOUT} s")
    return None


def stop_capture(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    for line in (out + err).strip().splitlines()[-5:]:
        say(f"start: {line}")


def tshark_lines(pcapng: Path, esp_sa: Path, count: int = 12) -> str:
    if shutil.which("tshark") is None:
        return "(tshark is not installed)"
    extra: list[str] = []
    if esp_sa.exists():
        r = subprocess.run(cli("keys", "--from-text", str(esp_sa), "--tshark-args"), capture_output=True,
                           text=True)
        if r.returncode == 0:
            extra = shlex.split(r.stdout)
    r = subprocess.run(["tshark", "-n", "-r", str(pcapng), "-c", str(count), *extra],
                       capture_output=True, text=True)
    return r.stdout.strip() or r.stderr.strip()


def run_here(out: Path, scenario: str) -> int:
    """The demo on this kernel (which must do ESP)."""
    from ipsec_capture.lab import scenarios, traffic

    out.mkdir(parents=True, exist_ok=True)
    pcapng, esp_sa = out / "capture.pcapng", out / "capture.esp_sa"
    have = available_commands()
    missing = [c for c in ("start", "keys") if c not in have]
    if missing:
        say(f"this build has no `ipsec-capture {' / '.join(missing)}` yet: "
            "that part of the demo is skipped")
    scenarios.teardown(PREFIX)  # a previous demo interrupted hard
    state = scenarios.up(scenario, PREFIX)
    rc = 0
    try:
        say(f"lab up: {state.spec.summary}; {state.left} {state.left_host} <-> {state.right} "
            f"{state.right_host}")
        capture = start_capture(state.left, pcapng) if "start" in have else None
        if "start" in have and capture is None:
            rc = 1
        try:
            for r in traffic.exchange(state, count=5):
                say(r.line())
                rc = rc or (0 if r.ok else 1)
        finally:
            if capture is not None:
                stop_capture(capture)
        if "keys" in have:
            r = subprocess.run(cli("keys", "--netns", state.left, "-w", str(esp_sa)),
                               capture_output=True, text=True)
            if r.returncode != 0:
                say(f"keys failed: {r.stderr.strip()}")
                rc = 1
    finally:
        scenarios.teardown(PREFIX)
    if pcapng.exists():
        say(f"first packets (tshark, ESP decrypted with {esp_sa.name}):")
        print(tshark_lines(pcapng, esp_sa), flush=True)
    made = [p for p in (pcapng, out / "capture.events.jsonl", esp_sa) if p.exists()]
    say("bundle: " + (", ".join(str(p) for p in made) if made else f"nothing written in {out}"))
    return rc


def run_in_vm(out: Path, scenario: str) -> int:
    from ipsec_capture.lab.scenarios import esp_supported
    from ipsec_capture.lab.vm import LabVM

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
                         "--scenario", scenario], timeout=1200, on_output=stream)
    say(f"VM done in {time.monotonic() - t0:.0f} s; the bundle is on this machine in {out}")
    return result.rc


def main(argv: list[str] | None = None) -> int:
    from ipsec_capture.lab.scenarios import SCENARIOS, esp_supported

    parser = argparse.ArgumentParser(
        prog="python -m ipsec_capture.lab.demo",
        description="Build an IPsec lab, capture it with ipsec-capture start, write the keys, show the "
                    "bundle. Runs in the kernel lab VM when this kernel has no ESP.")
    parser.add_argument("--out", default="ipsec-capture-demo",
                        help="bundle directory (default ./ipsec-capture-demo)")
    parser.add_argument("--scenario", default="gcm", choices=list(SCENARIOS))
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--here", action="store_true", help="run on this kernel (it must do ESP)")
    where.add_argument("--vm", action="store_true",
                       help="run in the kernel lab VM even if this kernel does ESP")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    try:
        require_root("the demo")
        if args.here or (not args.vm and esp_supported()[0]):
            return run_here(out, args.scenario)
        return run_in_vm(out, args.scenario)
    except UserError as err:
        print(f"ipsec-capture demo: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
