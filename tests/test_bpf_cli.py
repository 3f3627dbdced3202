"""`ipsec-capture events` as a user runs it: ready line, SIGTERM stop, a readable log, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from ipsec_capture.bpf.eventlog import read_events
from tests.conftest import requires_root

CMD = [sys.executable, "-m", "ipsec_capture"]


def test_help_explains():
    out = subprocess.run([*CMD, "events", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "--kernel-events" in out.stdout and "ready" in out.stdout


@requires_root
def test_bad_arguments_are_one_line_errors(tmp_path):
    for extra in (["--duration", "0"], ["--netns", "ict-none-such"], ["--kernel-events", "kprobe"]):
        if extra[-1] == "kprobe" and os.path.isdir("/sys/bus/event_source/devices/kprobe"):
            continue  # this kernel has kprobes: not an error here
        p = subprocess.run([*CMD, "events", "-w", str(tmp_path / "e.jsonl"), *extra],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0, extra
        assert "error:" in p.stderr.splitlines()[-1], p.stderr
        assert "Traceback" not in p.stderr


@requires_root
def test_events_until_sigterm_writes_block_drops(netns_pair, tmp_path):
    p = netns_pair
    p.run("b", "ip", "xfrm", "policy", "add", "src", p.a4, "dst", p.b4, "dir", "in", "action", "block")
    out = tmp_path / "out.events.jsonl"
    proc = subprocess.Popen([*CMD, "events", "-w", str(out), "--netns", p.b, "--kernel-events", "tracepoint",
                             "--interval", "0.1"], stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("ready"):
                break
        assert lines and lines[-1].startswith("ready"), lines
        assert any("tracepoint on" in x for x in lines)
        p.run("a", "ping", "-c", "2", "-i", "0.2", "-W", "1", p.b4, check=False)
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    header, events = read_events(out)
    got = list(events)
    assert header["netns"]["name"] == p.b and header["netns"]["inode"] == os.stat(f"/run/netns/{p.b}").st_ino
    assert any(e.source == "kfree_skb" and e.reason == "XFRM_POLICY" for e in got), got
    assert any(e.source == "xfrm_stat" and e.reason == "XfrmInPolBlock" for e in got), got
    assert "events" in rest
