"""Crash safety: kill -9 leaves tagged leftovers that `rules cleanup` removes completely, and
guard.installed removes its rules on SIGTERM, SIGHUP and SIGINT."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.conftest import IS_ROOT, require_tool
from tests.netlab import netfilter_state, single_netns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = 20

INSTALLER = r"""
import sys, time
from ipsec_capture.rules.manager import build, install
install(build(int(sys.argv[1]), None, sys.argv[2], sys.argv[3]))
print("ready", flush=True)
time.sleep(60)
"""

GUARDED = r"""
import sys, time
from ipsec_capture.rules.guard import installed
from ipsec_capture.rules.manager import build
try:
    with installed(build(7, None, sys.argv[1], sys.argv[2])):
        print("ready", flush=True)
        time.sleep(60)
except KeyboardInterrupt:
    print("stopped", flush=True)
"""


def ours(netns: str) -> list[str]:
    return [line for line in netfilter_state(netns).splitlines()
            if "ipsec_capture" in line or "ipsec-capture" in line or "IPSECCAP" in line]


@pytest.fixture
def ns() -> Iterator[str]:
    if not IS_ROOT:
        pytest.skip("needs root to create a network namespace and install rules")
    with single_netns("crash") as name:
        yield name


def spawn(script: str, *args: str) -> subprocess.Popen[str]:
    # Own session, so SIGKILL can take the whole group (an in-flight nft/iptables-restore too).
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_ready(proc: subprocess.Popen[str]) -> None:
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if line.strip() != "ready":
        proc.kill()
        pytest.fail(f"child did not get ready: {line!r} {proc.stderr.read()}")  # type: ignore[union-attr]


@pytest.mark.parametrize("backend", ["nft", "iptables-legacy", "iptables-nft"])
def test_sigkill_then_cleanup_leaves_nothing(ns, backend):
    require_tool("nft" if backend == "nft" else f"{backend}-restore")
    rng = random.Random(1234)
    killed_ready = 0
    for i in range(RUNS):
        proc = spawn(INSTALLER, str(100 + i), backend, ns)
        if i % 2 == 0:  # half wait until the rules are in, half die at a random moment mid-install
            wait_ready(proc)
            killed_ready += 1
        else:
            time.sleep(rng.uniform(0.0, 0.4))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    left = ours(ns)
    assert len({line for line in left if "g=1" in line}) >= killed_ready  # the leftovers are real
    r = subprocess.run([sys.executable, "-m", "ipsec_capture", "rules", "cleanup", "--netns", ns],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("removed group") >= killed_ready
    assert ours(ns) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
@pytest.mark.parametrize("backend", ["nft", "iptables-nft"])
def test_guard_removes_rules_on_stop_signal(ns, backend, sig):
    proc = spawn(GUARDED, backend, ns)
    wait_ready(proc)
    assert ours(ns), "rules should be installed while the guard is active"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "stopped", err
    assert ours(ns) == []


def test_guard_removes_on_exception_and_restores_handlers(ns):
    from ipsec_capture.rules.guard import installed
    from ipsec_capture.rules.manager import build, list_installed

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    with pytest.raises(RuntimeError, match="boom"), installed(build(3, ["raw-pre-esp"], "nft", ns)):
        assert [s.group for s in list_installed(ns)] == [3]
        assert signal.getsignal(signal.SIGTERM) is not before[0]
        raise RuntimeError("boom")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before
    assert ours(ns) == []
