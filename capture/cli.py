"""`ipsec-capture start`: the live capture command."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ipsec_capture.errors import UserError
from ipsec_capture.spi import SPI_HELP, spi_arg

from .start import EXIT_LOST, Capture, Companion, StartOptions, run_start

BACKENDS = ("auto", "nft", "iptables", "iptables-legacy", "iptables-nft")


def _points_help() -> str:
    try:
        from ipsec_capture.rules.points import POINTS
    except ImportError:  # rules room absent: help still works
        return "comma-separated capture points (default: all)"
    return "comma-separated capture points (default: all): " + ", ".join(POINTS)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "start", help="capture IPsec traffic at named capture points into a pcapng file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Install NFLOG rules at the capture points (ESP/IKE on the wire, the cleartext "
                    "before encryption and after decryption), read the NFLOG group and write every "
                    "packet to a pcapng file, one interface per capture point. Stop with Ctrl-C or "
                    "SIGTERM: the rules are removed and the file is complete.",
        epilog="One capture is a bundle with one stem: out.pcapng (packets), out.events.jsonl (kernel "
               "events, SA snapshot, capture statistics) and out.esp_sa (keys); `report` and `decrypt` "
               "read it on any machine.\n"
               "A line starting with `ready` goes to stderr once the rules are in, the reader runs and "
               "the kernel event sources are attached (also with --quiet), so scripts know when to "
               "start traffic. Kprobes are compiled first: that can take a minute on slow machines.\n"
               f"Exit status: 0 on success; {EXIT_LOST} if the kernel dropped packets before we "
               "read them (the summary says how many); 2 for bad arguments or a failure; 77 when "
               "not root; 70 if the unprivileged reader process died.\n"
               "Files are mode 0600 and belong to the user who ran sudo.\n\n"
               "example: sudo ipsec-capture start --group 5 -w out.pcapng")
    p.add_argument("--group", "-g", type=int, required=True, metavar="N",
                   help="NFLOG group to use (0..65535); must not be read by anyone else")
    p.add_argument("-w", "--write", required=True, metavar="FILE",
                   help="pcapng file to write (created mode 0600; replaced if it exists)")
    p.add_argument("--points", metavar="LIST", help=_points_help())
    p.add_argument("--backend", default="auto", choices=BACKENDS, metavar="NAME",
                   help="rule backend: auto (nft if usable, else iptables), nft, iptables; default auto")
    p.add_argument("-c", "--count", type=int, default=0, metavar="COUNT",
                   help="stop after writing COUNT packets (default: no limit)")
    p.add_argument("--duration", type=float, default=0.0, metavar="S",
                   help="stop after S seconds (default: no limit)")
    p.add_argument("-s", "--snaplen", type=int, default=262144, metavar="SNAPLEN",
                   help="bytes of each packet to keep (the kernel caps NFLOG copies at 65531)")
    p.add_argument("--netns", metavar="NAME", help="capture inside this network namespace (ip netns); "
                                                   "the rules go there too")
    p.add_argument("--no-rules", action="store_true",
                   help="install no rules: only read the group (you installed NFLOG rules yourself)")
    p.add_argument("--host", metavar="ADDR",
                   help="write only packets from or to this IPv4/IPv6 address")
    p.add_argument("--spi", metavar="SPI", type=spi_arg,
                   help=f"write only ESP packets with this SPI, {SPI_HELP}; NAT-T included")
    p.add_argument("--linktype", choices=("nflog", "raw"), default="nflog",
                   help="nflog (default: Wireshark shows point, hook, devices) or raw (plain IP, "
                        "for tools without NFLOG support)")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no status line and no text summary (the `ready` line is still printed)")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON on stdout")
    p.add_argument("--kernel-events", choices=("auto", "kprobe", "bcc", "tracepoint", "tracefs", "off"),
                   default="auto",
                   metavar="MODE",
                   help="kernel verdicts into FILE's .events.jsonl: auto (per-packet probes on "
                        "xfrm_input/xfrm_output: the shipped CO-RE object where the kernel has BTF, else "
                        "bcc; where neither attaches, the skb:kfree_skb tracepoint; always "
                        "/proc/net/xfrm_stat deltas and XFRM monitor events; `ipsec-capture sources` "
                        "says what this machine allows), kprobe (insist on per-packet probes), bcc "
                        "(per-packet probes through bcc only), tracepoint (drops only), tracefs (drops only, "
                        "through a tracefs instance: no BPF), off (no events log); default auto")
    p.add_argument("--no-keys", action="store_true",
                   help="do not write FILE's .esp_sa (Wireshark keys of every SA, kept current "
                        "through rekeys; mode 0600)")
    p.add_argument("-C", dest="rotate_mb", type=float, default=0.0, metavar="MB",
                   help="rotate: start a new bundle part (FILE-0000.pcapng, -0001, ... each with its "
                        "events log and key file) once a part holds MB (10^6 bytes), as tcpdump -C")
    p.add_argument("-G", dest="rotate_seconds", type=float, default=0.0, metavar="SECONDS",
                   help="rotate every SECONDS (with -C: whichever comes first)")
    p.add_argument("-W", dest="rotate_count", type=int, default=0, metavar="COUNT",
                   help="with -C/-G: keep only the newest COUNT parts (a ring; the oldest removed)")
    p.add_argument("--user", "-Z", metavar="NAME",
                   help="once the rules are in, the socket and files open and the kernel sources "
                        "attached, packets are read and written by a process of this user, with no "
                        "capabilities (like tcpdump -Z); a root process stays only to remove the "
                        "rules at the end. Default: the user who ran sudo, else nobody; "
                        "`--user root` keeps root")
    p.add_argument("--no-drop", action="store_true",
                   help="read packets as root, no --user process (rarely wanted: to debug, or "
                        "where the reader must open files after the start)")
    p.add_argument("--rcvbuf", type=int, default=None, help=argparse.SUPPRESS)  # tests: force overload
    p.set_defaults(func=cmd_start)


def cmd_start(args: argparse.Namespace) -> int:
    points = None
    if args.points is not None:
        points = [s.strip() for s in args.points.split(",") if s.strip()]
        if not points:
            raise UserError("--points is empty: name at least one capture point")
    opts = StartOptions(group=args.group, write=args.write, points=points, backend=args.backend,
                        count=args.count, duration=args.duration, snaplen=args.snaplen,
                        netns=args.netns, rules=not args.no_rules, host=args.host, spi=args.spi,
                        linktype=args.linktype, quiet=args.quiet, rcvbuf=args.rcvbuf,
                         rotation=_rotation(args), user=args.user, drop=not args.no_drop)
    return run_start(opts, json_out=args.json, companions=lambda capture: bundle_companions(
        capture, args.kernel_events, keys=not args.no_keys))


def _rotation(args: argparse.Namespace) -> object | None:
    if not (args.rotate_mb or args.rotate_seconds or args.rotate_count):
        return None
    from .rotate import Rotation

    rot = Rotation(args.rotate_mb, args.rotate_seconds, args.rotate_count)
    rot.validate()
    return rot


def bundle_companions(capture: Capture, kernel_events: str, keys: bool) -> list[Companion]:
    """The rest of the bundle beside the pcapng: the events log first (it may refuse a mode the
    kernel cannot do, before any key file exists), then the key file keeper. A rotated capture
    (-C/-G) names the first part's companions and moves them on with every part."""
    from ipsec_capture.bundle import Bundle

    o = capture.opts
    rotating = o.rotation is not None and o.rotation.active
    if rotating:
        from .rotate import part_path

        bundle = Bundle.for_capture(part_path(o.write, 0))
    else:
        bundle = Bundle.for_capture(o.write)
    out: list[Companion] = []
    if kernel_events != "off":
        from ipsec_capture.bpf.capture_events import CaptureEvents

        from .nflog import TIMEOUT_CS, stamp_late_ns

        kw: dict[str, Any] = {}  # the one optional keyword, `writer`
        if rotating:
            kw["writer"] = _parted_log(capture)
        out.append(CaptureEvents(bundle.events, kernel_events, o.netns, stats=capture.stats_dict,
                                 quiet=o.quiet, stamp_late_ns=stamp_late_ns(TIMEOUT_CS), **kw))
    if keys:
        from ipsec_capture.xfrm.keeper import KeyFileKeeper

        keeper = KeyFileKeeper(bundle.keys, o.netns)
        out.append(keeper)
        if rotating:
            capture.rotate_hooks.append(lambda _i, path: keeper.retarget(Bundle.for_capture(path).keys))
    return out


def _parted_log(capture: Capture) -> Callable[[str, dict], Any]:
    """An events-log factory whose log follows the capture's parts."""
    from ipsec_capture.bpf.capture_events import sa_snapshot_events
    from ipsec_capture.bundle import Bundle
    from ipsec_capture.netns import netns_inode

    from .rotate import PartedEventLog

    o = capture.opts
    inode = netns_inode(o.netns)

    def make(path: str, header: dict) -> PartedEventLog:
        log = PartedEventLog(path, header, o.rotation, lambda: sa_snapshot_events(o.netns, inode))
        capture.rotate_hooks.append(lambda i, part: log.rotate(i, Bundle.for_capture(part).events))
        return log

    return make
