"""`ipsec-capture lab` on a kernel with ESP (the session's lab VM): scenarios, traffic, faults, down.

Everything is observed independently of the tool's own report: the kernel's SA packet counters
(`ip -s xfrm state`) and /proc/net/xfrm_stat read in the namespaces.
"""

from __future__ import annotations

import json

import pytest

from ipsec_capture.lab.faults import FAULTS
from ipsec_capture.lab.scenarios import SCENARIOS, parse_sa_packets
from ipsec_capture.lab.vm import LabVM

pytestmark = pytest.mark.lab


def xfrm_stat(vm: LabVM, netns: str) -> dict[str, int]:
    r = vm.run(f"ip netns exec {netns} cat /proc/net/xfrm_stat", timeout=60, check=True)
    return {k: int(v) for k, v in (line.split() for line in r.stdout.splitlines() if line.strip())}


def sa_packets(vm: LabVM, netns: str) -> dict[int, int]:
    return parse_sa_packets(vm.run(f"ip -s -n {netns} xfrm state", timeout=60, check=True).stdout)


def assert_nothing_left(vm: LabVM, prefix: str) -> None:
    r = vm.run("ip netns list; ls /run/ipsec-capture-lab; pgrep -f 'lab.udp_encap' || true", timeout=60)
    assert prefix + "-" not in r.stdout, r.stdout
    assert f"{prefix}.json" not in r.stdout, r.stdout
    assert "udp_encap" not in vm.run("ps -eo args", timeout=60).stdout


@pytest.fixture
def lab(lab_vm: LabVM, request: pytest.FixtureRequest):
    """A scenario brought up with a prefix of its own, torn down whatever the test did."""
    prefix = f"t{abs(hash(request.node.name)) % 10**6}"

    def up(scenario: str) -> dict:
        lab_vm.run(f"ipsec-capture lab up --scenario {scenario} --prefix {prefix}", timeout=120, check=True)
        r = lab_vm.run(f"ipsec-capture lab status --json --prefix {prefix}", timeout=60, check=True)
        return json.loads(r.stdout)

    yield prefix, up
    lab_vm.run(f"ipsec-capture lab down --prefix {prefix}", timeout=120)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario_passes_traffic_both_ways_through_esp(lab_vm: LabVM, lab, scenario: str) -> None:
    prefix, up = lab
    state = up(scenario)
    spis = {state["l2r"]["spi"], state["r2l"]["spi"]}
    before = {ns: sa_packets(lab_vm, ns) for ns in (state["left"], state["right"])}
    assert set(before[state["left"]]) == spis  # both SAs installed on both hosts
    assert set(before[state["right"]]) == spis
    r = lab_vm.run(f"ipsec-capture lab traffic --count 4 --prefix {prefix}", timeout=180)
    assert r.rc == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    for proto in ("icmp", "udp"):
        for way in ("left -> right", "right -> left"):
            assert f"{proto} {way}: sent 4, received 4" in lines
    for ns in (state["left"], state["right"]):
        after = sa_packets(lab_vm, ns)
        for spi in spis:  # 4 pings + 4 UDP echoes each way: 16 packets per direction at least
            assert after[spi] - before[ns][spi] >= 16, (ns, hex(spi), before[ns], after)
    down = lab_vm.run(f"ipsec-capture lab down --prefix {prefix}", timeout=120, check=True)
    assert f"netns {prefix}-left" in down.stdout
    assert_nothing_left(lab_vm, prefix)


FAULT_SCENARIOS = {"delete-sa": "gcm", "wrong-key": "natt", "replay": "esn", "block-policy": "ipv6",
                   "mtu": "cbc-tunnel"}


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_moves_its_xfrm_stat_counter(lab_vm: LabVM, lab, name: str) -> None:
    prefix, up = lab
    fault = FAULTS[name]
    state = up(FAULT_SCENARIOS[name])
    netns = state[fault.side]
    lab_vm.run(f"ipsec-capture lab traffic --count 1 --proto udp --prefix {prefix}", timeout=60, check=True)
    before = xfrm_stat(lab_vm, netns)
    r = lab_vm.run(f"ipsec-capture lab fault {name} --json --prefix {prefix}", timeout=120)
    after = xfrm_stat(lab_vm, netns)
    assert r.rc == 0, r.stdout + r.stderr
    assert after[fault.counter] > before[fault.counter], (fault.counter, r.stdout)
    report = json.loads(r.stdout)
    assert report["counter"] == fault.counter and report["netns"] == netns
    assert report["after"] - report["before"] == after[fault.counter] - before[fault.counter]


def test_lab_up_refuses_bad_input_in_one_line(lab_vm: LabVM) -> None:
    r = lab_vm.run("ipsec-capture lab traffic --prefix nosuchlab", timeout=60)
    assert r.rc != 0 and r.stderr.strip().count("\n") == 0
    assert "no lab is up" in r.stderr and "Traceback" not in r.stderr
    r = lab_vm.run("ipsec-capture lab fault mtu --prefix nosuchlab", timeout=60)
    assert r.rc != 0 and "no lab is up" in r.stderr
