"""`ipsec-capture lab ...`: IPsec scenarios in namespaces, faults on demand, and the lab VM."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from ipsec_capture.errors import UserError, require_root


def register(sub: argparse._SubParsersAction) -> None:
    from .faults import FAULTS
    from .scenarios import SCENARIOS

    lab = sub.add_parser(
        "lab", help="build IPsec scenarios in network namespaces (or a VM) to try ipsec-capture on",
        description="Two hosts in network namespaces (<prefix>-left, <prefix>-right) joined by a veth pair, "
                    "with real `ip xfrm` SAs and policies both ways and random keys. Needs a kernel with "
                    "ESP; elsewhere run it in the kernel lab VM: "
                    "ipsec-capture lab vm -- ipsec-capture lab up")
    lsub = lab.add_subparsers(dest="lab_command", metavar="ACTION", required=True)

    def with_prefix(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--prefix", default="lab", help="namespace name prefix (default: lab)")
        return p

    scen = "; ".join(f"{s.name}: {s.summary}" for s in SCENARIOS.values())
    p = with_prefix(lsub.add_parser("up", help="build a scenario", description=f"Scenarios: {scen}."))
    p.add_argument("--scenario", default="gcm", choices=list(SCENARIOS), help="default: gcm")
    p.set_defaults(func=cmd_up)

    p = with_prefix(lsub.add_parser("traffic", help="send ping/UDP both ways and report sent/received"))
    p.add_argument("--count", type=int, default=5, help="packets per direction and protocol (default 5)")
    p.add_argument("--proto", choices=("icmp", "udp", "both"), default="both")
    p.set_defaults(func=cmd_traffic)

    p = with_prefix(lsub.add_parser("down", help="remove the lab's namespaces, helpers and state"))
    p.set_defaults(func=cmd_down)

    p = with_prefix(lsub.add_parser("status", help="show the lab, its SAs' packet counters and keys' SPIs"))
    p.add_argument("--json", action="store_true", help="print the state (including keys) as JSON")
    p.set_defaults(func=cmd_status)

    faults = "; ".join(f"{f.name}: {f.summary} (expect {f.counter} in {f.side})" for f in FAULTS.values())
    p = with_prefix(lsub.add_parser(
        "fault", help="break the lab on purpose and show the xfrm_stat counter it moves",
        description=f"Faults: {faults}. Exit code 0 if the expected counter rose, 1 if not."))
    p.add_argument("fault", choices=list(FAULTS))
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_fault)

    p = lsub.add_parser(
        "vm", help="run a command in the kernel lab VM (Debian's kernel under QEMU, host root read-only)",
        description="Boots /boot/vmlinuz-* (by default Debian 12's 6.1: ESP, GCM, kprobes; --kernel picks "
                    "another) under QEMU with the "
                    "host's / shared read-only and writes kept in RAM, runs COMMAND, prints its output and "
                    "exits with its exit code. Example: ipsec-capture lab vm --rw /tmp/out -- "
                    "ipsec-capture lab up --scenario gcm")
    p.add_argument("--memory", default="2G", help="guest memory (default 2G)")
    p.add_argument("--cpus", type=int, default=2, help="guest vCPUs (default 2)")
    p.add_argument("--rw", action="append", default=[], metavar="DIR",
                   help="share host DIR read-write at the same path (repeatable); "
                        "results leave the VM only this way")
    p.add_argument("--kernel", metavar="VERSION|PATH",
                   help="kernel to boot: a version line such as 6.12 or 6.1 (the newest installed of it) or "
                        "a vmlinuz path (default: $IPSEC_CAPTURE_LAB_KERNEL, else Debian 12's 6.1)")
    p.add_argument("--timeout", type=float, default=1800, help="command timeout in seconds (default 1800)")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    p.set_defaults(func=cmd_vm)


def cmd_up(args: argparse.Namespace) -> int:
    from . import scenarios

    require_root("lab up")
    state = scenarios.up(args.scenario, args.prefix)
    spec = state.spec
    print(f"lab {state.prefix} up: {spec.name} ({spec.summary})")
    print(f"  {state.left} {state.left_host} <-> {state.right} {state.right_host} over {scenarios.DEV}")
    print(f"  SPIs {state.l2r.spi:#010x} (left->right), {state.r2l.spi:#010x} (right->left); "
          f"state in {scenarios.state_path(state.prefix)}")
    return 0


def cmd_traffic(args: argparse.Namespace) -> int:
    from . import traffic
    from .scenarios import LabState

    require_root("lab traffic")
    if args.count < 1:
        raise UserError("--count must be at least 1")
    state = LabState.load(args.prefix)
    results = traffic.exchange(state, args.count, args.proto)
    for r in results:
        print(r.line())
    return 0 if all(r.ok for r in results) else 1


def cmd_down(args: argparse.Namespace) -> int:
    from . import scenarios

    require_root("lab down")
    removed = scenarios.teardown(args.prefix)
    print(f"lab {args.prefix} down" + (f": removed {', '.join(removed)}" if removed else ": nothing was up"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from . import scenarios

    require_root("lab status")
    state = scenarios.LabState.load(args.prefix)
    if args.json:
        print(json.dumps(asdict(state), indent=1))
        return 0
    print(f"lab {state.prefix}: {state.scenario} ({state.spec.summary})")
    for side in ("left", "right"):
        ns = state.netns(side)
        counts = scenarios.sa_packets(ns)
        sas = ", ".join(f"{spi:#010x}: {n} packets" for spi, n in sorted(counts.items()))
        print(f"  {ns}: {sas or 'no SAs'}")
    if state.faults:
        print(f"  faults injected: {', '.join(state.faults)}")
    return 0


def cmd_fault(args: argparse.Namespace) -> int:
    from .faults import inject
    from .scenarios import LabState

    require_root("lab fault")
    result = inject(LabState.load(args.prefix), args.fault)
    if args.json:
        print(json.dumps(asdict(result) | {"moved": result.moved}))
    else:
        print(result.line())
    return 0 if result.moved else 1


def cmd_vm(args: argparse.Namespace) -> int:
    from .vm import LabVM

    require_root("lab vm")
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise UserError("lab vm: give a command after --, e.g. ipsec-capture lab vm -- uname -r")

    def stream(kind: str, chunk: bytes) -> None:
        out = sys.stdout.buffer if kind == "out" else sys.stderr.buffer
        out.write(chunk)
        out.flush()

    with LabVM(memory=args.memory, cpus=args.cpus, rw=args.rw, kernel=args.kernel) as vm:
        result = vm.run(argv, timeout=args.timeout, cwd=os.getcwd(), on_output=stream)
    if result.timed_out:
        print(f"ipsec-capture: lab vm: command timed out after {args.timeout:.0f} s", file=sys.stderr)
    return result.rc
