# ruff: noqa: F811  (lab_vm is a fixture imported from tests/vm/fixtures.py)
"""The VM runner itself: boot Debian's kernel, run commands, exit codes, timeouts, streaming."""

from __future__ import annotations

import glob
import os
import tempfile

import pytest

from ipsec_capture.lab.vm import LabVM, VMError
from tests.vm.fixtures import lab_vm  # noqa: F401 (a fixture)

pytestmark = pytest.mark.lab


def test_boots_the_distro_kernel(lab_vm: LabVM) -> None:
    r = lab_vm.run("uname -r", timeout=60)
    assert r.rc == 0, r.stderr
    assert r.stdout.startswith("6.1."), r.stdout
    assert r.stdout.strip() != os.uname().release  # really another kernel than the host's


def test_argv_exit_code_and_stderr(lab_vm: LabVM) -> None:
    r = lab_vm.run(["/bin/sh", "-c", 'echo "to out"; echo "to err" >&2; exit 7'], timeout=60)
    assert (r.rc, r.stdout, r.stderr) == (7, "to out\n", "to err\n")


def test_stderr_streams_while_the_command_runs(lab_vm: LabVM) -> None:
    seen: list[tuple[str, bytes]] = []
    r = lab_vm.run("for i in 1 2 3; do echo e$i >&2; sleep 0.3; done; echo done", timeout=60,
                   on_output=lambda kind, chunk: seen.append((kind, chunk)))
    assert r.ok
    err_chunks = [c for k, c in seen if k == "err"]
    assert len(err_chunks) >= 2, seen  # arrived in pieces, not at the end in one block
    assert b"".join(err_chunks) == b"e1\ne2\ne3\n"
    assert seen[-1] == ("out", b"done\n")


def test_timeout_kills_the_command_and_the_vm_stays_usable(lab_vm: LabVM) -> None:
    r = lab_vm.run("echo started; sleep 60 & sleep 60", timeout=2)
    assert r.timed_out and r.rc == 124
    assert r.stdout == "started\n"
    assert r.seconds < 20
    after = lab_vm.run("pgrep -x sleep || echo none", timeout=30)
    assert after.stdout.strip() == "none"  # the whole process group was killed


def test_env_cwd_and_the_venv_are_visible(lab_vm: LabVM) -> None:
    r = lab_vm.run("echo $LABVAR; pwd; ipsec-capture --version", env={"LABVAR": "x1"}, cwd="/usr", timeout=60)
    assert r.rc == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[:2] == ["x1", "/usr"]
    assert out[2].startswith("ipsec-capture ")


def test_rw_dir_brings_results_back(lab_vm: LabVM) -> None:
    out = lab_vm.rw[0]
    lab_vm.run(f"echo from-guest > {out}/result.txt", timeout=60, check=True)
    with open(os.path.join(out, "result.txt")) as f:
        assert f.read() == "from-guest\n"
    with pytest.raises(VMError, match="exited 3"):
        lab_vm.run("exit 3", timeout=60, check=True)


def test_boot_timeout_is_clean_and_leaves_nothing() -> None:
    """A boot that cannot finish in time: one clear error with the console, no qemu, no temp dir."""
    vm = LabVM(memory="512M", cpus=1, boot_timeout=1.5)
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "ipsec-capture-vm-*")))
    with pytest.raises(VMError, match="did not boot within") as err:
        vm.start()
    assert "console tail" in str(err.value)
    assert not vm.running and vm._proc is None
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "ipsec-capture-vm-*"))) == before
    with pytest.raises(VMError, match="not running"):
        vm.run("true")
