"""Declared dependencies match the imports: every third-party module the product imports is a
declared dependency, or an optional one imported on demand in the one module that needs it; a
declared dependency that nothing imports fails too (pyroute2 and scapy once were)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("ipsec_capture", "capture", "rules", "xfrm", "decrypt", "bpf", "correlate", "lab", "watch")
# import name -> distribution, for the ones whose names differ
DISTRIBUTIONS = {"prometheus_client": "prometheus-client"}
# optional imports: module -> the only files allowed to import it (on demand, with a clear error)
OPTIONAL = {
    "bcc": ("bpf/",),  # Debian's python3-bpfcc, not on PyPI
    "pandas": ("correlate/api.py",),  # tables become DataFrames when it is there
    "scapy": ("correlate/scapy_view.py",),  # the [scapy] extra: Packet.scapy()
}


def third_party_imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for room in ROOMS:
        for path in sorted((ROOT / room).rglob("*.py")) if (ROOT / room).is_dir() else ():
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                         and node.module else [])
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "ipsec_capture":
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}

    extras = {k: names(v) for k, v in project.get("optional-dependencies", {}).items() if k != "dev"}
    return names(project["dependencies"]), extras


def test_every_import_is_declared_and_every_declaration_imported() -> None:
    required, extras = declared()
    optional_dists = set().union(*extras.values()) if extras else set()
    imports = third_party_imports()
    problems = []
    for module, files in sorted(imports.items()):
        dist = DISTRIBUTIONS.get(module, module).lower()
        allowed = OPTIONAL.get(module)
        if allowed is not None:
            if not all(f.startswith(allowed) for f in files):
                problems.append(f"optional {module} imported by {sorted(files)}, only {allowed} may")
        elif dist not in required and dist not in optional_dists:
            problems.append(f"{module} imported by {sorted(files)} but not a declared dependency")
    imported = {DISTRIBUTIONS.get(m, m).lower() for m in imports}
    problems += [f"{dist} is declared but nothing imports it" for dist in sorted(required - imported)]
    problems += [f"extra {dist} is declared but nothing imports it"
                 for dist in sorted(optional_dists - imported)]
    assert problems == []
