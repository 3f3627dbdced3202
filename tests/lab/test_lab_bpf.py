"""The bcc kprobe source on the lab kernel (real ESP): runs tests/lab/bpf_check.py in the session's
VM; that script is also runnable alone through shared/lab/vmrun.sh (see its docstring)."""

from __future__ import annotations

import os
import re

import pytest

from ipsec_capture.lab.vm import LabVM

pytestmark = pytest.mark.lab

CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpf_check.py")


@pytest.mark.parametrize("mechanism", ["fentry", "kprobe"])
def test_kprobe_source_reports_xfrm_input_output_and_notfound(lab_vm: LabVM, mechanism: str):
    """The same checks through fentry/fexit (what this BTF kernel gets by default) and through the
    kprobe/kretprobe fallback: both bodies of xfrm_probes.c must give the same events."""
    out_dir = os.path.join(lab_vm.rw[0], "bpf")
    r = lab_vm.run(["python3", CHECK, out_dir, mechanism], timeout=420)
    print(r.stdout)
    m = re.search(r"COMPILE compile_s=([\d.]+)", r.stdout)
    if m:
        print(f"bcc compile took {m.group(1)} s")
    failures = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert r.rc == 0 and not failures, (failures, r.stderr[-3000:])
    assert re.search(r"\b(\d+) passed, 0 failed", r.stdout)
