"""Hold the NAT-T sockets of a lab: UDP 4500 with UDP_ENCAP_ESPINUDP in each namespace.

The kernel decapsulates ESP-in-UDP only for datagrams that reach a UDP socket marked for
encapsulation (what charon's socket does); without one, the packets are plain UDP to a closed
port. Run as `python -m ipsec_capture.lab.udp_encap NS...`; prints `ready`, holds until SIGTERM.
"""

from __future__ import annotations

import signal
import socket
import sys

from ipsec_capture.netns import entered

SOL_UDP = 17  # <linux/socket.h> (IPPROTO_UDP)
UDP_ENCAP = 100  # <linux/udp.h>
UDP_ENCAP_ESPINUDP = 2  # <linux/udp.h>
NATT_PORT = 4500


def open_encap_socket(netns: str, family: int = socket.AF_INET) -> socket.socket:
    with entered(netns):
        sock = socket.socket(family, socket.SOCK_DGRAM)
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
