"""`start -C/-G/-W` for real: a capture rotated every few hundred KB, running beside an unrotated
one of the same traffic, joins back (report, decrypt, read_records over the set or its glob) to
exactly the unrotated capture's packets; every part is a whole bundle part (tshark reads it, its
events log has the header and the set id, its key file is 0600); -W keeps a ring of parts. The
set logic itself (names, set ids, globs) and decrypt over a set are checked on synthetic bundles."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipsec_capture.capture.pcapread import read_records
from ipsec_capture.capture.rotate import Rotation, expand, part_path
from ipsec_capture.errors import UserError
from tests.conftest import require_tool, requires_root
from tests.netlab import NetnsPair
from tests.support.bundles import T0, write_bundle
from tests.support.synthetic import Host, esp4, gcm_sa, udp4

CLI = [sys.executable, "-m", "ipsec_capture"]
ROOT = Path(__file__).parent.parent

BURST = r"""
import socket, struct, sys
dst, spi, n = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
for seq in range(1, n + 1):
    s.sendto(struct.pack("!II", spi, seq) + seq.to_bytes(4, "big") * 200, (dst, 0))
"""


def start(netns: str, out: Path, group: int, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([*CLI, "start", "--netns", netns, "-g", str(group), "-w", str(out),
                             "--points", "raw-pre-esp", "--json", "-q", *extra], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stderr.readline()
    while line and not line.startswith("ready"):
        line = proc.stderr.readline()
    assert line, proc.stderr.read()
    return proc


def stop(proc: subprocess.Popen[str]) -> dict:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out)


def packets(parts: list[str]) -> list[tuple[str, bytes]]:
    return [(r.point, bytes(r.payload)) for p in parts for r in read_records(p)]


@requires_root
def test_rotated_capture_joins_back_to_the_unrotated_one(netns_pair: NetnsPair, tmp_path: Path):
    tshark = require_tool("tshark")
    p = netns_pair
    whole, rotated, ring = tmp_path / "whole.pcapng", tmp_path / "rot.pcapng", tmp_path / "ring.pcapng"
    a = start(p.b, whole, 21)
    b = start(p.b, rotated, 22, "-C", "0.3")
    c = start(p.b, ring, 23, "-C", "0.3", "-W", "2")
    try:
        p.run("a", sys.executable, "-c", BURST, p.b4, "0xabc", "3000", timeout=120)
    finally:
        s_whole, s_rot, s_ring = stop(a), stop(b), stop(c)
    assert s_whole["complete"] and s_rot["complete"], (s_whole, s_rot)
    parts = s_rot["parts"]
    assert len(parts) >= 5, parts
    assert parts == [part_path(rotated, i) for i in range(len(parts))]
    assert not rotated.exists()
    want = packets([str(whole)])
    assert len(want) == 3000
    assert packets(parts) == want  # every packet once, in order, across the parts
    set_ids = set()
    for i, part in enumerate(parts):
        assert os.path.getsize(part) <= 300_000 + 2000  # a part ends at the first packet past -C
        rows = subprocess.run([tshark, "-r", part, "-T", "fields", "-e", "esp.sequence"],
                              capture_output=True, text=True, check=True, timeout=60).stdout.split()
        assert rows and all(r.isdigit() for r in rows)  # each part alone is a whole pcapng
        stem = part[: -len(".pcapng")]
        head = json.loads(Path(f"{stem}.events.jsonl").read_text().splitlines()[0])
        assert head["rotation"]["part"] == i and head["kernel"]
        set_ids.add(head["rotation"]["set"])
        assert os.stat(f"{stem}.esp_sa").st_mode & 0o777 == 0o600
    assert len(set_ids) == 1
    assert len(list(tmp_path.glob("ring-*.esp_sa"))) == 2
    # This host has no ESP SAs, so every key file is an empty table, which `report` refuses
    # (xfrm/keyfile.py: "neither a Wireshark esp_sa table nor ..."): take them away for the report.
    for empty in tmp_path.glob("*.esp_sa"):
        assert all(line.startswith("#") for line in empty.read_text().splitlines())
        empty.unlink()

    # report: the parts as one capture, given as a list or a quoted glob
    def report(*captures: str) -> dict:
        proc = subprocess.run([*CLI, "report", "--format", "json", *captures], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    one = report(str(whole))
    by_glob = report(str(tmp_path / "rot-*.pcapng"))
    listed = report(*reversed(parts))
    assert len(by_glob["reports"]) == len(listed["reports"]) == 1 and not by_glob["peers"]
    want_totals = one["reports"][0]["totals"]
    assert want_totals["records"] == 3000
    for r in (by_glob, listed):
        assert r["reports"][0]["totals"] == want_totals
    # -W 2: only the newest two parts are left, whole bundle parts each
    left = sorted(str(x) for x in tmp_path.glob("ring-*.pcapng"))
    assert left == s_ring["parts"] and len(left) == 2
    assert packets(left) == want[-len(packets(left)):]


def test_rotation_options_are_checked():
    with pytest.raises(UserError, match="-W COUNT needs"):
        Rotation(count=3).validate()
    with pytest.raises(UserError, match="at least 64 KB"):
        Rotation(size_mb=0.01).validate()


def _part_bundle(tmp: Path, name: str, index: int, set_id: str, host: Host, sas) -> str:
    cap = write_bundle(tmp / f"{name}-{index:04d}", host, sas)
    ev = Path(str(cap)[: -len(".pcapng")] + ".events.jsonl")
    lines = ev.read_text().splitlines()
    head = json.loads(lines[0])
    head["rotation"] = {"set": set_id, "part": index}
    ev.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    return str(cap)


def test_sets_are_told_apart_by_stem_and_set_id_and_decrypt_reads_one(tmp_path: Path):
    key = bytes(range(20))
    sa = gcm_sa(0xC0FFEE01, "192.0.2.1", "192.0.2.2", key)
    hosts = []
    for half in range(2):
        h = Host()
        for seq in range(1 + 5 * half, 6 + 5 * half):
            inner = udp4("10.1.0.1", "10.2.0.1", seq, b"hi")
            h.esp_out(T0 + seq * 1_000_000, esp4("192.0.2.1", "192.0.2.2", 0xC0FFEE01, seq, inner, key=key))
        hosts.append(h)
    p0 = _part_bundle(tmp_path, "x", 0, "one", hosts[0], [sa])
    p1 = _part_bundle(tmp_path, "x", 1, "one", hosts[1], [sa])
    other = _part_bundle(tmp_path, "x", 7, "two", hosts[0], [sa])  # same stem, another set
    assert expand([p1, p0]) == [[p0, p1]]
    assert expand([str(tmp_path / "x-*.pcapng")]) == [[p0, p1], [other]]
    plain = str(write_bundle(tmp_path / "plain", hosts[0], [sa]))
    assert expand([plain, p0]) == [[plain], [p0]]
    out = tmp_path / "clear.pcapng"
    proc = subprocess.run([*CLI, "decrypt", "--json", "-w", str(out), p0, p1], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["packets"] == 10
    assert len(list(read_records(str(out)))) == 10
    proc = subprocess.run([*CLI, "decrypt", "-w", str(out), p0, other], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "one capture" in proc.stderr


@requires_root
def test_time_rotation_moves_on_even_when_idle(netns_pair: NetnsPair, tmp_path: Path):
    out = tmp_path / "timed.pcapng"
    proc = start(netns_pair.b, out, 24, "-G", "1", "--kernel-events", "off", "--no-keys")
    time.sleep(3.6)
    summary = stop(proc)
    parts = summary["parts"]
    assert 3 <= len(parts) <= 6, parts
    for part in parts:
        assert list(read_records(part)) == []  # a whole pcapng with no packets
        assert not Path(part[: -len(".pcapng")] + ".events.jsonl").exists()
