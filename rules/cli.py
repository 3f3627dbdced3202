"""`ipsec-capture rules show|list|install|remove|cleanup`."""

from __future__ import annotations

import argparse
import sys
import time

from ipsec_capture.errors import UserError

from .manager import (
    BACKENDS,
    InstalledSet,
    build,
    cleanup,
    install,
    list_installed,
    remove_group,
)
from .points import POINTS, parse_points

_POINTS_HELP = "comma-separated capture points (default: all): " + ", ".join(
    f"{p.name} = {p.description}" for p in POINTS.values()
)
_BACKEND_HELP = ("auto (nft if usable, else iptables), nft, iptables (the flavour iptables-restore is), "
                 "iptables-legacy, iptables-nft; default auto")


def register(sub: argparse._SubParsersAction) -> None:
    rules = sub.add_parser(
        "rules", help="show, install, list and remove the NFLOG rules that feed a capture",
        description="NFLOG rules copy packets at named capture points to an NFLOG group. `start` "
                    "installs and removes them itself; these commands let you review the exact rules, "
                    "run your own reader, or clean up after a crash. Every rule we install carries an "
                    "owner tag (group, pid, start time) in its comment.")
    rsub = rules.add_subparsers(dest="rules_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--netns", metavar="NAME", help="act inside this network namespace (ip netns)")
        return p

    def group(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--group", "-g", type=int, required=required, default=None if required else 5,
                       help="NFLOG group 0..65535" + ("" if required else " (default 5)"))

    def shape(p: argparse.ArgumentParser) -> None:
        p.add_argument("--points", metavar="LIST", help=_POINTS_HELP)
        p.add_argument("--backend", default="auto", choices=BACKENDS, metavar="NAME", help=_BACKEND_HELP)

    p = common(rsub.add_parser("show", help="print the exact rules without touching anything (no root)",
                               description="Print the nft script or the iptables-restore inputs that "
                                           "`install` would load, to review or apply by hand."))
    group(p, required=False)
    shape(p)
    p.set_defaults(func=cmd_show)

    p = common(rsub.add_parser("list", help="what ipsec-capture rules are installed now"))
    p.set_defaults(func=cmd_list)

    p = common(rsub.add_parser("install", help="install a rule set and leave it (for your own reader)",
                               description="Install the rules in one transaction and exit; remove "
                                           "them with `rules remove --group N`."))
    group(p, required=True)
    shape(p)
    p.set_defaults(func=cmd_install)

    p = common(rsub.add_parser("remove", help="remove one group's rules (every backend)"))
    group(p, required=True)
    p.set_defaults(func=cmd_remove)

    p = common(rsub.add_parser("cleanup", help="remove leftovers whose owner process is gone",
                               description="Remove every ipsec-capture rule set (nft and both iptables "
                                           "flavours, IPv4 and IPv6) whose owner process no longer "
                                           "runs, e.g. after a crash or kill -9, and what such a "
                                           "capture left on the tracefs side: its tracefs instance, "
                                           "bcc's kprobe events of its pid and its private tracefs "
                                           "mount point under /tmp. Rules of running captures are "
                                           "kept unless --all."))
    p.add_argument("--all", action="store_true", help="also remove the rules of running captures")
    p.set_defaults(func=cmd_cleanup)


def _points(args: argparse.Namespace) -> tuple[str, ...]:
    return parse_points(args.points)


def cmd_show(args: argparse.Namespace) -> int:
    sys.stdout.write(build(args.group, _points(args), args.backend, args.netns).text())
    return 0


def _describe(s: InstalledSet) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.started)) if s.started else "-"
    points = ",".join(s.points) or "-"
    return f"group {s.group:<5} {s.backend:<16} {s.owner():<28} since {when}  points {points}"


def cmd_list(args: argparse.Namespace) -> int:
    sets = list_installed(args.netns)
    if not sets:
        print("no ipsec-capture rules installed" + (f" in netns {args.netns}" if args.netns else ""))
    for s in sets:
        print(_describe(s))
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    rs = build(args.group, _points(args), args.backend, args.netns)
    install(rs)
    print(f"installed NFLOG group {rs.group} ({rs.backend}): {', '.join(rs.points)}; "
          f"remove with `ipsec-capture rules remove --group {rs.group}"
          + (f" --netns {rs.netns}`" if rs.netns else "`"))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    if not 0 <= args.group <= 65535:
        raise UserError(f"NFLOG group {args.group} out of range: use 0..65535")
    gone = remove_group(args.group, args.netns)
    if not gone:
        print(f"no ipsec-capture rules for group {args.group}; nothing to remove")
    for s in gone:
        print("removed " + _describe(s))
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    # A capture leaves more than rules: its tracefs side (instance, private mount, kprobe events)
    # is bpf's to name, and global, so it is cleaned whatever --netns says.
    from ipsec_capture.bpf.kfree_skb import cleanup_leftovers

    removed = cleanup(args.netns, include_alive=args.all)
    for s in removed:
        print("removed " + _describe(s))
    traces = cleanup_leftovers()
    for line in traces:
        print(f"removed {line} (owner gone)")
    kept = [s for s in list_installed(args.netns)] if not args.all else []
    for s in kept:
        print("kept    " + _describe(s) + "  (use --all to remove)")
    if not removed and not kept and not traces:
        print("nothing to clean up")
    return 0
