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

# Rooms that contribute subcommands, in --help order.
COMMAND_MODULES = (
    "ipsec_capture.capture.cli",  # start
    "ipsec_capture.rules.cli",  # rules
    "ipsec_capture.xfrm.cli",  # keys, sa
    "ipsec_capture.xfrm.decrypt_cli",  # decrypt
    "ipsec_capture.bpf.cli",  # events
    "ipsec_capture.correlate.cli",  # report
    "ipsec_capture.lab.cli",  # lab
)


def build_parser() -> argparse.ArgumentParser:
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
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # room has no CLI (yet)
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
