"""One wire vocabulary: a protocol number, port or unit is defined once (ipsec_capture/wire.py),
ESP is located by one parser (capture/esp_header.py), the capture points' roles come from
rules/points.py; these tests fail when a second definition or a disagreeing parser comes back."""

from __future__ import annotations

import re
import struct
from pathlib import Path

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import AH, ESP
from scapy.packet import Raw

from ipsec_capture.capture.esp_header import locate
from ipsec_capture.capture.filters import esp_spi
from ipsec_capture.correlate.packet import IKE_POINTS, POINT_ROLES
from ipsec_capture.rules.points import POINTS

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("ipsec_capture", "capture", "rules", "xfrm", "decrypt", "bpf", "correlate", "lab", "watch")
DEFINED_ONCE = re.compile(r"^(IPPROTO_\w+|NATT?_T?_?PORT|IKE_PORT|SECOND|XFRM_MODES)\s*=\s*\d", re.M)


def test_wire_constants_are_defined_only_in_wire_py() -> None:
    offenders = [f"{path.relative_to(ROOT)}: {m.group(0)}"
                 for room in ROOMS for path in sorted((ROOT / room).rglob("*.py"))
                 if path.name != "wire.py"
                 for m in DEFINED_ONCE.finditer(path.read_text())]
    assert offenders == []


def test_the_filter_locates_esp_as_the_decoder_does() -> None:
    """AH before ESP (IPv6) is walked, an IPv4 later fragment carries no readable ESP header,
    IKE behind the non-ESP marker on 4500 has no SPI: --spi and the decoder agree on all."""
    ah = AH(nh=50, payloadlen=4, spi=7, icv=b"\0" * 12)  # (4 + 2) * 4 = 24 bytes, ESP next
    esp6_after_ah = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / ah
                          / ESP(spi=0xABCD, seq=1) / Raw(b"x" * 16))
    fragment = bytearray(bytes(IP(src="192.0.2.1", dst="192.0.2.2", proto=50, frag=100)
                               / Raw(struct.pack("!II", 0x1234, 1) + b"y" * 16)))
    ike = bytes(IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=4500, dport=4500)
                / Raw(b"\0" * 4 + b"ike!" * 8))
    natt = bytes(IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=4500, dport=4500)
                 / Raw(struct.pack("!II", 0x55, 3) + b"z" * 16))
    for packet, spi in ((esp6_after_ah, 0xABCD), (bytes(fragment), None), (ike, None), (natt, 0x55)):
        found = locate(packet)
        assert (found is not None) == (spi is not None)
        assert esp_spi(packet) == spi


def test_point_roles_come_from_the_point_definitions() -> None:
    assert set(POINT_ROLES) | IKE_POINTS == set(POINTS)
    for name, (direction, kind) in POINT_ROLES.items():
        assert (direction, kind) == (POINTS[name].direction, POINTS[name].kind)


def test_every_kernel_events_option_offers_the_sources_modes() -> None:
    """start, the demo and the lab share bpf.sources.MODES without importing bpf at parse time:
    their --kernel-events choices must be the same words."""
    from ipsec_capture.bpf.sources import MODES
    from ipsec_capture.cli import build_parser
    from ipsec_capture.lab.demo import KERNEL_EVENT_MODES

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    start = next(a for a in sub.choices["start"]._actions if a.dest == "kernel_events")
    assert tuple(start.choices) == MODES == KERNEL_EVENT_MODES
