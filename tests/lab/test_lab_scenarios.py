"""`ipsec-capture lab` refusing bad input in the session's lab VM. Scenarios, traffic, faults and
`lab down` are proven with everything else in tests/lab/test_lab_e2e.py (one lab per scenario)."""

from __future__ import annotations

import pytest

from ipsec_capture.lab.vm import LabVM

pytestmark = pytest.mark.lab


def test_lab_up_refuses_bad_input_in_one_line(lab_vm: LabVM) -> None:
    r = lab_vm.run("ipsec-capture lab traffic --prefix nosuchlab", timeout=60)
    assert r.rc != 0 and r.stderr.strip().count("\n") == 0
    assert "no lab is up" in r.stderr and "Traceback" not in r.stderr
    r = lab_vm.run("ipsec-capture lab fault mtu --prefix nosuchlab", timeout=60)
    assert r.rc != 0 and "no lab is up" in r.stderr
