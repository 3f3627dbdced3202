"""README's two commands as written: `./dev.sh demo` and `./dev.sh test` run for root without sudo
(containers, cloud images, the CI) and run themselves again with sudo for a user who is not root;
.ci/run runs exactly the README's test command."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import IS_ROOT

ROOT = Path(__file__).parent.parent
DEV = ROOT / "dev.sh"
NO_SUDO_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
NOBODY = 65534


def two_commands() -> list[str]:
    """The commands of README's "Two commands" block (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands.*?```sh\n(.*?)```", text, re.S)
    assert block, "README has no Two commands block"
    return [line.split("#")[0].strip() for line in block[1].splitlines() if line.strip()]


def test_readme_two_commands_and_ci_run_the_same_test_command():
    assert two_commands() == ["./dev.sh demo", "./dev.sh test"]
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith("#")]
    assert ci[-1] == two_commands()[1]


@pytest.mark.skipif(not IS_ROOT, reason="needs root: the root shell without sudo is the case tested")
def test_root_without_sudo_runs_as_written():
    assert shutil.which("sudo", path=NO_SUDO_PATH) is None, "this check needs a PATH without sudo"
    env = {**os.environ, "PATH": NO_SUDO_PATH}
    for argv in (["setup"], ["demo", "--help"]):  # demo: everything up to the lab, then its --help
        r = subprocess.run([str(DEV), *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (argv, r.stderr[-2000:])
        assert "sudo" not in r.stderr, r.stderr
    assert "--scenario" in r.stdout


def as_nobody(argv: list[str], path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           "env", f"PATH={path}", str(DEV), *argv], cwd="/", capture_output=True,
                          text=True, timeout=60)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run dev.sh as another user")
def test_a_user_who_is_not_root_gets_dev_sh_again_through_sudo():
    """The user's sudo (here a stand-in that records what it was asked to run) gets dev.sh's own
    path and every argument; its exit status is dev.sh's."""
    if not os.access(DEV, os.X_OK) or os.stat(ROOT).st_mode & 0o005 != 0o005:
        pytest.skip(f"{ROOT} is not readable by other users, so nobody cannot run dev.sh here")
    with tempfile.TemporaryDirectory(prefix="ict-devsh-") as tmp:  # pytest's tmp_path: root only
        os.chmod(tmp, 0o777)
        _sudo_cases(Path(tmp))


def _sudo_cases(tmp: Path) -> None:
    bindir = tmp / "bin"
    bindir.mkdir()
    bindir.chmod(0o755)
    record = tmp / "asked"
    (bindir / "sudo").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\nexit 42\n')
    (bindir / "sudo").chmod(0o755)
    r = as_nobody(["test", "-k", "some test"], f"{bindir}:{NO_SUDO_PATH}")
    assert r.returncode == 42, r.stderr
    assert record.read_text().splitlines() == ["--", str(DEV), "test", "-k", "some test"]
    assert "running again as root with sudo" in r.stderr

    r = as_nobody(["demo"], NO_SUDO_PATH)  # neither root nor sudo: one line saying what to do
    assert r.returncode == 77 and "sudo is not installed: run it as root" in r.stderr
