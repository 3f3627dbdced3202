"""`ipsec-capture report`: explain a capture (or both ends of a tunnel) offline from its bundle."""

from __future__ import annotations

import argparse
import os
import sys

from ipsec_capture.errors import UserError
from ipsec_capture.spi import SPI_HELP, spi_arg

from .packet import VERDICTS

FORMATS = ("text", "json", "html")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="what the kernel did with each ESP packet, and why (text, JSON or HTML)",
        description=(
            "Join a capture's packets with its kernel events and SA history and name a cause for "
            "every packet the kernel did not accept (no-state, icv-fail, replay, policy-block, ...). "
            "Finds X.events.jsonl and X.esp_sa beside X.pcapng; works without them and says what it "
            "could not tell. Two captures from the two ends of a tunnel are also joined by (SPI, seq)."),
        epilog="Causes and the counters behind them: see the `causes` section of --format json.")
    p.add_argument("captures", nargs="+", metavar="CAPTURE.pcapng",
                   help="capture(s) written by `start`; the parts of a rotated capture (-C/-G, or a "
                        "quoted glob of them) are read as one capture")
    p.add_argument("--format", choices=FORMATS, default="text", help="output format (default text)")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout (html: required "
                   "unless stdout is redirected)")
    p.add_argument("--events", action="append", metavar="FILE",
                   help="events log instead of the one beside the capture (once per capture, in order)")
    p.add_argument("--keys", action="append", metavar="FILE",
                   help="key file instead of the bundle's: esp_sa, `ip xfrm state` output or tcpdump -E "
                        "secrets (once per capture)")
    p.add_argument("--spi", type=spi_arg, help=f"list only packets of this SPI, {SPI_HELP}")
    p.add_argument("--verdict", choices=VERDICTS, help="list only packets with this verdict")
    p.add_argument("--cause", help="list only packets with this named cause (e.g. no-state)")
    p.add_argument("--direction", choices=("in", "out"), help="list only inbound or outbound packets")
    p.add_argument("--limit", type=int, default=1000,
                   help="at most this many packets in the list (0: all; default 1000)")
    p.add_argument("--window", type=float, default=3.0, metavar="SECONDS",
                   help="how long a packet waits for its events and counters (clock skew; default 3)")
    p.set_defaults(func=run)


def _per_capture(values: list[str] | None, n: int, what: str) -> list[str | None]:
    if not values:
        return [None] * n
    if len(values) != n:
        raise UserError(f"give --{what} once per capture ({n}), or not at all")
    return list(values)


def _node_names(inputs: list) -> list[str]:
    """A node's name: its host (from the events log) when every bundle names a different one,
    else its capture's name; made unique."""
    hosts = [i.header.get("host") for i in inputs]
    use_hosts = all(hosts) and len(set(hosts)) == len(hosts)
    names: list[str] = []
    for i, host in zip(inputs, hosts, strict=True):
        base = host if use_hosts else i.name
        name, n = base, 2
        while name in names:
            name, n = f"{base}#{n}", n + 1
        names.append(name)
    return names


def run(args: argparse.Namespace) -> int:
    from . import report_html, report_json, report_text
    from .analysis import analyse
    from .api import LoadedBundle
    from .bundle import open_parts
    from .summary import ReportFilter

    if args.limit < 0:
        raise UserError("--limit must be 0 (all) or more")
    if args.window <= 0:
        raise UserError("--window must be a positive number of seconds")
    if args.cause is not None:
        from .causes import CAUSES

        if args.cause not in CAUSES:
            raise UserError(f"unknown cause {args.cause!r}: choose from {', '.join(CAUSES)}")
    from ipsec_capture.capture.rotate import expand

    captures = expand(args.captures)  # a rotated set (or a glob of one) is one capture
    events = _per_capture(args.events, len(captures), "events")
    keys = _per_capture(args.keys, len(captures), "keys")
    window_ns = int(args.window * 1e9)
    flt = ReportFilter(args.spi, args.verdict, args.cause, args.direction)
    inputs = [open_parts(c, e, k) for c, e, k in zip(captures, events, keys, strict=True)]
    reports = [analyse(i, flt, args.limit, window_ns).to_dict() for i in inputs]
    peers = []
    fleet = None
    if len(inputs) == 2:
        a, b = (LoadedBundle(i, args.window) for i in inputs)
        peers.append(a.peer(b))
    elif len(inputs) > 2:  # N nodes: joined by (destination, SPI, seq)
        from .peer import join_fleet

        loaded = [LoadedBundle(i, args.window) for i in inputs]
        fleet = join_fleet(_node_names(inputs), [b.packets() for b in loaded], window_ns,
                           path_limit=args.limit or 1_000_000)
    if args.format == "json":
        text = report_json.render(reports, peers, fleet)
    elif args.format == "html":
        text = report_html.render(reports, peers)
    else:
        text = "\n".join(report_text.render(r) for r in reports)
        text += "".join("\n" + report_text.render_peers(p) for p in peers)
        if fleet is not None:
            text += "\n" + report_text.render_fleet(fleet)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as err:
            raise UserError(f"cannot write {args.output}: {err.strerror}") from None
        print(f"report written to {os.path.abspath(args.output)}", file=sys.stderr)
    else:
        if args.format == "html" and sys.stdout.isatty():
            raise UserError("an HTML report goes to a file: add -o report.html")
        sys.stdout.write(text)
    return 0
