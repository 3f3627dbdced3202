"""`rules cleanup` removes everything a killed capture leaves, not only its rules: kill -9 a few
`start --kernel-events tracefs` captures on a machine with no tracefs mounted (so each one
mounts its own under /tmp and makes its instance `ipsec_capture_<pid>`), then count what is left
before and after the cleanup. Runs in a private mount namespace (unshare -m) so that other
people's tracefs mounts are out of sight and nothing of ours reaches the host's mount table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ipsec_capture.bpf.kfree_skb import MOUNT_PREFIX, stale_bcc_kprobes
from tests.conftest import IS_ROOT
from tests.netlab import single_netns

ROOT = Path(__file__).parent.parent
CYCLES = 6

# Inside `unshare -m`: argv = netns, a work dir. Prints {"pids", "before", "after", "cleanup"}.
DRIVER = r"""
import json, os, signal, subprocess, sys, tempfile
ns, work = sys.argv[1], sys.argv[2]
CLI = [sys.executable, "-m", "ipsec_capture"]
MOUNT_PREFIX = sys.argv[3]

def tracefs_mounts():
    with open("/proc/self/mounts") as f:
        return [p[1] for p in (line.split() for line in f) if len(p) >= 3 and p[2] == "tracefs"]

for path in tracefs_mounts():  # only in this mount namespace: other people's mounts stay theirs
    subprocess.run(["umount", "-l", path], check=True)
assert not tracefs_mounts()

def leftovers(pids):
    look = tempfile.mkdtemp(prefix="ict-tracefs-look-")
    subprocess.run(["mount", "-t", "tracefs", "nodev", look], check=True)
    try:
        names = set(os.listdir(os.path.join(look, "instances")))
    finally:
        subprocess.run(["umount", look], check=True)
        os.rmdir(look)
    tmp = tempfile.gettempdir()
    dirs = [n for n in os.listdir(tmp) if any(n.startswith(f"{MOUNT_PREFIX}{p}_") for p in pids)]
    return {"instances": sorted(n for n in names if n in {f"ipsec_capture_{p}" for p in pids}),
            "mount_dirs": sorted(dirs),
            "mounted": sorted(m for m in tracefs_mounts() if os.path.basename(m) in dirs)}

pids = []
for i in range(int(sys.argv[4])):
    # the first half each in a mount namespace of its own, as `ip netns exec` gives: its private
    # mount dies with it, its directory stays; the rest here, where the first one's mount stays
    # mounted and the next ones use it
    own_ns = ["unshare", "-m", "--propagation", "private"] if i < int(sys.argv[4]) // 2 else []
    proc = subprocess.Popen([*own_ns, *CLI, "start", "--netns", ns, "--group", str(60 + i), "-w",
                             os.path.join(work, f"c{i}.pcapng"), "--kernel-events", "tracefs",
                             "--no-keys", "--quiet"], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    said = line = proc.stderr.readline()
    while line and not line.startswith("ready"):
        line = proc.stderr.readline()
        said += line
    if not line:
        proc.wait()
        raise SystemExit(f"start did not get ready (exit {proc.returncode}): {said}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    pids.append(proc.pid)
before = leftovers(pids)
r = subprocess.run([*CLI, "rules", "cleanup", "--netns", ns], capture_output=True, text=True)
after = leftovers(pids)
print(json.dumps({"pids": pids, "before": before, "after": after, "cleanup": r.stdout,
                  "cleanup_rc": r.returncode, "cleanup_err": r.stderr}))
"""


@pytest.mark.skipif(not IS_ROOT, reason="needs root: start, mounts and a mount namespace")
def test_kill_9_then_cleanup_leaves_no_tracefs_instance_or_mount_point(tmp_path):
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is not installed: run ./dev.sh setup")
    with single_netns("tfs") as ns:
        r = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", DRIVER, ns,
                            str(tmp_path), MOUNT_PREFIX, str(CYCLES)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout)
    try:
        before, after = d["before"], d["after"]
        # the leftovers were real: the last capture's instance (each start removes the dead ones'
        # it finds), a directory per capture that mounted its own tracefs, one of them mounted
        assert len(before["instances"]) == 1, before
        assert len(before["mount_dirs"]) == CYCLES // 2 + 1 and len(before["mounted"]) == 1, before
        assert d["cleanup_rc"] == 0, d["cleanup_err"]
        assert after == {"instances": [], "mount_dirs": [], "mounted": []}, (after, d["cleanup"])
        assert d["cleanup"].count("removed tracefs instance") == 1, d["cleanup"]
        assert d["cleanup"].count("removed tracefs mount point") == CYCLES // 2 + 1, d["cleanup"]
    finally:  # whatever failed, leave /tmp as it was (the mounts died with the namespace)
        for name in os.listdir("/tmp"):
            if any(name.startswith(f"{MOUNT_PREFIX}{pid}_") for pid in d["pids"]):
                os.rmdir(os.path.join("/tmp", name))


def test_stale_bcc_kprobe_events_are_named_by_dead_pid_only():
    """bcc's fallback kprobe_events lines: ours (xfrm functions, a pid that is gone) and not ours."""
    dead = 2 ** 22 + 12345  # above pid_max's default ceiling: never a live process
    text = (f"p:kprobes/p_xfrm_input_bcc_{dead} xfrm_input\n"
            f"r:kprobes/r_xfrm_output_bcc_{dead} xfrm_output\n"
            f"p:kprobes/p_xfrm_input_bcc_{os.getpid()} xfrm_input\n"  # alive: kept
            f"p:kprobes/p_tcp_v4_rcv_bcc_{dead} tcp_v4_rcv\n"  # not an xfrm function: not ours
            "p:kprobes/myprobe xfrm_input\n")
    assert stale_bcc_kprobes(text) == [f"kprobes/p_xfrm_input_bcc_{dead}",
                                       f"kprobes/r_xfrm_output_bcc_{dead}"]
