"""`ipsec-capture report`: explain a capture (or both ends of a tunnel) offline from its bundle."""

from __future__ import annotations

import argparse
import os
import sys

from ipsec_capture.errors import UserError

FORMATS = ("text", "json", "html")
VERDICTS = ("ok", "failed", "unknown")


def _spi(text: str) -> int:
    try:
        value = int(text, 16) if text.lower().startswith("0x") else int(text, 16 if len(text) == 8 else 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"SPI {text!r} is not a number (e.g. 0xc0ffee01)") from None
    if not 0 < value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"SPI {text!r} is out of range (1..0xffffffff)")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="what the kernel did with each ESP packet, and why (text, JSON or HTML)",
        description=(
            "Join a capture's packets with its kernel events and SA history and name a cause for "
            "every packet the kernel did not accept (no-state, icv-fail, replay, policy-block, ...). "
            "Finds X.events.jsonl and X.esp_sa beside X.pcapng; works without them and says what it "
            "could not tell. Two captures from the two ends of a tunnel are also joined by (SPI, seq)."),
        epilog="Causes and the counters behind them: see the `causes` section of --format json.")
    p.add_argument("captures", nargs="+", metavar="CAPTURE.pcapng", help="capture(s) written by `start`")
    p.add_argument("--format", choices=FORMATS, default="text", help="output format (default text)")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout (html: required "
                   "unless stdout is redirected)")
    p.add_argument("--events", action="append", metavar="FILE",
                   help="events log instead of the one beside the capture (once per capture, in order)")
    p.add_argument("--keys", action="append", metavar="FILE",
                   help="key file instead of the bundle's: esp_sa, `ip xfrm state` output or tcpdump -E "
                        "secrets (once per capture)")
    p.add_argument("--spi", type=_spi, help="list only packets of this SPI (hex with 0x)")
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


def run(args: argparse.Namespace) -> int:
    from . import report_html, report_json, report_text
    from .analysis import analyse
    from .api import LoadedBundle
    from .bundle import open_bundle
    from .summary import PacketFilter

    if args.limit < 0:
        raise UserError("--limit must be 0 (all) or more")
    if args.window <= 0:
        raise UserError("--window must be a positive number of seconds")
    if args.cause is not None:
        from .causes import CAUSES

        if args.cause not in CAUSES:
            raise UserError(f"unknown cause {args.cause!r}: choose from {', '.join(CAUSES)}")
    events = _per_capture(args.events, len(args.captures), "events")
    keys = _per_capture(args.keys, len(args.captures), "keys")
    window_ns = int(args.window * 1e9)
    flt = PacketFilter(args.spi, args.verdict, args.cause, args.direction)
    inputs = [open_bundle(c, e, k) for c, e, k in zip(args.captures, events, keys, strict=True)]
    reports = [analyse(i, flt, args.limit, window_ns).to_dict() for i in inputs]
    peers = []
    if len(inputs) == 2:
        a, b = (LoadedBundle(i, args.window) for i in inputs)
        peers.append(a.peer(b))
    if args.format == "json":
        text = report_json.render(reports, peers)
    elif args.format == "html":
        text = report_html.render(reports, peers)
    else:
        text = "\n".join(report_text.render(r) for r in reports)
        text += "".join("\n" + report_text.render_peers(p) for p in peers)
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
