"""The kernel lab VM for tests: booted once per pytest session, shared by every lab test.

Import `lab_vm` into a test module or conftest; all importers get the same running VM (a
module-level singleton), and it is stopped at the end of the session whatever happened.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from ipsec_capture.lab.vm import LabVM, VMError

_vm: LabVM | None = None


def lab_prerequisites() -> str | None:
    """What is missing to boot the lab VM (None if nothing)."""
    if os.geteuid() != 0:
        return "the lab VM needs root (it shares the host root and creates namespaces in the guest)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed: run ./dev.sh setup"
    if not glob.glob("/lib/modules/*/kernel/net/ipv4/esp4.ko*"):
        return "no Debian kernel with ESP modules (linux-image-amd64) is installed: run ./dev.sh setup"
    if not os.path.exists("/bin/busybox"):
        return "busybox-static is not installed: run ./dev.sh setup"
    return None


def shared_vm() -> LabVM:
    global _vm
    if _vm is None or not _vm.running:
        missing = lab_prerequisites()
        if missing:
            pytest.fail(missing)
        # One read-write share for results (tests find it as vm.rw[0]); removed with the VM.
        _vm = LabVM(memory="2G", cpus=2, rw=[tempfile.mkdtemp(prefix="ipsec-capture-lab-tests-")])
        try:
            _vm.start()
        except VMError as err:
            _vm = None
            pytest.fail(f"the lab VM did not boot: {err}")
        print(f"\nlab VM booted in {_vm.boot_seconds:.1f} s (guest uptime {_vm.guest_uptime_at_ready:.1f} s)")
    return _vm


@pytest.fixture(scope="session")
def lab_vm() -> Iterator[LabVM]:
    vm = shared_vm()
    try:
        yield vm
    finally:
        vm.stop()
        for d in vm.rw:
            shutil.rmtree(d, ignore_errors=True)
