"""start's closing line counts SAs as `ip xfrm monitor` shows them: an SA once, when it becomes
usable (added with keys, or a reserved SPI given its keys by an update, as pluto and charon
install inbound SAs), and the reserved SPIs (GETSPI) that never got keys, which the monitor never
announces and the esp_sa table must not hold. The host's kernel has no ESP, so keys are given in
the lab VM; the reservations are real on both."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import IS_ROOT
from tests.support.sa_counts import RUNNER, check


@pytest.mark.skipif(not IS_ROOT, reason="start needs root and a network namespace")
def test_reserved_spis_never_keyed_on_the_host(tmp_path):
    r = subprocess.run([sys.executable, str(RUNNER), str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["monitor"]["notifications"] == 0  # a reservation is announced to nobody
    check(d, usable=0, never_keyed=5)
    rows = [ln for ln in (tmp_path / "sac.esp_sa").read_text().splitlines() if not ln.startswith("#")]
    assert rows == []
