"""`ipsec-capture watch`: the always-on service's command line."""

from __future__ import annotations

import argparse

from .service import DEFAULT_GROUP, DEFAULT_LISTEN, Watch, WatchOptions

BACKENDS = ("auto", "nft", "iptables", "iptables-legacy", "iptables-nft")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "watch", help="run always on: Prometheus metrics per SA and cause, incidents as JSON lines",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Keep the kernel event sources (skb:kfree_skb or kprobes, /proc/net/xfrm_stat, the "
                    "XFRM monitor) and the SA table watched, export per-SA packets, bytes and failures "
                    "by cause, the xfrm_stat counters, SA lifecycle, our own losses and source status "
                    "as Prometheus metrics, and print one JSON line per incident (the first drop of a "
                    "cause on an SA: cause, SA, peer, evidence) on stdout for log collectors.",
        epilog="A line starting with `ready` goes to stderr once every source is attached and the "
               "endpoint listens. SIGHUP re-reads the SA tables and forgets gone SAs and the incident "
               "memory; SIGTERM/SIGINT stop cleanly (rules and tracefs instances removed).\n"
               "Without --ring one NFLOG rule (raw-pre-esp, headers only) names the SPI of ESP that "
               "arrives for a missing SA; --no-tap leaves it out (no-state then counts per namespace).\n"
               "With --ring MB the last packets of every capture point are kept in memory and each "
               "incident writes a bundle (DIR/incident-...pcapng, .events.jsonl, .esp_sa) with the "
               "seconds before and after it, for `ipsec-capture report`.\n\n"
               "example: sudo ipsec-capture watch --netns gw --listen :9477 --ring 64 --dir /var/lib/ic")
    p.add_argument("--netns", action="append", metavar="NAME",
                   help="watch this network namespace (repeat for several; default: this one)")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="ADDR:PORT",
                   help=f"where /metrics is served (default {DEFAULT_LISTEN}; :PORT for every address)")
    p.add_argument("--dir", default=".", metavar="DIR", help="where flight-recorder bundles go (default .)")
    p.add_argument("--ring", type=float, default=0.0, metavar="MB",
                   help="flight recorder: keep MB of the last packets (all capture points) in memory and "
                        "write a bundle around each incident (default 0: off)")
    p.add_argument("--before", type=float, default=5.0, metavar="S",
                   help="seconds of packets before an incident in its bundle (default 5)")
    p.add_argument("--after", type=float, default=5.0, metavar="S",
                   help="seconds after an incident to keep recording into its bundle (default 5)")
    p.add_argument("--max-bundles", type=int, default=20, metavar="N",
                   help="keep at most N incident bundles in DIR, removing the oldest (default 20)")
    p.add_argument("--min-gap", type=float, default=30.0, metavar="S",
                   help="at most one bundle per S seconds (default 30)")
    p.add_argument("--group", "-g", type=int, default=DEFAULT_GROUP, metavar="N",
                   help=f"NFLOG group for the ESP tap and the ring (default {DEFAULT_GROUP})")
    p.add_argument("--backend", default="auto", choices=BACKENDS, metavar="NAME",
                   help="rule backend: auto, nft, iptables (default auto)")
    p.add_argument("--kernel-events", choices=("auto", "kprobe", "tracepoint", "tracefs"), default="auto",
                   metavar="MODE", help="drop source: auto, kprobe, tracepoint, tracefs (no BPF); "
                                        "default auto")
    p.add_argument("--interval", type=float, default=5.0, metavar="S",
                   help="read the SA tables every S seconds (default 5; also whenever a counter moves)")
    p.add_argument("--forget", type=float, default=300.0, metavar="S",
                   help="drop an SA's series S seconds after it is gone (default 300)")
    p.add_argument("--quiet-after", type=float, default=60.0, metavar="S",
                   help="a cause on an SA silent for S seconds ends its incident (default 60)")
    p.add_argument("--no-tap", action="store_true", help="no NFLOG rule at all (without --ring)")
    p.set_defaults(func=cmd_watch)


def cmd_watch(args: argparse.Namespace) -> int:
    opts = WatchOptions(netns=list(args.netns or [None]), listen=args.listen, dir=args.dir,
                        group=args.group, kernel_events=args.kernel_events, backend=args.backend,
                        interval=args.interval, forget=args.forget, quiet_after=args.quiet_after,
                        tap=not args.no_tap, ring_mb=args.ring, ring_before=args.before,
                        ring_after=args.after, ring_max_bundles=args.max_bundles,
                        ring_min_gap=args.min_gap)
    return Watch(opts).run()
