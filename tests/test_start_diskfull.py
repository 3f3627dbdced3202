"""A capture whose disk fills up (a tmpfs of 2 MiB mounted here) or whose file may grow no more
(RLIMIT_FSIZE): the pcapng ends on a whole block and holds exactly the packets the error line
counts, the rules are gone, and `start` exits 2 with one clear line and no traceback."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipsec_capture.capture.pcapread import read_records
from tests.netlab import NetnsPair
from tests.test_start_netns import CLI, ROOT, our_rules

TMPFS_MIB = 2
FLOOD = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
body = bytes.fromhex("0000b1a400000001") + b"\xa5" * 1200
for i in range(int(sys.argv[1])):
    s.sendto(body, ("192.0.2.1", 0))
"""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MIB}m,mode=0700", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


PCAPNG_ONLY = ("--kernel-events", "off", "--no-keys")


def capture_until_it_fails(pair: NetnsPair, out: Path, preexec=None,
                           bundle: tuple[str, ...] = PCAPNG_ONLY) -> tuple[int, str]:
    proc = subprocess.Popen([*CLI, "start", "--netns", pair.a, "-g", "33", "-w", str(out), "--quiet",
                             *bundle], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec)
    try:
        line = proc.stderr.readline()
        while line and not line.startswith("ready"):  # the kernel event sources' line first
            line = proc.stderr.readline()
        assert line.startswith("ready"), line + proc.stderr.read()
        assert our_rules(pair.a)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            pair.run("b", sys.executable, "-c", FLOOD, "1500", timeout=60)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def check_failed_cleanly(pair: NetnsPair, out: Path, rc: int, err: str, why: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("ipsec-capture: error:")]
    assert rc == 2 and len(lines) == 1, err
    assert f"cannot write {out}: {why}" in lines[0] and "rules removed" in lines[0], lines[0]
    assert our_rules(pair.a) == []
    warnings: list[str] = []
    got = list(read_records(str(out), warnings.append))
    assert warnings == [], warnings  # no block cut short: the file ends on a block boundary
    assert f"({len(got)} packets)" in lines[0] and len(got) > 100


@pytest.mark.parametrize("bundle", [PCAPNG_ONLY, ("--kernel-events", "tracepoint")],
                         ids=["pcapng-only", "whole-bundle-on-the-full-disk"])
def test_disk_full_mid_capture(netns_pair: NetnsPair, small_disk: Path, bundle: tuple[str, ...]) -> None:
    out = small_disk / "full.pcapng"
    rc, err = capture_until_it_fails(netns_pair, out, bundle=bundle)
    check_failed_cleanly(netns_pair, out, rc, err, "No space left on device")
    assert out.stat().st_size <= TMPFS_MIB << 20


def test_file_size_limit_mid_capture(netns_pair: NetnsPair, tmp_path: Path) -> None:
    """RLIMIT_FSIZE (ulimit -f): the write fails with EFBIG instead of SIGXFSZ killing the reader."""
    out = tmp_path / "limited.pcapng"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    rc, err = capture_until_it_fails(netns_pair, out, limit)
    check_failed_cleanly(netns_pair, out, rc, err, "File too large")
    assert out.stat().st_size <= 1 << 20
