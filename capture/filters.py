"""`--host` and `--spi`: which captured packets are written.

Applied to the IP packet of each Record before it is written; struct and slicing only. The SPI is
read from the ESP header, directly after IP or after UDP 4500 (NAT-T, RFC 3948: a non-zero first
word is an SPI; zero is the non-ESP marker of IKE). Packets with no ESP header never match --spi.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from ipsec_capture.errors import UserError

IPPROTO_UDP = 17
IPPROTO_ESP = 50
NAT_T_PORT = 4500
IPV6_EXT_HEADERS = frozenset((0, 43, 60))  # hop-by-hop, routing, destination options
IPV6_FRAGMENT = 44
_BE32 = struct.Struct("!I")
_PORTS = struct.Struct("!HH")


def _l4(p: bytes | memoryview) -> tuple[int, int] | None:
    """(protocol, offset of the transport header), or None for a packet too short to tell."""
    n = len(p)
    if n < 20:
        return None
    version = p[0] >> 4
    if version == 4:
        return p[9], (p[0] & 0x0F) * 4
    if version != 6 or n < 40:
        return None
    nh, off = p[6], 40
    while (nh in IPV6_EXT_HEADERS or nh == IPV6_FRAGMENT) and off + 8 <= n:
        nh, off = p[off], off + (8 if nh == IPV6_FRAGMENT else (p[off + 1] + 1) * 8)
    return nh, off


def esp_spi(p: bytes | memoryview) -> int | None:
    """The SPI of an ESP packet (plain or UDP-encapsulated), else None."""
    l4 = _l4(p)
    if l4 is None:
        return None
    proto, off = l4
    if proto == IPPROTO_UDP and off + 16 <= len(p):
        sport, dport = _PORTS.unpack_from(p, off)
        if NAT_T_PORT not in (sport, dport):
            return None
        off += 8
    elif proto != IPPROTO_ESP or off + 8 > len(p):
        return None
    spi = _BE32.unpack_from(p, off)[0]
    return spi or None


def _addresses(p: bytes | memoryview) -> tuple[bytes, bytes] | None:
    if len(p) >= 20 and p[0] >> 4 == 4:
        return bytes(p[12:16]), bytes(p[16:20])
    if len(p) >= 40 and p[0] >> 4 == 6:
        return bytes(p[8:24]), bytes(p[24:40])
    return None


@dataclass(frozen=True, slots=True)
class PacketFilter:
    host: bytes | None = None  # packed address: matches source or destination
    spi: int | None = None

    def __call__(self, p: bytes | memoryview) -> bool:
        if self.host is not None:
            addrs = _addresses(p)
            if addrs is None or self.host not in addrs:
                return False
        return self.spi is None or esp_spi(p) == self.spi


def build_filter(host: str | None, spi: int | None) -> PacketFilter | None:
    """None when nothing is filtered (the hot path then skips the call). `spi` is parsed
    already (ipsec_capture.spi.parse_spi, the one SPI syntax)."""
    if host is None and spi is None:
        return None
    packed = None
    if host is not None:
        try:
            packed = ipaddress.ip_address(host).packed
        except ValueError:
            raise UserError(f"bad --host {host!r}: give one IPv4 or IPv6 address") from None
    return PacketFilter(packed, spi)
