"""The one SPI syntax of every command: hex, as `ip xfrm state` prints it (`spi 0xc0ffee01`).

`--spi c0ffee01` and `--spi 0xc0ffee01` are the same SPI in `start`, `report` and wherever an SPI
is typed; there is no decimal form (start once read decimal while report read hex: the same
digits named two SPIs). Defined here once and imported, so the commands cannot drift again.
"""

from __future__ import annotations

import argparse
import re

from ipsec_capture.errors import UserError

SPI_HELP = "hex as `ip xfrm state` prints it, with or without 0x (c0ffee01 = 0xc0ffee01)"
_HEX = re.compile(r"(?:0[xX])?([0-9a-fA-F]{1,8})")


def parse_spi(text: str) -> int:
    """An SPI from the command line; UserError in one line for anything else."""
    m = _HEX.fullmatch(text.strip())
    if m is None:
        raise UserError(f"bad SPI {text!r}: give it in hex as `ip xfrm state` prints it, e.g. 0xc0ffee01 "
                        "or c0ffee01 (1 to 8 hex digits)")
    spi = int(m.group(1), 16)
    if spi == 0:
        raise UserError(f"bad SPI {text!r}: SPI 0 is reserved (an SPI is 0x1..0xffffffff)")
    return spi


def spi_arg(text: str) -> int:
    """parse_spi as an argparse `type` (argparse reports ArgumentTypeError as a usage error)."""
    try:
        return parse_spi(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
