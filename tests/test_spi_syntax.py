"""One SPI syntax everywhere: hex as `ip xfrm state` prints it, with or without 0x, parsed by
ipsec_capture.spi.parse_spi for every command that takes an SPI (start once read decimal while
report read hex)."""

from __future__ import annotations

import argparse

import pytest

from ipsec_capture.cli import build_parser, main
from ipsec_capture.errors import UserError
from ipsec_capture.spi import parse_spi, spi_arg


@pytest.mark.parametrize(("text", "spi"), [("12345678", 0x12345678), ("0x12345678", 0x12345678),
                                           ("c0ffee01", 0xC0FFEE01), ("0XC0FFEE01", 0xC0FFEE01),
                                           ("1", 1), ("ffffffff", 0xFFFFFFFF), (" 0xb1a4 ", 0xB1A4)])
def test_hex_with_or_without_0x(text: str, spi: int) -> None:
    assert parse_spi(text) == spi


@pytest.mark.parametrize("text", ["", "0", "0x0", "0x", "1ffffffff", "-1", "+1", "12_34", "zz", "0o17",
                                  "3237998081"])
def test_anything_else_is_one_line(text: str) -> None:
    with pytest.raises(UserError) as err:
        parse_spi(text)
    assert "\n" not in str(err.value) and "SPI" in str(err.value)


def _spi_options(parser: argparse.ArgumentParser, path: str = "") -> list[tuple[str, argparse.Action]]:
    """Every --spi option of every (sub)command."""
    found = []
    for action in parser._actions:
        if "--spi" in action.option_strings:
            found.append((path, action))
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _spi_options(sub, f"{path} {name}".strip())
    return found


def test_every_command_parses_spi_the_same_and_says_so() -> None:
    options = _spi_options(build_parser())
    commands = {path for path, _ in options}
    assert {"start", "report"} <= commands, commands
    for path, action in options:
        assert action.type is spi_arg, f"{path} --spi does not use ipsec_capture.spi"
        assert "hex" in (action.help or "") and "0x" in action.help, f"{path} --spi help: {action.help}"


def test_start_and_report_read_the_same_digits_as_the_same_spi() -> None:
    parser = build_parser()
    start = parser.parse_args(["start", "-g", "5", "-w", "x.pcapng", "--spi", "12345678"])
    report = parser.parse_args(["report", "x.pcapng", "--spi", "12345678"])
    assert start.spi == report.spi == 0x12345678


def test_bad_spi_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["report", "x.pcapng", "--spi", "nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --spi: bad SPI 'nope'" in err and "Traceback" not in err
