"""Which kernel the lab VM boots, and unpacking it for a PVH boot (host only, no VM booted).

Debian 12's 6.1 stays the default whatever else is installed (other lab runs depend on it);
bookworm-backports' 6.12 (zstd payload, 6.1's is xz) is booted only when asked for.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ipsec_capture.lab.vm import (
    DEFAULT_KERNEL,
    VMError,
    bzimage_payload,
    extract_vmlinux,
    find_kernel,
    lab_kernels,
)

KERNELS = {p.name.removeprefix("vmlinuz-"): p for p in lab_kernels()}


def _installed(line: str) -> Path:
    for kver, path in KERNELS.items():
        if re.match(re.escape(line) + r"($|[.+-])", kver):
            return path
    pytest.fail(f"no {line} lab kernel installed: ./dev.sh setup installs Debian 12's 6.1 and "
                "bookworm-backports' 6.12")


def test_default_is_debian_12s_kernel_with_a_newer_one_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IPSEC_CAPTURE_LAB_KERNEL", raising=False)
    newer = _installed("6.12")
    assert lab_kernels()[0] == newer  # the newest installed ...
    chosen = find_kernel()  # ... is not the default
    assert DEFAULT_KERNEL == "6.1" and chosen == _installed("6.1") and chosen.name.startswith("vmlinuz-6.1.")


def test_a_version_line_never_matches_a_longer_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IPSEC_CAPTURE_LAB_KERNEL", raising=False)
    assert find_kernel("6.12") == _installed("6.12")
    assert not find_kernel("6.1").name.startswith("vmlinuz-6.12")
    monkeypatch.setenv("IPSEC_CAPTURE_LAB_KERNEL", "6.12")
    assert find_kernel() == _installed("6.12")
    monkeypatch.setenv("IPSEC_CAPTURE_LAB_KERNEL", str(_installed("6.1")))
    assert find_kernel() == _installed("6.1")  # a path, as other engineers pin it
    assert find_kernel("6.12") == _installed("6.12")  # an explicit choice wins over the env var


def test_an_unknown_kernel_is_one_clear_error() -> None:
    with pytest.raises(VMError, match=r"no lab kernel '4\.19' installed \(have: .*6\.1"):
        find_kernel("4.19")
    with pytest.raises(VMError, match="does not exist"):
        find_kernel("/boot/vmlinuz-nonexistent")


@pytest.mark.parametrize(("line", "magic"), [("6.1", b"\xfd7zXZ\x00"), ("6.12", b"\x28\xb5\x2f\xfd")])
def test_the_payload_unpacks_to_the_kernel_elf(tmp_path: Path, line: str, magic: bytes) -> None:
    """xz for 6.1, zstd for 6.12: the boot header's payload, unpacked, is an x86-64 ELF whose
    length is the one the kernel's build appended to the payload."""
    kernel = _installed(line)
    payload = bzimage_payload(kernel.read_bytes())
    assert payload.startswith(magic)
    elf = extract_vmlinux(kernel, tmp_path)
    assert elf is not None and elf.read_bytes()[:5] == b"\x7fELF\x02"
    assert elf.stat().st_size == int.from_bytes(payload[-4:], "little")
    assert extract_vmlinux(kernel, tmp_path) == elf  # cached
