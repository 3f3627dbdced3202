"""`ipsec-capture events`: collect kernel events alone (no packet capture) into an events log;
`ipsec-capture sources`: what this machine allows, each source tried (attached, then detached).

Same conventions as `start`: the active sources go to stderr, then a line beginning with `ready`
once every source is attached (scripts wait for it before sending traffic); Ctrl-C, SIGTERM or
--duration stop it cleanly with the last counter deltas flushed.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import threading
from typing import Any

from ipsec_capture.errors import UserError, require_root

from .capture_events import CaptureEvents
from .sources import MODES, KernelEvents, plan_sources

MODE_HELP = ("auto: per-packet probes (the shipped CO-RE object, else bcc) where the kernel allows, "
             "else the skb:kfree_skb tracepoint (BPF, else tracefs); kprobe: insist on per-packet probes; "
             "bcc: per-packet probes through bcc only; tracepoint: drops only; tracefs: drops only, "
             "through a tracefs instance (no BPF); off: nothing (default: auto)")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "events",
        help="collect kernel IPsec events (drops, counters, SA changes, per-packet probes) into a log",
        description=(
            "Collect what the kernel does with IPsec packets, without capturing packets: "
            "xfrm_input/xfrm_output probes (CO-RE or bcc), skb:kfree_skb drops, "
            "/proc/net/xfrm_stat counter deltas and XFRM monitor events, into a JSONL events log "
            "that `report` reads. Prints `ready` on stderr once attached; stop with Ctrl-C."
        ),
    )
    p.add_argument("-w", "--write", metavar="OUT.events.jsonl", required=True,
                   help="events log to write (mode 0600)")
    p.add_argument("--netns", metavar="NAME", help="network namespace to watch (as `ip netns list` shows)")
    p.add_argument("--kernel-events", choices=MODES, default="auto", help=MODE_HELP)
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument("--interval", type=float, default=0.5, metavar="S",
                   help="xfrm_stat polling interval (default: 0.5)")
    p.add_argument("--all-drops", action="store_true",
                   help="keep every kfree_skb drop, not only xfrm/esp related ones")
    p.set_defaults(func=run)

    p = sub.add_parser(
        "sources", help="say which kernel event sources this machine allows (tries them, captures nothing)",
        description="Try every kernel event source `start` and `events` would use, as they would (load, "
                    "attach, then detach at once: nothing is captured or written), and say for each what "
                    "attached and why the others did not. Without root it shows the plan only.")
    p.add_argument("--kernel-events", choices=MODES, default="auto", help=MODE_HELP)
    p.add_argument("--netns", metavar="NAME", help="network namespace to try in (as `ip netns list` shows)")
    p.add_argument("--json", action="store_true", help="print the sources as JSON")
    p.set_defaults(func=run_sources)


def run_sources(args: argparse.Namespace) -> int:
    """Exit 0 if anything that gives kernel verdicts (kprobe or tracepoint) attached, else 1."""
    import os

    tried = os.geteuid() == 0
    if tried:
        kernel = KernelEvents(None, args.kernel_events, args.netns, progress=lambda m: print(
            f"ipsec-capture: {m}", file=sys.stderr, flush=True))
        try:
            statuses = kernel.attach()
        finally:
            kernel.stop()
    else:
        statuses = plan_sources(args.kernel_events, args.netns)
    verdicts = any(s.active for s in statuses if s.name in ("kprobe", "tracepoint"))
    if args.json:
        print(json.dumps({"kernel": platform.release(), "tried": tried,
                          "sources": [s.to_dict() for s in statuses]}, indent=1))
        return 0 if verdicts else 1
    print(f"kernel {platform.release()}: " + ("each source was attached and detached again"
                                              if tried else "the plan only (not root: nothing tried)"))
    for s in statuses:
        via = f" via {s.via}" if s.active and s.via else ""
        print(f"  {s.name:<12} {'on' if s.active else 'off':<3}{via:<12} {s.why}")
    return 0 if verdicts else 1


def run(args: argparse.Namespace) -> int:
    if args.duration is not None and args.duration <= 0:
        raise UserError("--duration must be a positive number of seconds")
    if args.interval <= 0:
        raise UserError("--interval must be a positive number of seconds")
    require_root("ipsec-capture events")
    log = CaptureEvents(args.write, args.kernel_events, args.netns, poll_interval=args.interval,
                        keep_all_drops=args.all_drops)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        log.start()
        try:
            print(f"ready: writing kernel events to {args.write}", file=sys.stderr, flush=True)
            stop.wait(args.duration)
        finally:
            summary = log.stop()
        counts = ", ".join(f"{k} {v}" for k, v in summary["events"].items()) or "no sources"
        print(f"ipsec-capture: {log.count} events ({counts}) in {args.write}", file=sys.stderr)
        for err in summary.get("errors", []):
            print(f"ipsec-capture: error stopping {err}", file=sys.stderr)
        return 1 if summary.get("errors") else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
