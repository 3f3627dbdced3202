"""Build the CO-RE object once, on the build machine: `python -m ipsec_capture.bpf.build`.

    xfrm_probes.bpf.c + vmlinux.h  --clang -target bpf -g -O2-->  --bpftool gen object-->
    xfrm_probes.bpf.o (shipped in the package) + xfrm_probes.bpf.json (how it was made)

vmlinux.h is made at build time by `bpftool btf dump ... format c` from a kernel's BTF and never
committed: it is 2-3 MB of generated text that would change with every kernel update. dev.sh
takes it from the lab's Debian 12 6.1 kernel (the vmlinux ELF inside /boot/vmlinuz-6.1*, whose
.BTF section bpftool reads), not from the build machine's running kernel, so every machine of the
project builds the same object from the same inputs, and the oldest kernel we support is the
one the types come from (CO-RE moves fields to where newer kernels keep them; a field only a
newer kernel had would fail on the old one). `bpftool gen object` links the object and drops its
DWARF (libbpf reads only the BTF), so the object does not depend on the build directory.

The manifest records the hashes of the source, vmlinux.h and the object, and the tools' versions;
`--check` rebuilds from the same BTF and says whether the shipped object is the one its source
gives (tests/test_bpf_core.py runs it). Needs clang, bpftool and libbpf-dev (bpf_helpers.h): the
build machine only; the machine that runs the product needs none of them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "xfrm_probes.bpf.c"
OBJECT = HERE / "xfrm_probes.bpf.o"
MANIFEST = HERE / "xfrm_probes.bpf.json"
CFLAGS = ("-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86", "-Wall", "-Werror")
HEADERS = "/usr/include/bpf/bpf_helpers.h"
APT = "apt-get install clang bpftool libbpf-dev"


class BuildError(Exception):
    pass


@dataclass(slots=True)
class Manifest:
    object: str
    object_sha256: str
    source_sha256: str
    btf: str  # the BTF vmlinux.h was made from: an ELF with .BTF, or a raw BTF file
    btf_sha256: str
    vmlinux_h_sha256: str
    helpers_sha256: str  # libbpf-dev's bpf_helpers.h
    clang: str
    bpftool: str
    cflags: list[str]

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path = MANIFEST) -> Manifest:
        return cls(**json.loads(path.read_text()))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BuildError(f"{name} is missing: {APT} (the build machine only)")
    return path


def _run(argv: list[str], cwd: Path | None = None) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    if p.returncode != 0:
        raise BuildError(f"`{' '.join(argv)}` failed: {(p.stderr or p.stdout).strip()[-2000:]}")
    return p.stdout


def build(btf: Path, out_dir: Path, source: Path = SOURCE) -> Manifest:
    """vmlinux.h from `btf`, then the object and its manifest into `out_dir`."""
    clang, bpftool = _tool("clang"), _tool("bpftool")
    if not os.path.exists(HEADERS):
        raise BuildError(f"{HEADERS} is missing: {APT}")
    if not btf.exists():
        raise BuildError(f"no BTF at {btf}")
    out_dir.mkdir(parents=True, exist_ok=True)
    obj = out_dir / OBJECT.name
    with tempfile.TemporaryDirectory(prefix="ipsec-capture-bpf-") as work:
        w = Path(work)
        header = w / "vmlinux.h"
        header.write_text(_run([bpftool, "btf", "dump", "file", str(btf), "format", "c"]))
        # compiled from the source's own folder by its bare name: no build path in the object
        raw = w / "raw.o"
        _run([clang, *CFLAGS, f"-I{w}", "-c", source.name, "-o", str(raw)], cwd=source.parent)
        _run([bpftool, "gen", "object", str(w / "linked.o"), str(raw)])
        shutil.move(str(w / "linked.o"), obj)
        vmlinux_h = sha256(header)
    manifest = Manifest(
        object=obj.name, object_sha256=sha256(obj), source_sha256=sha256(source), btf=str(btf),
        btf_sha256=sha256(btf), vmlinux_h_sha256=vmlinux_h, helpers_sha256=sha256(Path(HEADERS)),
        clang=_run([clang, "--version"]).splitlines()[0], bpftool=_run([bpftool, "version"]).splitlines()[0],
        cflags=list(CFLAGS))
    manifest.dump(out_dir / MANIFEST.name)
    return manifest


def stale(btf: Path) -> str | None:
    """Why the shipped object must be rebuilt (None: it is current for this source and BTF)."""
    if not OBJECT.exists() or not MANIFEST.exists():
        return "not built yet"
    m = Manifest.load()
    if m.source_sha256 != sha256(SOURCE):
        return f"{SOURCE.name} changed"
    if m.btf != str(btf) or m.btf_sha256 != sha256(btf):
        return f"the BTF changed ({m.btf} -> {btf})"
    if m.object_sha256 != sha256(OBJECT):
        return f"{OBJECT.name} is not the one the manifest describes"
    return None


def check() -> list[str]:
    """Rebuild from the manifest's BTF into a temporary folder; the differences from what ships."""
    m = Manifest.load()
    problems = []
    if m.source_sha256 != sha256(SOURCE):
        problems.append(f"{SOURCE.name} changed since {OBJECT.name} was built: run ./dev.sh setup")
    if m.object_sha256 != sha256(OBJECT):
        problems.append(f"{OBJECT.name} is not the object the manifest describes")
    with tempfile.TemporaryDirectory(prefix="ipsec-capture-bpf-check-") as out:
        again = build(Path(m.btf), Path(out))
    for field in ("object_sha256", "vmlinux_h_sha256", "btf_sha256"):
        if getattr(again, field) != getattr(m, field):
            problems.append(f"a rebuild gives another {field}: {getattr(again, field)} "
                            f"!= {getattr(m, field)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ipsec_capture.bpf.build", description=__doc__.split("\n")[0])
    ap.add_argument("--btf", type=Path, default=Path("/sys/kernel/btf/vmlinux"),
                    help="kernel BTF for vmlinux.h: a vmlinux ELF or a raw BTF file (default: this kernel's)")
    ap.add_argument("--if-stale", action="store_true", help="build only if the object is missing or stale")
    ap.add_argument("--check", action="store_true",
                    help="rebuild into a temp dir and compare with the shipped object")
    args = ap.parse_args(argv)
    try:
        if args.check:
            problems = check()
            for p in problems or ["the shipped object is its source's build"]:
                print(f"bpf build: {p}", file=sys.stderr)
            return 1 if problems else 0
        why = stale(args.btf) if args.if_stale else "asked"
        if why is None:
            return 0
        m = build(args.btf, HERE)
        print(f"bpf build: {m.object} ({why}) sha256 {m.object_sha256[:12]} from {m.btf}", file=sys.stderr)
    except BuildError as err:
        print(f"bpf build: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
