"""Hold the NAT-T sockets of a lab: UDP 4500 with UDP_ENCAP_ESPINUDP in each namespace.

The kernel decapsulates ESP-in-UDP only for datagrams that reach a UDP socket marked for
encapsulation (what charon's socket does); without one, the packets are plain UDP to a closed
port. Like charon's, the socket carries per-socket bypass policies: UDP runs the socket's xfrm
policy check before the encap hook, and the hosts' own policies would otherwise reject the
still-encrypted datagram (XfrmInTmplMismatch, UdpInErrors).
Run as `python -m ipsec_capture.lab.udp_encap NS...`; prints `ready`, holds until SIGTERM.
"""

from __future__ import annotations

import signal
import socket
import struct
import sys

from ipsec_capture.netns import entered
from ipsec_capture.wire import NATT_PORT

SOL_UDP = 17  # <linux/socket.h> (IPPROTO_UDP)
UDP_ENCAP = 100  # <linux/udp.h>
UDP_ENCAP_ESPINUDP = 2  # <linux/udp.h>
IP_XFRM_POLICY = 17  # <linux/in.h>
IPV6_XFRM_POLICY = 35  # <linux/in6.h>
XFRM_POLICY_IN = 0  # <linux/xfrm.h>
XFRM_POLICY_OUT = 1
XFRM_POLICY_ALLOW = 0
XFRM_INF = 0xFFFFFFFFFFFFFFFF
# struct xfrm_selector <linux/xfrm.h>: daddr, saddr, dport, dport_mask, sport, sport_mask, family,
# prefixlen_d, prefixlen_s, proto, (pad), ifindex, user. All-zero prefixes match anything.
_SELECTOR = struct.Struct("=16s16s4HHBBB3xiI")
# struct xfrm_userpolicy_info: selector, lifetime_cfg (8 x u64), lifetime_cur (4 x u64), priority,
# index, dir, action, flags, share, padding to 8.
_POLICY = struct.Struct("=56s8Q4QIIBBBB4x")


def bypass_policy(direction: int, family: int) -> bytes:
    sel = _SELECTOR.pack(b"", b"", 0, 0, 0, 0, family, 0, 0, 0, 0, 0)
    return _POLICY.pack(sel, XFRM_INF, XFRM_INF, XFRM_INF, XFRM_INF, 0, 0, 0, 0,
                        0, 0, 0, 0, 0, 0, direction, XFRM_POLICY_ALLOW, 0, 0)


def open_encap_socket(netns: str, family: int = socket.AF_INET) -> socket.socket:
    with entered(netns):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    level, opt = ((socket.IPPROTO_IPV6, IPV6_XFRM_POLICY) if family == socket.AF_INET6
                  else (socket.IPPROTO_IP, IP_XFRM_POLICY))
    for direction in (XFRM_POLICY_IN, XFRM_POLICY_OUT):
        sock.setsockopt(level, opt, bypass_policy(direction, family))
    sock.setsockopt(SOL_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", NATT_PORT))
    return sock


def main(argv: list[str]) -> int:
    socks = [open_encap_socket(ns) for ns in argv]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    signal.pause()
    del socks
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
