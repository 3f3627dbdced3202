"""The lab's IKE daemons on this host: each loads the configuration the lab writes for it.

This kernel has no ESP, so no SA can be installed here (tests/lab/test_lab_daemons.py negotiates
and captures in the lab VM); what runs here is the real daemon, in a namespace of our own, with
its own config and runtime directories: charon loading every connection over vici, pluto taking
every conn through addconn, and `lab up` refusing bad combinations in one line.
"""

from __future__ import annotations

import secrets
import subprocess
import sys

import pytest

from ipsec_capture.lab import daemons
from ipsec_capture.lab.libreswan import Libreswan, lib_env, root
from ipsec_capture.lab.strongswan import StrongSwan
from tests.conftest import requires_root
from tests.netlab import single_netns

pytestmark = requires_root
CHILDREN = daemons.children_of("ike")


@pytest.fixture
def prefix():
    name = f"t{secrets.token_hex(4)}"
    try:
        yield name
    finally:
        daemons.remove_dirs(name)


def test_charon_loads_every_connection_and_child(prefix: str) -> None:
    ss = StrongSwan()
    ss.prepare(prefix, CHILDREN)
    with single_netns("ss") as ns:
        pid = ss.start(prefix, "left", ns)
        try:
            conns = ss._swanctl(prefix, "left", "--list-conns")
        finally:
            daemons.stop_process(pid)
    for ike in ("main", "v6", "natt"):
        assert f"{ike}: IKEv2" in conns, conns
    for c in CHILDREN:
        assert f"{c.name}: {c.mode.upper()}" in conns, (c.name, conns)
    assert not daemons.alive(pid)


def test_pluto_takes_every_conn_from_its_private_root(prefix: str) -> None:
    sw = Libreswan()
    sw.prepare(prefix, CHILDREN)
    d = daemons.side_dir(prefix, "left")
    check = subprocess.run([f"{root()}/usr/libexec/ipsec/addconn", "--config", str(d / "ipsec.conf"),
                            "--checkconfig"], capture_output=True, text=True, env=lib_env())
    assert check.returncode == 0, check.stderr
    with single_netns("lsw") as ns:
        pid = sw.start(prefix, "left", ns)
        try:
            status = sw._whack(prefix, "left", "--status")
        finally:
            daemons.stop_process(pid)
    for c in CHILDREN:
        assert f'"{c.name}":' in status, (c.name, status[-2000:])
    assert not daemons.alive(pid)


@pytest.mark.parametrize(("args", "says"), [
    (["--no-connect"], "--no-connect goes with --daemon"),
    (["--daemon", "strongswan", "--scenario", "cilium"], "leave out --daemon"),
    (["--daemon", "libreswan", "--scenario", "esn"], "has no IKE daemon version"),
])
def test_lab_up_refuses_bad_combinations_in_one_line(args: list[str], says: str) -> None:
    r = subprocess.run([sys.executable, "-m", "ipsec_capture", "lab", "up", "--prefix", "nosuch", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and says in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
