"""`--host` and `--spi`: which captured packets are written.

Applied to the IP packet of each Record before it is written; struct and slicing only. The SPI is
read from the ESP header as capture/esp_header.py locates it, directly after IP or after UDP 4500
(NAT-T, RFC 3948: a non-zero first word is an SPI; zero is the non-ESP marker of IKE). Packets
with no ESP header never match --spi.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from ipsec_capture.errors import UserError

from .esp_header import locate

_BE32 = struct.Struct("!I")


def esp_spi(p: bytes | memoryview) -> int | None:
    """The SPI of an ESP packet (plain or UDP-encapsulated), else None: located exactly as the
    decoder and the join locate it (IPv6 extension headers and AH walked, fragments refused)."""
    found = locate(p)
    if found is None:
        return None
    return _BE32.unpack_from(p, found[3])[0] or None


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
