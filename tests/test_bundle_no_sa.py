"""Every bundle `start` writes opens in `report` and `decrypt`: a real capture in a namespace where
no SA ever existed (its esp_sa holds only the header comments), and the decrypted file keeps the
capture's own device names in each packet's comment."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipsec_capture.capture.pcapread import read_records
from ipsec_capture.cli import main
from tests.conftest import IS_ROOT
from tests.netlab import NetnsPair

ROOT = Path(__file__).parent.parent
SEND_ESP = r"""
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
for seq in range(1, 4):
    s.sendto(struct.pack("!II", int(sys.argv[2], 16), seq) + b"\xa5" * 48, (sys.argv[1], 0))
"""

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="start needs root and network namespaces")


def capture_without_sas(pair: NetnsPair, stem: Path) -> Path:
    cap = stem.with_suffix(".pcapng")
    proc = subprocess.Popen([sys.executable, "-m", "ipsec_capture", "start", "--netns", pair.a,
                             "--group", "23", "-w", str(cap), "--json", "--quiet"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stderr.readline()
        while line and not line.startswith("ready"):
            line = proc.stderr.readline()
        assert line.startswith("ready"), proc.stderr.read()
        pair.run("b", sys.executable, "-c", SEND_ESP, pair.a4, "b1a4")
        pair.run("a", sys.executable, "-c", SEND_ESP, pair.b4, "a1b4")
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert json.loads(out)["points"] == {"raw-pre-esp": 3, "raw-out-esp": 3}
    return cap


def words(comment: str | None) -> list[str]:
    """The capture point, devices and mark of a comment: its last '; '-separated part."""
    return (comment or "").split("; ")[-1].split()


def test_bundle_without_sas_opens_in_report_and_decrypt(netns_pair: NetnsPair, tmp_path: Path, capsys):
    cap = capture_without_sas(netns_pair, tmp_path / "nosa")
    keys = cap.with_suffix(".esp_sa")
    lines = keys.read_text().splitlines()
    assert lines and all(not ln.strip() or ln.startswith("#") for ln in lines)

    assert main(["report", str(cap), "--format", "json"]) == 0
    (rep,) = json.loads(capsys.readouterr().out)["reports"]
    assert rep["totals"]["esp"] == 6 and rep["totals"]["packets"] == 6
    assert any("holds no SAs (no keys were known" in note for note in rep["capture"]["missing"])
    assert rep["capture"]["keys"] == str(keys)

    for jobs in ("1", "2"):  # one process, and the workers of decrypt -j
        out = tmp_path / f"clear-{jobs}.pcapng"
        assert main(["decrypt", str(cap), "-w", str(out), "--json", "-j", jobs]) == 0
        summary_out, err = capsys.readouterr()
        assert "holds no SAs (no keys were known)" in err
        counts = [sa["counts"] for sa in json.loads(summary_out)["sas"]]
        assert sorted(counts, key=str) == [{"no-sa": 3}, {"no-sa": 3}]

        # the decrypted file: same packets, and each comment's point, devices and mark as captured
        before, after = list(read_records(str(cap))), list(read_records(str(out)))
        assert len(before) == len(after) == 6
        devices = set()
        for a, b in zip(before, after, strict=True):
            assert words(b.comment) == words(a.comment), (a.comment, b.comment)
            devices |= {w for w in words(a.comment) if w.startswith(("in=", "out="))}
        assert devices == {"in=veth0", "out=veth0"}  # the namespace's names, not this host's
