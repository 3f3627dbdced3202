"""Traffic between the lab's hosts, both ways: ping (ICMP echo) and a UDP echo exchange.

UDP runs in this process with one socket per namespace (no exec per packet, which costs ~0.1 s
under TCG), so a lost datagram is counted exactly: sent vs echoed back. A daemon lab has one
path per child (its own endpoints); every UDP payload says which path, direction and number it
is (`payload()`), so a test can find each one, decrypted, in a capture.
"""

from __future__ import annotations

import re
import select
import socket
import subprocess
from dataclasses import dataclass

from ipsec_capture.netns import entered

from .scenarios import LabState

UDP_PORT = 5555
_PING_RE = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")


@dataclass(frozen=True, slots=True)
class Path:
    """Where traffic goes: a daemon child's endpoints, or the lab's own ("" child)."""

    child: str
    left_host: str
    right_host: str


@dataclass(slots=True)
class TrafficResult:
    proto: str
    src: str  # "left" or "right"
    dst: str
    sent: int
    received: int
    child: str = ""

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.received == self.sent

    def line(self) -> str:
        where = f"{self.child}: " if self.child else ""
        return f"{where}{self.proto} {self.src} -> {self.dst}: sent {self.sent}, received {self.received}"


def paths(state: LabState) -> list[Path]:
    if not state.daemon:
        return [Path("", state.left_host, state.right_host)]
    from .daemons import CHILDREN

    return [Path(c, CHILDREN[c].left_host, CHILDREN[c].right_host) for c in state.children]


def payload(child: str, src: str, i: int, size: int = 64) -> bytes:
    """The i-th UDP datagram `src` sends on `child`'s path: says what it is, padded to `size`."""
    return f"ipsec-capture {child or 'lab'} {src} #{i}".encode().ljust(size, b".")


def _ends(state: LabState, src: str, path: Path | None) -> tuple[str, str, str, str]:
    path = path or paths(state)[0]
    dst = "right" if src == "left" else "left"
    src_host, dst_host = ((path.left_host, path.right_host) if src == "left"
                          else (path.right_host, path.left_host))
    return dst, src_host, dst_host, path.child


def ping(state: LabState, src: str, count: int, size: int = 56, path: Path | None = None) -> TrafficResult:
    dst, src_host, dst_host, child = _ends(state, src, path)
    argv = ["ip", "netns", "exec", state.netns(src), "ping", "-q", "-n", "-c", str(count), "-i", "0.05",
            "-W", "2", "-s", str(size), "-I", src_host, dst_host]
    proc = subprocess.run(argv, capture_output=True, text=True)
    m = _PING_RE.search(proc.stdout)
    sent, received = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return TrafficResult("icmp", src, dst, sent, received, child)


def udp_echo(state: LabState, src: str, count: int, size: int = 64, wait: float = 2.0,
             path: Path | None = None, first: int = 0) -> TrafficResult:
    """`count` datagrams from `src` to the other host, echoed back; received = echoes that came back.
    Datagrams are numbered from `first` (payload())."""
    dst, src_host, dst_host, child = _ends(state, src, path)
    family = socket.AF_INET6 if ":" in dst_host else socket.AF_INET
    with entered(state.netns(dst)):
        server = socket.socket(family, socket.SOCK_DGRAM)
    with entered(state.netns(src)):
        client = socket.socket(family, socket.SOCK_DGRAM)
    try:
        server.bind((dst_host, UDP_PORT))
        client.bind((src_host, 0))
        sent = received = 0
        for i in range(first, first + count):
            data = payload(child, src, i, size)
            try:
                client.sendto(data, (dst_host, UDP_PORT))
            except OSError:
                continue  # e.g. EPERM from a blocking policy: not sent
            sent += 1
            if select.select([server], [], [], wait)[0]:
                echo, peer = server.recvfrom(65535)
                server.sendto(echo, peer)
                if select.select([client], [], [], wait)[0] and client.recv(65535) == data:
                    received += 1
        return TrafficResult("udp", src, dst, sent, received, child)
    finally:
        server.close()
        client.close()


def exchange(state: LabState, count: int = 5, proto: str = "both", child: str | None = None,
             first: int = 0) -> list[TrafficResult]:
    """Both ways on every path (or `child`'s only); UDP datagrams numbered from `first`."""
    results = []
    chosen = [p for p in paths(state) if child is None or p.child == child]
    for path in chosen:
        for src in ("left", "right"):
            if proto in ("icmp", "both"):
                results.append(ping(state, src, count, path=path))
            if proto in ("udp", "both"):
                results.append(udp_echo(state, src, count, path=path, first=first))
    return results
