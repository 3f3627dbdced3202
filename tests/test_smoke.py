"""The package installs as one import package with the rooms as subpackages."""

import importlib
import subprocess
import sys

import pytest

from tests.netlab import NetnsPair


@pytest.mark.parametrize("room", ["capture", "rules", "xfrm", "bpf", "correlate", "lab"])
def test_rooms_are_subpackages(room: str) -> None:
    mod = importlib.import_module(f"ipsec_capture.{room}")
    assert mod.__name__ == f"ipsec_capture.{room}"


def test_cli_help_lists_itself() -> None:
    out = subprocess.run([sys.executable, "-m", "ipsec_capture", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "ipsec-capture" in out.stdout


def test_netns_pair_can_ping(netns_pair: NetnsPair) -> None:
    netns_pair.run("a", "ping", "-c1", "-W2", netns_pair.b4)
    netns_pair.run("a", "ping", "-c1", "-W2", netns_pair.b6)
