"""start's SA counts against `ip xfrm monitor` with keyed ESP states (the lab kernel has ESP):
reserved SPIs given their keys by an update are counted once, when usable, like SAs added outright."""

from __future__ import annotations

import json
import sys

import pytest

from ipsec_capture.lab.vm import LabVM
from tests.support.sa_counts import RUNNER, check

pytestmark = pytest.mark.lab


@pytest.mark.lab
def test_sas_counted_once_when_usable_as_the_monitor_shows(lab_vm: LabVM) -> None:
    out = lab_vm.rw[0]
    r = lab_vm.run([sys.executable, str(RUNNER), out, "--keyed"], timeout=300)
    assert r.rc == 0, r.stderr
    d = json.loads(r.stdout)
    check(d, usable=5, never_keyed=2)  # 3 reserved then keyed + 2 added; 1 reserved before, 1 after
