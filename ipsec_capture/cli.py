"""The `ipsec-capture` command: a thin dispatcher.

Each room owns its subcommands in its own `cli.py` with a `register(subparsers)` function; this
module only wires them together and turns errors into one line and an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ipsec_capture import __version__
from ipsec_capture.errors import UserError

# Rooms that contribute subcommands, in --help order, with the commands each registers.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "ipsec_capture.capture.cli": ("start",),
    "ipsec_capture.rules.cli": ("rules",),
    "ipsec_capture.xfrm.cli": ("keys", "sa"),
    "ipsec_capture.decrypt.cli": ("decrypt",),
    "ipsec_capture.bpf.cli": ("events", "sources"),
    "ipsec_capture.correlate.cli": ("report",),
    "ipsec_capture.lab.cli": ("lab",),
    "ipsec_capture.watch.cli": ("watch",),
}


def _wanted_modules(argv: list[str] | None) -> list[str]:
    """Only the room that owns the command being run: importing every room (crypto, pyroute2,
    scapy helpers) costs seconds on a slow machine (7 s under TCG in the kernel lab) and a
    capture should start fast. `--help` or an unknown command imports them all."""
    first = next((a for a in (argv or []) if not a.startswith("-")), None)
    for module, commands in COMMAND_MODULES.items():
        if first in commands:
            return [module]
    return list(COMMAND_MODULES)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the subcommands `argv` needs (all of them when argv is None)."""
    parser = argparse.ArgumentParser(
        prog="ipsec-capture",
        description=(
            "Make Linux IPsec visible: capture ESP ciphertext and the cleartext around it via "
            "NFLOG, read keys from the kernel, decrypt, and explain what the kernel did with "
            "each packet."
        ),
        epilog="Run `ipsec-capture COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _wanted_modules(argv):
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        if args.debug:
            raise
        print(f"ipsec-capture: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
