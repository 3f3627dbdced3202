"""install -> list -> refuse a second -> remove -> nothing of ours left, for every backend; the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from ipsec_capture.errors import UserError
from ipsec_capture.rules import manager
from ipsec_capture.rules.manager import RuleSet, build, install, list_installed, remove
from ipsec_capture.rules.points import POINTS
from tests.conftest import IS_ROOT, require_tool
from tests.netlab import netfilter_state, sh, single_netns

BACKENDS = ("nft", "iptables-legacy", "iptables-nft")
TOOLS = {"nft": ("nft",), "iptables-legacy": ("iptables-legacy-restore", "ip6tables-legacy-restore"),
         "iptables-nft": ("iptables-nft-restore", "ip6tables-nft-restore")}


def ours(state: str) -> list[str]:
    return [line for line in state.splitlines()
            if "ipsec_capture" in line or "ipsec-capture" in line or "IPSECCAP" in line]


@pytest.fixture
def ns() -> Iterator[str]:
    if not IS_ROOT:
        pytest.skip("needs root to create a network namespace and install rules")
    with single_netns("rul") as name:
        yield name


def saves(netns: str, backend: str) -> tuple[str, str]:
    """(IPv4, IPv6) view of our rules as the backend's own tools print them."""
    if backend == "nft":
        text = sh("nft", "list", "ruleset", netns=netns).stdout.decode()
        return text, text
    flavour = backend.removeprefix("iptables-")
    return tuple(sh(f"{fam}-{flavour}-save", netns=netns).stdout.decode()  # type: ignore[return-value]
                 for fam in ("iptables", "ip6tables"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_install_list_refuse_remove(ns, backend):
    for tool in TOOLS[backend]:
        require_tool(tool)
    rs = build(5, None, backend, ns)
    install(rs)
    try:
        v4, v6 = saves(ns, backend)
        for name in POINTS:  # every point's NFLOG rule is in, in both families
            assert name in v4 and name in v6
        [found] = list_installed(ns)
        assert (found.group, found.backend, found.points) == (5, backend, tuple(POINTS))
        assert (found.pid, found.alive, found.started) == (os.getpid(), True, rs.started)

        with pytest.raises(UserError) as err:
            install(build(5, ["raw-pre-esp"], backend, ns))
        msg = str(err.value)
        assert f"NFLOG group 5 in netns {ns} already has ipsec-capture rules" in msg
        assert f"owner pid {os.getpid()} (running)" in msg
        assert f"ipsec-capture rules cleanup --netns {ns}" in msg

        other = build(6, ["raw-pre-esp", "filter-in"], backend, ns)
        install(other)
        assert [(s.group, s.points) for s in list_installed(ns)] == [
            (5, tuple(POINTS)), (6, ("raw-pre-esp", "filter-in"))]
        remove(other)
        assert [s.group for s in list_installed(ns)] == [5]
    finally:
        remove(rs)
    assert ours(netfilter_state(ns)) == []
    assert list_installed(ns) == []
    remove(rs)  # idempotent


def test_group_busy_across_backends(ns):
    require_tool("nft")
    require_tool("iptables-legacy-restore")
    rs = build(8, ["raw-pre-ike"], "nft", ns)
    install(rs)
    try:
        with pytest.raises(UserError, match=r"already has ipsec-capture rules \(nft, owner pid"):
            install(build(8, ["raw-pre-ike"], "iptables-legacy", ns))
    finally:
        remove(rs)
    assert ours(netfilter_state(ns)) == []


def test_dead_owner_is_reported_and_cleaned(ns):
    """A set whose owner exited counts as a leftover: refused with the cleanup remedy, then cleaned."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    rs = RuleSet(4, ("raw-pre-esp",), "iptables-nft", ns, pid=child.pid)
    install(rs)
    live = build(9, ["raw-out-esp"], "nft", ns)
    install(live)
    try:
        with pytest.raises(UserError, match=rf"owner pid {child.pid} \(gone\)\): remove the leftovers with "
                                            rf"`ipsec-capture rules cleanup --netns {ns}`"):
            install(build(4, None, "nft", ns))
        removed = manager.cleanup(ns)
        assert [(s.group, s.backend, s.alive) for s in removed] == [(4, "iptables-nft", False)]
        assert [s.group for s in list_installed(ns)] == [9]  # a running owner's rules stay
        assert [s.group for s in manager.cleanup(ns, include_alive=True)] == [9]
    finally:
        remove(live)
        remove(rs)
    assert ours(netfilter_state(ns)) == []


class BrokenV6(RuleSet):
    """A real rule set whose IPv6 input the kernel tool rejects: the v4 half must be rolled back."""

    __slots__ = ()

    def scripts(self) -> list[tuple[list[str], str]]:
        v4, v6 = super().scripts()
        return [v4, (v6[0], v6[1].replace("-j NFLOG", "-j NO_SUCH_TARGET", 1))]


@pytest.mark.parametrize("backend", ["iptables-legacy", "iptables-nft"])
def test_iptables_v6_failure_rolls_back_v4(ns, backend):
    rs = BrokenV6(12, tuple(POINTS), backend, ns)
    with pytest.raises(UserError, match=r"ip6tables-\w+-restore --noflush in netns .* failed"):
        install(rs)
    assert ours(netfilter_state(ns)) == []


def cli(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "ipsec_capture", "rules", *args]
    if user:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cli_round_trip(ns):
    r = cli("install", "--group", "21", "--points", "raw-pre-esp,filter-out", "--backend", "nft",
            "--netns", ns)
    assert r.returncode == 0, r.stderr
    assert "installed NFLOG group 21 (nft): raw-pre-esp, filter-out" in r.stdout
    r = cli("list", "--netns", ns)
    assert r.returncode == 0 and "group 21" in r.stdout and "raw-pre-esp,filter-out" in r.stdout
    assert "(gone)" in r.stdout  # `rules install` exits: its rules have no running owner
    r = cli("install", "--group", "21", "--backend", "iptables", "--netns", ns)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "already has ipsec-capture rules" in r.stderr
    r = cli("remove", "--group", "21", "--netns", ns)
    assert r.returncode == 0 and "removed group 21" in r.stdout
    assert ours(netfilter_state(ns)) == []
    assert "no ipsec-capture rules installed" in cli("list", "--netns", ns).stdout
    assert "nothing to clean up" in cli("cleanup", "--netns", ns).stdout


def test_cli_errors_are_one_line():
    for args, needle in [(("show", "--points", "nope"), "unknown capture point nope"),
                         (("show", "--group", "99999"), "out of range"),
                         (("list", "--netns", "ict-does-not-exist"), "does not exist")]:
        r = cli(*args)
        assert r.returncode != 0 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.skipif(not IS_ROOT, reason="needs root to switch to an unprivileged user")
def test_cli_show_needs_no_root_and_list_says_why():
    r = cli("show", "--group", "3", "--backend", "iptables-legacy", user="65534")
    if r.returncode != 0 and "Permission denied" in r.stderr:
        pytest.skip(f"the checkout is not readable by nobody: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    assert "--nflog-group 3 --nflog-prefix raw-pre-esp" in r.stdout
    r = cli("list", user="65534")
    assert r.returncode == 77 and "needs root" in r.stderr and "sudo" in r.stderr
