"""The installed command runs, and the test hosts work."""

import subprocess
import sys

from tests.netlab import NetnsPair


def test_cli_help_lists_itself() -> None:
    out = subprocess.run([sys.executable, "-m", "ipsec_capture", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "ipsec-capture" in out.stdout


def test_netns_pair_can_ping(netns_pair: NetnsPair) -> None:
    netns_pair.run("a", "ping", "-c1", "-W2", netns_pair.b4)
    netns_pair.run("a", "ping", "-c1", "-W2", netns_pair.b6)
