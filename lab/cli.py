"""`ipsec-capture lab ...`: IPsec scenarios in namespaces, faults on demand, and the lab VM."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from ipsec_capture.errors import UserError, require_root


def register(sub: argparse._SubParsersAction) -> None:
    from .cilium import FAULTS as CLUSTER_FAULTS
    from .daemons import CHILDREN
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
    kids = "; ".join(f"{c.name}: {c.summary}" for c in CHILDREN.values())
    p = with_prefix(lsub.add_parser(
        "up", help="build a scenario", description=f"Scenarios keyed by `ip xfrm`: {scen}. With --daemon the "
        f"SAs come from IKEv2 (PSK) between two real daemons, one per namespace; scenarios: ike (every "
        f"child) or one child of: {kids}. cilium: three nodes on a bridge keyed as Cilium keys them (tunnel "
        f"GCM, one SPI for every node pair with per-pair keys, inbound states src 0.0.0.0 told "
        f"apart by marks, "
        f"ESN, replay window 1024)."))
    p.add_argument("--scenario", help="default: gcm, or ike with --daemon")
    p.add_argument("--daemon", choices=("strongswan", "libreswan"),
                   help="negotiate the SAs with this IKE daemon instead of typing them in")
    p.add_argument("--no-connect", action="store_true",
                   help="with --daemon: start the daemons but negotiate nothing until `lab connect` "
                        "(start a capture in between to see the IKE exchange)")
    p.set_defaults(func=cmd_up)

    p = with_prefix(lsub.add_parser("connect",
                                    help="a daemon lab: bring every child up (IKEv2 from the left)"))
    p.set_defaults(func=cmd_connect)

    p = with_prefix(lsub.add_parser("traffic", help="send ping/UDP both ways and report sent/received"))
    p.add_argument("--count", type=int, default=5, help="packets per direction and protocol (default 5)")
    p.add_argument("--proto", choices=("icmp", "udp", "both"), default="both")
    p.add_argument("--child", choices=list(CHILDREN), help="a daemon lab: only this child's path")
    p.add_argument("--first", type=int, default=0, help="number the UDP datagrams from here (default 0)")
    p.set_defaults(func=cmd_traffic)

    p = with_prefix(lsub.add_parser("down", help="remove the lab's namespaces, helpers and state"))
    p.set_defaults(func=cmd_down)

    p = with_prefix(lsub.add_parser("status", help="show the lab, its SAs' packet counters and keys' SPIs"))
    p.add_argument("--json", action="store_true", help="print the state (including keys) as JSON")
    p.set_defaults(func=cmd_status)

    faults = "; ".join(f"{f.name}: {f.summary} (expect {f.counter or 'new SPIs'} in {f.side})"
                       for f in FAULTS.values())
    faults += "; on the cilium lab: " + "; ".join(f"{f.name}: {f.summary} (expect {f.counter} on "
                                                  f"node {f.node})"
                                                 for f in CLUSTER_FAULTS.values())
    p = with_prefix(lsub.add_parser(
        "fault", help="break the lab on purpose and show the xfrm_stat counter it moves",
        description=f"Faults: {faults}. Exit code 0 if the expected counter rose, 1 if not."))
    p.add_argument("fault", choices=list(dict.fromkeys([*FAULTS, *CLUSTER_FAULTS])))
    p.add_argument("--child", choices=list(CHILDREN), help="rekey: only this child (default: every child)")
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
    from . import daemons, scenarios
    from .daemons import CHILDREN

    require_root("lab up")
    name = args.scenario or ("ike" if args.daemon else "gcm")
    if name == "cilium":
        from . import cilium

        if args.daemon:
            raise UserError("the cilium scenario is keyed as Cilium keys it (no IKE): leave out --daemon")
        c = cilium.up(args.prefix)
        print(f"lab {c.prefix} up: cilium, nodes {', '.join(c.netns(i) for i in range(1, cilium.NODES + 1))} "
              f"on a bridge in {c.bridge_ns}")
        print(f"  SPI {cilium.SPI} for every node pair, a key per pair; pods 10.200.N.1, nodes 10.99.0.N")
        return 0
    if args.no_connect and not args.daemon:
        raise UserError("--no-connect goes with --daemon (a lab keyed by `ip xfrm` has nothing to negotiate)")
    state = scenarios.up(name, args.prefix, daemon=args.daemon or "", connect=not args.no_connect)
    if state.daemon and args.no_connect:
        print(f"lab {state.prefix} up: {state.daemon} running in {state.left} and {state.right}, children "
              f"{', '.join(state.children)} not negotiated yet: "
              f"ipsec-capture lab connect --prefix {state.prefix}")
        return 0
    if state.daemon:
        print(f"lab {state.prefix} up: {state.daemon} between {state.left} and {state.right}, "
              f"children {', '.join(state.children)}")
        for child in state.children:
            spis = sorted({sa.spi for sa in scenarios.child_sas(state.left, child)})
            print(f"  {child}: {CHILDREN[child].summary}; SPIs {', '.join(f'{s:#010x}' for s in spis)}")
        print(f"  configs and logs in {daemons.side_dir(state.prefix, 'left').parent}; "
              f"state in {scenarios.state_path(state.prefix)}")
        return 0
    spec = state.spec
    print(f"lab {state.prefix} up: {spec.name} ({spec.summary})")
    print(f"  {state.left} {state.left_host} <-> {state.right} {state.right_host} over {scenarios.DEV}")
    print(f"  SPIs {state.l2r.spi:#010x} (left->right), {state.r2l.spi:#010x} (right->left); "
          f"state in {scenarios.state_path(state.prefix)}")
    return 0


def cmd_connect(args: argparse.Namespace) -> int:
    from . import scenarios

    require_root("lab connect")
    state = scenarios.LabState.load(args.prefix)
    scenarios.connect(state)
    for c in state.children:
        spis = sorted({sa.spi for sa in scenarios.child_sas(state.left, c)})
        print(f"{c}: up, SPIs {', '.join(f'{s:#010x}' for s in spis)}")
    return 0


def cmd_traffic(args: argparse.Namespace) -> int:
    from . import traffic
    from .scenarios import LabState

    require_root("lab traffic")
    if args.count < 1:
        raise UserError("--count must be at least 1")
    from . import cilium

    if cilium.is_cluster(args.prefix):
        results = cilium.exchange(cilium.ClusterState.load(args.prefix), args.count, args.first)
        for r in results:
            print(r.line())
        return 0 if all(r.ok for r in results) else 1
    state = LabState.load(args.prefix)
    if args.child and args.child not in state.children:
        raise UserError(f"--child {args.child}: this lab's children are "
                        f"{', '.join(state.children) or 'none (no daemon)'}")
    results = traffic.exchange(state, args.count, args.proto, args.child, args.first)
    for r in results:
        print(r.line())
    return 0 if all(r.ok for r in results) else 1


def cmd_down(args: argparse.Namespace) -> int:
    from . import scenarios

    require_root("lab down")
    from . import cilium

    cluster = cilium.is_cluster(args.prefix)
    removed = cilium.teardown(args.prefix) if cluster else scenarios.teardown(args.prefix)
    print(f"lab {args.prefix} down" + (f": removed {', '.join(removed)}" if removed else ": nothing was up"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from . import scenarios

    require_root("lab status")
    from . import cilium

    if cilium.is_cluster(args.prefix):
        c = cilium.ClusterState.load(args.prefix)
        if args.json:
            print(json.dumps(asdict(c), indent=1))
            return 0
        print(f"lab {c.prefix}: cilium, {cilium.NODES} nodes")
        for ns, rows in cilium.sa_packets(c).items():
            print(f"  {ns}: " + ", ".join(f"{k}: {n} packets" for k, n in rows.items()))
        if c.faults:
            print(f"  faults injected: {', '.join(c.faults)}")
        return 0
    state = scenarios.LabState.load(args.prefix)
    if args.json:
        print(json.dumps(asdict(state), indent=1))
        return 0
    what = f"{state.daemon}, children {', '.join(state.children)}" if state.daemon else state.spec.summary
    print(f"lab {state.prefix}: {state.scenario} ({what})")
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
    from . import cilium

    if cilium.is_cluster(args.prefix):
        res = cilium.inject(cilium.ClusterState.load(args.prefix), args.fault)
        print(json.dumps(res) if args.json else
              f"fault {res['fault']}: {res['detail']}; {res['counter']} in {res['netns']}: "
              f"{res['before']} -> {res['after']} ({res['after'] - res['before']:+d})")
        return 0 if res["moved"] else 1
    result = inject(LabState.load(args.prefix), args.fault, args.child)
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
