"""Traffic between the lab's hosts, both ways: ping (ICMP echo) and a UDP echo exchange.

UDP runs in this process with one socket per namespace (no exec per packet, which costs ~0.1 s
under TCG), so a lost datagram is counted exactly: sent vs echoed back.
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


@dataclass(slots=True)
class TrafficResult:
    proto: str
    src: str  # "left" or "right"
    dst: str
    sent: int
    received: int

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.received == self.sent

    def line(self) -> str:
        return f"{self.proto} {self.src} -> {self.dst}: sent {self.sent}, received {self.received}"


def ping(state: LabState, src: str, count: int, size: int = 56) -> TrafficResult:
    dst = "right" if src == "left" else "left"
    src_host, dst_host = ((state.left_host, state.right_host) if src == "left"
                          else (state.right_host, state.left_host))
    argv = ["ip", "netns", "exec", state.netns(src), "ping", "-q", "-n", "-c", str(count), "-i", "0.05",
            "-W", "2", "-s", str(size), "-I", src_host, dst_host]
    proc = subprocess.run(argv, capture_output=True, text=True)
    m = _PING_RE.search(proc.stdout)
    sent, received = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return TrafficResult("icmp", src, dst, sent, received)


def udp_echo(state: LabState, src: str, count: int, size: int = 64, wait: float = 2.0) -> TrafficResult:
    """`count` datagrams from `src` to the other host, echoed back; received = echoes that came back."""
    dst = "right" if src == "left" else "left"
    src_host, dst_host = ((state.left_host, state.right_host) if src == "left"
                          else (state.right_host, state.left_host))
    family = socket.AF_INET6 if ":" in dst_host else socket.AF_INET
    with entered(state.netns(dst)):
        server = socket.socket(family, socket.SOCK_DGRAM)
    with entered(state.netns(src)):
        client = socket.socket(family, socket.SOCK_DGRAM)
    try:
        server.bind((dst_host, UDP_PORT))
        client.bind((src_host, 0))
        sent = received = 0
        for i in range(count):
            payload = i.to_bytes(4, "big") * (size // 4)
            try:
                client.sendto(payload, (dst_host, UDP_PORT))
            except OSError:
                continue  # e.g. EPERM from a blocking policy: not sent
            sent += 1
            if select.select([server], [], [], wait)[0]:
                data, peer = server.recvfrom(65535)
                server.sendto(data, peer)
                if select.select([client], [], [], wait)[0] and client.recv(65535) == payload:
                    received += 1
        return TrafficResult("udp", src, dst, sent, received)
    finally:
        server.close()
        client.close()


def exchange(state: LabState, count: int = 5, proto: str = "both") -> list[TrafficResult]:
    results = []
    for src in ("left", "right"):
        if proto in ("icmp", "both"):
            results.append(ping(state, src, count))
        if proto in ("udp", "both"):
            results.append(udp_echo(state, src, count))
    return results
