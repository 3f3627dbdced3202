"""Real packets hit the raw points: rule counters after ESP and IKE traffic both ways, IPv4 and IPv6.

Host `a` has the rules; nothing listens anywhere. ESP goes out of raw sockets (protocol 50, a
plausible SPI/sequence header), IKE as UDP to 500 and 4500 and from source port 500 to a high
port (the rule for a reply's source port). No SA exists, so the policy points must stay at zero.
"""

from __future__ import annotations

import sys

import pytest

from ipsec_capture.rules.manager import build, counters, install, remove
from ipsec_capture.rules.points import POINTS
from tests.conftest import require_tool
from tests.netlab import NetnsPair, netfilter_state

N = 3  # packets per kind

SENDER = r"""
import socket, struct, sys
dst, n = sys.argv[1], int(sys.argv[2])
af = socket.AF_INET6 if ":" in dst else socket.AF_INET
esp = socket.socket(af, socket.SOCK_RAW, 50)  # IPPROTO_ESP
for seq in range(1, n + 1):
    esp.sendto(struct.pack("!II", 0x1234, seq) + bytes(48), (dst, 0))
udp = socket.socket(af, socket.SOCK_DGRAM)
ike = socket.socket(af, socket.SOCK_DGRAM)
ike.bind(("", 500))
for _ in range(n):
    udp.sendto(b"ike", (dst, 500))
    udp.sendto(b"nat-t", (dst, 4500))
    ike.sendto(b"reply", (dst, 40000))
"""


def send(pair: NetnsPair, host: str, dst: str) -> None:
    pair.run(host, sys.executable, "-c", SENDER, dst, str(N))


@pytest.mark.parametrize("backend", ["nft", "iptables-legacy", "iptables-nft"])
def test_esp_and_ike_hit_raw_points_both_ways(netns_pair, backend):
    require_tool("nft" if backend == "nft" else f"{backend}-restore")
    rs = build(5, None, backend, netns_pair.a)
    install(rs)
    try:
        expected = dict.fromkeys(POINTS, 0)
        for family, (a_addr, b_addr) in (("IPv4", (netns_pair.a4, netns_pair.b4)),
                                         ("IPv6", (netns_pair.a6, netns_pair.b6))):
            send(netns_pair, "b", a_addr)  # arriving at a
            send(netns_pair, "a", b_addr)  # leaving a
            expected["raw-pre-esp"] += N
            expected["raw-pre-ike"] += 3 * N
            expected["raw-out-esp"] += N
            expected["raw-out-ike"] += 3 * N
            got = {p: counters(rs).get(p, 0) for p in POINTS}
            assert got == expected, f"{family} with {backend}:\n{netfilter_state(netns_pair.a)}"
    finally:
        remove(rs)
