"""Running nft / iptables-restore / *-save, inside a named netns when asked.

One place turns "tool missing" and "tool failed" into errors a user can act on.
"""

from __future__ import annotations

import shutil
import subprocess

from ipsec_capture.errors import UserError
from ipsec_capture.netns import exec_prefix

# Which Debian package provides each tool, for the "not installed" message.
PACKAGE = {"nft": "nftables"}


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def run(argv: list[str], netns: str | None, stdin: str | None = None,
        check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a tool; UserError naming the tool, the netns and its stderr when it fails."""
    if not have(argv[0]):
        pkg = PACKAGE.get(argv[0], "iptables")
        raise UserError(f"{argv[0]} is not installed: apt-get install {pkg} (or pick another --backend)")
    proc = subprocess.run(exec_prefix(netns) + argv, input=stdin, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        where = f" in netns {netns}" if netns else ""
        err = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
        raise UserError(f"{' '.join(argv)}{where} failed: {err}")
    return proc
