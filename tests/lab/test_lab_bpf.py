"""The per-packet probe sources on the lab kernel (real ESP): runs tests/lab/bpf_check.py in the
session's VM (also runnable alone, see its docstring). The shipped CO-RE object is checked on
whichever kernel the VM boots (6.1, and 6.12 in `./dev.sh test`'s second pass); bcc, the
fallback, compiles on 6.1, and on 6.12, where it cannot, must fail in one line while `auto`
carries on with CO-RE."""

from __future__ import annotations

import json
import os
import re

import pytest

from ipsec_capture.lab.vm import LabVM

pytestmark = pytest.mark.lab

CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpf_check.py")


def _is_61(vm: LabVM) -> bool:
    return vm.kernel is not None and vm.kernel.name.startswith("vmlinuz-6.1.")


@pytest.mark.parametrize(("loader", "mechanism"), [("core", "fentry"), ("core", "kprobe"),
                                                   ("bcc", "fentry"), ("bcc", "kprobe")])
def test_probe_source_reports_xfrm_input_output_and_notfound(lab_vm: LabVM, loader: str, mechanism: str):
    """The same checks through fentry/fexit (what these BTF kernels get by default) and through
    kprobe/kretprobe, for the CO-RE object and for bcc: every body must give the same events."""
    if loader == "bcc" and not _is_61(lab_vm):
        r = lab_vm.run("ipsec-capture sources --kernel-events bcc", timeout=420)
        lines = r.stderr.strip().splitlines()
        assert r.rc != 0 and "Traceback" not in r.stderr and "cannot compile" in lines[-1], r.stderr[-3000:]
        auto = lab_vm.run("ipsec-capture sources --json", timeout=300)
        got = {s["name"]: s for s in json.loads(auto.stdout)["sources"]}
        assert auto.rc == 0 and got["kprobe"]["active"] and got["kprobe"]["via"] == "core", auto.stdout
        print(f"bcc on {lab_vm.kernel}: {lines[-1][:300]}")
        return
    out_dir = os.path.join(lab_vm.rw[0], "bpf")
    r = lab_vm.run(["python3", CHECK, out_dir, mechanism, loader], timeout=420)
    print(r.stdout)
    m = re.search(r"COMPILE loader=\w+ ready_s=([\d.]+) compile_s=([\d.]+)", r.stdout)
    if m:
        print(f"{loader}/{mechanism} on {lab_vm.kernel}: ready in {m.group(1)} s (compile {m.group(2)} s)")
    failures = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert r.rc == 0 and not failures, (failures, r.stderr[-3000:])
    assert re.search(r"\b(\d+) passed, 0 failed", r.stdout)
