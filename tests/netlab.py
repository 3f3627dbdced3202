"""Test hosts in network namespaces: two namespaces joined by a veth pair.

Tests touch only namespaces they create here (names start with `ict-`), and the fixtures remove
them even when a test fails. Addresses are from the documentation ranges (RFC 5737 / RFC 3849).
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

PREFIX = "ict-"


def sh(*argv: str, netns: str | None = None, check: bool = True, input: bytes | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run a command (inside `netns` if given); raise with its stderr on failure."""
    full = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
    proc = subprocess.run(full, input=input, capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} -> {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    return proc


@dataclass
class NetnsPair:
    """Host `a` and host `b`, one veth between them, IPv4 and IPv6 on both ends."""

    a: str
    b: str
    veth_a: str = "veth0"
    veth_b: str = "veth0"
    a4: str = "192.0.2.1"
    b4: str = "192.0.2.2"
    a6: str = "2001:db8::1"
    b6: str = "2001:db8::2"

    @classmethod
    def create(cls) -> NetnsPair:
        tag = secrets.token_hex(3)
        pair = cls(a=f"{PREFIX}a-{tag}", b=f"{PREFIX}b-{tag}")
        try:
            for ns in (pair.a, pair.b):
                sh("ip", "netns", "add", ns)
                sh("ip", "link", "set", "lo", "up", netns=ns)
            host_a, host_b = f"icta{tag}", f"ictb{tag}"
            sh("ip", "link", "add", host_a, "type", "veth", "peer", "name", host_b)
            sh("ip", "link", "set", host_a, "netns", pair.a, "name", pair.veth_a)
            sh("ip", "link", "set", host_b, "netns", pair.b, "name", pair.veth_b)
            for ns, v4, v6 in ((pair.a, pair.a4, pair.a6), (pair.b, pair.b4, pair.b6)):
                sh("ip", "addr", "add", f"{v4}/24", "dev", "veth0", netns=ns)
                sh("ip", "addr", "add", f"{v6}/64", "dev", "veth0", "nodad", netns=ns)
                sh("ip", "link", "set", "veth0", "up", netns=ns)
        except Exception:
            pair.destroy()
            raise
        return pair

    def destroy(self) -> None:
        for ns in (self.a, self.b):
            if os.path.exists(f"/run/netns/{ns}"):
                sh("ip", "netns", "del", ns, check=False)

    def run(self, host: str, *argv: str, **kw) -> subprocess.CompletedProcess[bytes]:
        return sh(*argv, netns=self.a if host == "a" else self.b, **kw)


def leftover_namespaces() -> list[str]:
    try:
        return [n for n in os.listdir("/run/netns") if n.startswith(PREFIX)]
    except FileNotFoundError:
        return []


@contextmanager
def single_netns(label: str = "x") -> Iterator[str]:
    """One empty namespace (loopback up) named ict-<label>-<random>, deleted afterwards."""
    name = f"{PREFIX}{label}-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "link", "set", "lo", "up", netns=name)
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


NETFILTER_DUMPS = (
    ("nft", "list", "ruleset"),
    ("iptables-legacy-save",), ("ip6tables-legacy-save",),
    ("iptables-nft-save",), ("ip6tables-nft-save",),
)


def netfilter_state(netns: str) -> str:
    """Every rule in the namespace as text: nft ruleset and both iptables flavours, both families."""
    return "\n".join(sh(*argv, netns=netns).stdout.decode() for argv in NETFILTER_DUMPS)
