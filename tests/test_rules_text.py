"""The rule text: points, tags, every backend's script accepted by the real tools (check mode)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from ipsec_capture.errors import UserError
from ipsec_capture.rules import iptables, nft
from ipsec_capture.rules.manager import build
from ipsec_capture.rules.owner import Tag, parse_tag, pid_alive
from ipsec_capture.rules.points import POINTS, parse_points
from tests.conftest import IS_ROOT, require_tool, requires_root
from tests.netlab import sh, single_netns

BACKENDS = ("nft", "iptables-legacy", "iptables-nft")
# Every single point, all of them, and mixes across tables.
SUBSETS = [(p,) for p in POINTS] + [tuple(POINTS), ("raw-pre-esp", "filter-out"),
                                    ("raw-out-ike", "mangle-pre-in", "filter-fwd")]


def test_points_order_and_names():
    assert list(POINTS)[:4] == ["raw-pre-esp", "raw-pre-ike", "raw-out-esp", "raw-out-ike"]
    assert len(POINTS) == 9
    for p in POINTS.values():
        assert p.table in ("raw", "mangle", "filter")
        assert p.description.startswith(f"{p.table} {p.chain}:")


def test_parse_points_orders_and_validates():
    assert parse_points(None) == tuple(POINTS)
    assert parse_points("all") == tuple(POINTS)
    assert parse_points("filter-in, raw-pre-esp") == ("raw-pre-esp", "filter-in")
    with pytest.raises(UserError, match=r"unknown capture point raw-pre-xx: choose from raw-pre-esp, "):
        parse_points("raw-pre-xx,filter-in")


def test_tag_round_trip():
    tag = Tag(7, 1234, 1700000000)
    assert parse_tag(tag.text()) == tag
    assert parse_tag(tag.for_point("filter-out").text()) == Tag(7, 1234, 1700000000, "filter-out")
    assert parse_tag("some other comment") is None


def test_pid_alive_checks_start_time():
    now = int(time.time())
    assert pid_alive(os.getpid(), now)
    # A tag written before this process started cannot be ours: pid reuse.
    assert not pid_alive(os.getpid(), now - 10**6)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid, now)


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_names_every_point_with_group_and_counter(backend):
    rs = build(9, None, backend)
    text = rs.text()
    for name in POINTS:
        assert f"p={name}" in text
        nft_log, xt_log = f'log prefix "{name}" group 9', f"--nflog-group 9 --nflog-prefix {name}"
        wanted = nft_log if backend == "nft" else xt_log
        assert wanted in text
    if backend == "nft":
        assert text.count("counter log") == len(re.findall(r"comment \"ipsec-capture g=9 .* p=", text))
        assert "create table inet ipsec_capture_g9" in text
    else:
        assert f"{backend}-restore --noflush" in text and f"ip6{backend[2:]}-restore --noflush" in text


def test_subset_only_builds_its_chains():
    rs = build(3, ["raw-pre-esp"], "nft")
    assert "raw_prerouting" in rs.text() and "output" not in rs.text()
    v4 = build(3, ["filter-fwd"], "iptables-legacy").scripts()[0][1]
    assert v4.startswith("*filter\n:IPSECCAP_G3_FORWARD - [0:0]\n") and "*raw" not in v4


def test_build_rejects_bad_input():
    with pytest.raises(UserError, match="out of range"):
        build(70000)
    with pytest.raises(UserError, match="unknown backend"):
        build(1, None, "pf")
    with pytest.raises(UserError, match="no capture points"):
        build(1, [], "nft")


def test_iptables_removal_targets_only_our_group():
    save = """*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:IPSECCAP_G5_PREROUTING - [0:0]
:IPSECCAP_G6_PREROUTING - [0:0]
:SOMEONE_ELSE - [0:0]
[3:150] -A PREROUTING -m comment --comment "ipsec-capture g=6 pid=2 t=3" -j IPSECCAP_G6_PREROUTING
[3:150] -A PREROUTING -m comment --comment "ipsec-capture g=5 pid=1 t=2" -j IPSECCAP_G5_PREROUTING
[9:450] -A PREROUTING -j SOMEONE_ELSE
[2:100] -A IPSECCAP_G5_PREROUTING -p esp -m comment --comment "ipsec-capture g=5 pid=1 t=2 p=raw-pre-esp" -j X
[1:50] -A IPSECCAP_G5_PREROUTING -p ah -m comment --comment "ipsec-capture g=5 pid=1 t=2 p=raw-pre-esp" -j X
COMMIT
"""
    found = iptables.parse_save(save)
    assert found.groups() == {5, 6}
    assert found.packets == {(5, "raw-pre-esp"): 3}
    script = iptables.removal(found, {5})
    assert script == ("*raw\n"
                      '-D PREROUTING -m comment --comment "ipsec-capture g=5 pid=1 t=2" '
                      "-j IPSECCAP_G5_PREROUTING\n"
                      "-F IPSECCAP_G5_PREROUTING\n-X IPSECCAP_G5_PREROUTING\nCOMMIT\n")
    assert iptables.removal(found, {7}) == ""


@pytest.fixture(scope="module")
def check_ns() -> Iterator[str]:
    if not IS_ROOT:
        pytest.skip("needs root to create a network namespace for check mode")
    with single_netns("chk") as name:
        yield name


@requires_root
@pytest.mark.parametrize("points", SUBSETS, ids=lambda s: "+".join(s) if len(s) < 9 else "all")
def test_nft_accepts_text(check_ns, points):
    require_tool("nft")
    nft.check(build(11, points, "nft").text(), check_ns)


@requires_root
@pytest.mark.parametrize("flavour", iptables.FLAVOURS)
@pytest.mark.parametrize("points", SUBSETS, ids=lambda s: "+".join(s) if len(s) < 9 else "all")
def test_iptables_restore_test_accepts_text(check_ns, flavour, points):
    rs = build(11, points, f"iptables-{flavour}")
    for argv, text in rs.scripts():
        require_tool(argv[0])
        sh(argv[0], "--test", "--noflush", netns=check_ns, input=text.encode())
    # The combined `show` text (with its command comments) is also valid input, per family part.
    parts = rs.text().split("# ip6")
    sh(rs.scripts()[0][0][0], "--test", "--noflush", netns=check_ns, input=parts[0].encode())


@requires_root
def test_check_mode_changed_nothing(check_ns):
    state = subprocess.run(["ip", "netns", "exec", check_ns, "nft", "list", "ruleset"],
                           capture_output=True, text=True, check=True).stdout
    assert "ipsec_capture" not in state and "IPSECCAP" not in state
