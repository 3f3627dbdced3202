"""`keys --verify CAPTURE`: does Wireshark itself decrypt this capture with our table?

We run tshark (Wireshark's own dissectors, the same ones the GUI uses) with the table passed as
`-o uat:esp_sa:` rows, decryption and ICV checking on, and count per SPI how many ESP packets
came out with a good ICV. A user learns the file works before opening the GUI, and a count of
bad ICVs points at wrong keys or ESN high bits Wireshark 4.0 cannot take.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from ipsec_capture.errors import UserError

from .esp_sa import tshark_args
from .sa import SA


@dataclass(slots=True)
class SpiResult:
    spi: int
    packets: int = 0
    icv_good: int = 0
    icv_bad: int = 0
    decrypted: int = 0  # Wireshark found a next header (a plausible trailer) after decrypting


def verify_capture(capture: str, sas: Iterable[SA], columns: int = 8,
                   timeout: float = 600) -> dict[int, SpiResult]:
    """Per SPI: ESP packets in `capture` and how many Wireshark decrypted with a good ICV."""
    exe = shutil.which("tshark")
    if exe is None:
        raise UserError("--verify needs tshark (apt-get install tshark)")
    argv = [exe, "-n", "-r", capture, *tshark_args(sas, columns), "-Y", "esp", "-T", "fields",
            "-E", "separator=|", "-e", "esp.spi", "-e", "esp.icv_good", "-e", "esp.icv_bad",
            "-e", "esp.protocol"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"tshark took longer than {timeout:.0f} s on {capture}") from None
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        why = err[-1] if err else f"exit {proc.returncode}"
        raise UserError(f"tshark could not read {capture}: {why}")
    results: dict[int, SpiResult] = {}
    for line in proc.stdout.splitlines():
        spi_text, good, bad, nxt = [*line.split("|"), "", "", ""][:4]
        if not spi_text:
            continue
        spi = int(spi_text.split(",")[0], 0)
        r = results.setdefault(spi, SpiResult(spi))
        r.packets += 1
        r.icv_good += good.split(",")[0] in ("1", "True")
        r.icv_bad += bad.split(",")[0] in ("1", "True")
        r.decrypted += bool(nxt)
    return results


def format_results(results: dict[int, SpiResult]) -> str:
    if not results:
        return "no ESP packets in the capture"
    lines = [f"{'SPI':>10}  {'ESP':>7}  {'ICV good':>8}  {'ICV bad':>7}  {'decrypted':>9}"]
    for spi in sorted(results):
        r = results[spi]
        lines.append(f"0x{spi:08x}  {r.packets:7}  {r.icv_good:8}  {r.icv_bad:7}  {r.decrypted:9}")
    return "\n".join(lines)
