"""`start`, kill -9, `rules cleanup`, over and over, for both rule backends: nothing is left.

Counted after the cycles: rules of ours in the namespace (must be 0), reader processes still
alive after their start process was killed (0: the reader has a parent-death signal), /tmp
entries the captures made (0), and tracefs instances named ipsec_capture_<pid> of the killed
processes (a new start removes its dead predecessors' instances, so at most the last cycle's is
left until `rules cleanup` learns to remove them). Half the kills land once `ready` is printed,
half at a random moment of the start-up. 5 cycles per backend in the normal suite; 100 with
`pytest -m long tests/test_start_cycles.py`.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipsec_capture.bpf.kfree_skb import INSTANCE_PREFIX, _mounted_tracefs
from tests.conftest import IS_ROOT, require_tool
from tests.netlab import single_netns
from tests.test_start_netns import CLI, ROOT, our_rules

READER = re.compile(r"packets read by pid (\d+)")


@pytest.fixture
def ns() -> Iterator[str]:
    if not IS_ROOT:
        pytest.skip("needs root to create a network namespace and install rules")
    with single_netns("cyc") as name:
        yield name


def _tmp_entries() -> set[str]:
    """What a capture may make in /tmp (a private tracefs mount point: ipsec_capture_tracefs_*;
    other tools' ipsec-capture-* entries, such as the lab VM's, are not the capture's)."""
    return {n for n in os.listdir("/tmp") if n.startswith("ipsec_capture_")}


def _instances(pids: set[int]) -> list[str]:
    base = os.path.join(_mounted_tracefs() or "/sys/kernel/tracing", "instances")
    names = os.listdir(base) if os.path.isdir(base) else []
    return [n for n in names if n.startswith(INSTANCE_PREFIX) and n[len(INSTANCE_PREFIX):].isdigit()
            and int(n[len(INSTANCE_PREFIX):]) in pids]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def cycles(ns: str, backend: str, count: int, tmp: Path) -> dict[str, int]:
    require_tool("nft" if backend == "nft" else "iptables-restore")
    rng = random.Random(14)
    before = _tmp_entries()
    starts: set[int] = set()
    readers: list[int] = []
    for i in range(count):
        proc = subprocess.Popen([*CLI, "start", "--netns", ns, "-g", str(200 + i % 50), "--backend", backend,
                                 "-w", str(tmp / f"c{i}.pcapng"), "--quiet", "--kernel-events", "tracepoint"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        starts.add(proc.pid)
        if i % 2 == 0:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            while line and not line.startswith("ready"):
                line = proc.stderr.readline()  # type: ignore[union-attr]
            assert line.startswith("ready"), line
            m = READER.search(line)
            assert m, line
            readers.append(int(m.group(1)))
        else:
            time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)  # the start process only: its reader must follow by itself
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]
        r = subprocess.run([*CLI, "rules", "cleanup", "--netns", ns], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in readers) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {"rules": len(our_rules(ns)), "readers alive": sum(_alive(p) for p in readers),
            "tmp entries": len(_tmp_entries() - before), "tracefs instances": len(_instances(starts))}


def check(figures: dict[str, int], count: int, backend: str) -> None:
    print(f"{count} start/kill -9/rules cleanup cycles with {backend}: leftovers {figures}")
    assert figures["rules"] == 0 and figures["readers alive"] == 0 and figures["tmp entries"] == 0, figures
    assert figures["tracefs instances"] <= 1, figures


@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_start_kill_cleanup_cycles(ns: str, tmp_path: Path, backend: str) -> None:
    check(cycles(ns, backend, 5, tmp_path), 5, backend)


@pytest.mark.long
@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_start_kill_cleanup_100_cycles(ns: str, tmp_path: Path, backend: str) -> None:
    check(cycles(ns, backend, 100, tmp_path), 100, backend)
