"""Least privilege in `start`, seen from outside as the kernel reports it: the process that reads
and writes packets is not uid 0 and holds no capability (CapEff in /proc/PID/status, CAP_SYS_ADMIN
above all), the files are 0600 and belong to the sudo caller, and the rules are gone after SIGTERM,
after the reader is killed with SIGKILL, and with --no-drop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ipsec_capture.capture.pcapread import read_records
from ipsec_capture.capture.privdrop import CAP_SYS_ADMIN, EXIT_READER_DIED, proc_status
from tests.netlab import NetnsPair
from tests.test_start_netns import CLI, ROOT, TRAFFIC_B, our_rules, send

READY = re.compile(r"packets read by pid (\d+) as (\S+)")
INVOKER = 4321  # a uid with no passwd entry: the files' owner as sudo would name it


def start(ns: str, out: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "SUDO_UID": str(INVOKER), "SUDO_GID": str(INVOKER)}
    proc = subprocess.Popen([*CLI, "start", "--netns", ns, "-g", "31", "-w", str(out), "--quiet",
                             "--kernel-events", "tracepoint", *args], cwd=ROOT, text=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stderr.readline()
    while line and not line.startswith("ready"):
        line = proc.stderr.readline()
    if not line:
        proc.wait(30)
        pytest.fail(f"start did not get ready: {proc.stderr.read()}")
    return proc, line


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_reader_is_unprivileged_and_files_are_the_callers(netns_pair: NetnsPair, tmp_path: Path) -> None:
    out = tmp_path / "p.pcapng"
    proc, ready = start(netns_pair.a, out, "--user", "nobody")
    try:
        m = READY.search(ready)
        assert m and m.group(2) == "nobody", ready
        reader = int(m.group(1))
        st = proc_status(reader)
        assert int(st["PPid"]) == proc.pid  # the reader is the start process's child
        assert all(int(u) != 0 for u in st["Uid"].split()) and all(int(g) != 0 for g in st["Gid"].split())
        cap_eff = int(st["CapEff"], 16)
        assert not cap_eff & (1 << CAP_SYS_ADMIN) and cap_eff == 0 and int(st["CapPrm"], 16) == 0, st
        assert st["NoNewPrivs"] == "1"
        assert proc_status(proc.pid)["Uid"].split()[0] == "0"  # the parent keeps root for the cleanup
        assert our_rules(netns_pair.a)
        send(netns_pair, "b", TRAFFIC_B[:1])
        time.sleep(0.3)
    finally:
        rc, err = stop(proc)
    assert rc == 0, err
    assert our_rules(netns_pair.a) == []
    assert len(list(read_records(str(out)))) == 3  # the unprivileged reader wrote the packets
    for path in (out, tmp_path / "p.events.jsonl", tmp_path / "p.esp_sa"):
        info = path.stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (INVOKER, INVOKER, 0o600), path


def test_killed_reader_still_leaves_no_rules(netns_pair: NetnsPair, tmp_path: Path) -> None:
    out = tmp_path / "k.pcapng"
    proc, ready = start(netns_pair.a, out)  # default user: SUDO_UID has no name here, so nobody
    m = READY.search(ready)
    assert m and m.group(2) == "nobody", ready
    send(netns_pair, "b", TRAFFIC_B[:1])
    time.sleep(0.3)
    os.kill(int(m.group(1)), signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_READER_DIED, err
    lines = [line for line in err.splitlines() if line.startswith("ipsec-capture: error:")]
    assert len(lines) == 1 and "killed by SIGKILL" in lines[0] and "rules removed" in lines[0], err
    assert "Traceback" not in err
    assert our_rules(netns_pair.a) == []
    warnings: list[str] = []
    got = list(read_records(str(out), warnings.append))  # whole blocks only: no cut-short warning
    assert len(got) <= 3 and warnings == []


def test_no_drop_and_user_root_keep_one_root_process(netns_pair: NetnsPair, tmp_path: Path) -> None:
    for args in (["--no-drop"], ["--user", "root"]):
        proc, ready = start(netns_pair.a, tmp_path / "r.pcapng", *args)
        try:
            assert "packets read by pid" not in ready
            assert proc_status(proc.pid)["Uid"].split()[0] == "0"
        finally:
            rc, err = stop(proc)
        assert rc == 0, err
        assert our_rules(netns_pair.a) == []


def test_unknown_user_is_one_line_before_any_rule(netns_pair: NetnsPair, tmp_path: Path) -> None:
    argv = [*CLI, "start", "--netns", netns_pair.a, "-g", "31", "-w", str(tmp_path / "u.pcapng"),
            "--user", "no-such-user-here"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("ipsec-capture: error: --user no-such-user-here")
    assert our_rules(netns_pair.a) == [] and not (tmp_path / "u.pcapng").exists()
