"""mypy over the whole product, clean: the annotations are checked, not decoration.

The rooms are top-level folders installed as `ipsec_capture.<room>` through setuptools
package-dir, which mypy cannot follow. So the test builds the installed layout as a tree of
symlinks (`ipsec_capture/` holding the package's own modules and one link per room, the rooms
read from pyproject so a new room is checked without touching this file) and runs
`mypy -p ipsec_capture` from the tree's parent with pyproject's [tool.mypy] settings.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "ipsec_capture"


def package_dirs() -> dict[str, str]:
    """pyproject's [tool.setuptools.package-dir]: import name -> folder in the repository."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]["package-dir"]


def installed_layout(tree: Path) -> dict[str, str]:
    """Build `tree/ipsec_capture` as it is installed; return the tree-relative prefix of each
    room -> its folder in the repository (to name files in mypy's output as the repository does)."""
    pkg = tree / PACKAGE
    pkg.mkdir()
    prefixes: dict[str, str] = {}
    for name, folder in package_dirs().items():
        if name == PACKAGE:
            for module in sorted((ROOT / folder).glob("*.py")):
                (pkg / module.name).symlink_to(module)
            continue
        parent, _, room = name.rpartition(".")
        assert parent == PACKAGE, f"{name}: only rooms directly under {PACKAGE} are laid out here"
        (pkg / room).symlink_to(ROOT / folder, target_is_directory=True)
        prefixes[f"{PACKAGE}/{room}/"] = f"{folder}/"
    return prefixes


def test_layout_covers_every_room(tmp_path: Path) -> None:
    """Every room folder in package-dir is linked, and each link reaches its __init__.py."""
    installed_layout(tmp_path)
    rooms = [n.rpartition(".")[2] for n in package_dirs() if n != PACKAGE]
    assert rooms, "package-dir lists no rooms"
    for room in rooms:
        assert (tmp_path / PACKAGE / room / "__init__.py").is_file(), room
    assert (tmp_path / PACKAGE / "__init__.py").is_file()


def test_mypy_clean(tmp_path: Path) -> None:
    assert importlib.util.find_spec("mypy") is not None, \
        "mypy is not installed in this environment: run ./dev.sh setup (it is a dev dependency)"
    tree = tmp_path / "tree"
    tree.mkdir()
    prefixes = installed_layout(tree)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "cache"), "-p", PACKAGE],
        cwd=tree, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    for linked, folder in prefixes.items():
        out = out.replace(linked, folder)
    assert proc.returncode == 0, f"mypy found errors (exit {proc.returncode}):\n{out}"
