"""`ipsec-capture events`: collect kernel events alone (no packet capture) into an events log.

Same conventions as `start`: the active sources go to stderr, then a line beginning with `ready`
once every source is attached (scripts wait for it before sending traffic); Ctrl-C, SIGTERM or
--duration stop it cleanly with the last counter deltas flushed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from ipsec_capture.errors import UserError, require_root

from .capture_events import CaptureEvents
from .sources import MODES


def register(sub: Any) -> None:
    p = sub.add_parser(
        "events",
        help="collect kernel IPsec events (drops, counters, SA changes, per-packet probes) into a log",
        description=(
            "Collect what the kernel does with IPsec packets, without capturing packets: "
            "xfrm_input/xfrm_output kprobes (kernels with kprobes and bcc), skb:kfree_skb drops, "
            "/proc/net/xfrm_stat counter deltas and XFRM monitor events, into a JSONL events log "
            "that `report` reads. Prints `ready` on stderr once attached; stop with Ctrl-C."
        ),
    )
    p.add_argument("-w", "--write", metavar="OUT.events.jsonl", required=True,
                   help="events log to write (mode 0600)")
    p.add_argument("--netns", metavar="NAME", help="network namespace to watch (as `ip netns list` shows)")
    p.add_argument("--kernel-events", choices=MODES, default="auto",
                   help="auto: kprobes if the kernel and bcc allow, else the skb:kfree_skb tracepoint; "
                        "kprobe / tracepoint: insist on one; off: nothing (default: auto)")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument("--interval", type=float, default=0.5, metavar="S",
                   help="xfrm_stat polling interval (default: 0.5)")
    p.add_argument("--all-drops", action="store_true",
                   help="keep every kfree_skb drop, not only xfrm/esp related ones")
    p.set_defaults(func=run)


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
