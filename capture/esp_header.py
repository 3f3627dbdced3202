"""Find the ESP header in an outer IP packet: IPv4 or IPv6 (walking extension headers), ESP as IP
protocol 50 or inside UDP (NAT-T, RFC 3948).

The one place that says where ESP is in a packet: the capture filters (--spi), the decoder and
the correlation code all need "which SPI and sequence number is this packet" for
every captured packet, so the parse is struct-only on memoryviews and allocates nothing until it
has found ESP. `locate()` returns raw offsets for the hot path; `esp_header()` is the friendly
form with address strings.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from ipsec_capture.wire import (
    IPPROTO_AH,
    IPPROTO_DSTOPTS,
    IPPROTO_ESP,
    IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS,
    IPPROTO_ROUTING,
    IPPROTO_UDP,
    NATT_PORT,
    NON_ESP_MARKER,
)

_U16 = struct.Struct("!H")
_ESP = struct.Struct("!II")  # SPI, sequence number (RFC 4303 section 2)
_UDP_PORTS = struct.Struct("!HH")
_IP4_FRAG = struct.Struct("!H")  # flags (3 bits) + fragment offset
_IP4_FIXED = struct.Struct("!BxHxxHxB")  # version/IHL, total length, flags/fragment offset, protocol
_IP6_FRAG = struct.Struct("!H")  # fragment offset (13 bits) + 2 reserved + M flag

# IPv6 headers walked to reach ESP (AH is walked too: ESP may follow it).
_IP6_SKIP = frozenset({IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT, IPPROTO_AH})
_IP4_MF_OR_OFFSET = 0x3FFF  # More Fragments bit plus the 13-bit offset


@dataclass(slots=True)
class EspHeader:
    """Where ESP sits in an outer packet and what its cleartext header says.

    `offset` is the ESP header (SPI) position; `outer_header_len` the length of the IP header with
    its IPv6 extension headers (the UDP header, if any, starts there); `proto_offset` the byte
    that names the next protocol (IPv4 protocol field or the last IPv6 next-header field), which a
    transport-mode rebuild rewrites; `length` the packet length the IP header declares (may exceed
    what was captured).
    """

    family: int
    src: str
    dst: str
    spi: int
    seq: int
    offset: int
    natt: bool
    outer_header_len: int
    proto_offset: int = 0
    length: int = 0


def locate(packet: bytes | memoryview, natt_ports: frozenset[int] | None = None
           ) -> tuple[int, int, int, int, int, int, int] | None:
    """Raw parse for hot paths: (family, dst_start, dst_end, esp_offset, outer_header_len,
    proto_offset, declared_length), or None when the packet carries no ESP we can read (not IP,
    a later fragment, IKE behind the non-ESP marker, NAT keepalive, fewer than 8 ESP bytes).

    Addresses are returned as offsets so the caller can key a dict on the packed bytes without
    building strings.
    """
    n = len(packet)
    if n < 20:
        return None
    first, length, frag, proto = _IP4_FIXED.unpack_from(packet)
    if first == 0x45 and proto == IPPROTO_ESP and not frag & _IP4_MF_OR_OFFSET:
        # nearly every packet of a capture: IPv4 without options carrying ESP, one unpack
        return (socket.AF_INET, 16, 20, 20, 20, 9, length) if n >= 28 else None
    version = first >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < 20 or n < ihl:
            return None
        if _IP4_FRAG.unpack_from(packet, 6)[0] & _IP4_MF_OR_OFFSET:
            return None  # a fragment: ESP can only be read after reassembly
        family, proto, pos, proto_at = socket.AF_INET, packet[9], ihl, 9
        dst_start, dst_end = 16, 20
        length = _U16.unpack_from(packet, 2)[0]
    elif version == 6:
        if n < 40:
            return None
        family, proto, pos, proto_at = socket.AF_INET6, packet[6], 40, 6
        dst_start, dst_end = 24, 40
        length = 40 + _U16.unpack_from(packet, 4)[0]
        while proto in _IP6_SKIP:
            if pos + 8 > n:
                return None
            nxt = packet[pos]
            if proto == IPPROTO_FRAGMENT:
                if _IP6_FRAG.unpack_from(packet, pos + 2)[0] & 0xFFF9:
                    return None  # offset != 0 or more fragments follow
                size = 8
            elif proto == IPPROTO_AH:
                size = (packet[pos + 1] + 2) * 4
            else:
                size = (packet[pos + 1] + 1) * 8
            proto_at, proto, pos = pos, nxt, pos + size
    else:
        return None
    header_len = pos
    if proto == IPPROTO_UDP:
        if pos + 8 > n:
            return None
        sport, dport = _UDP_PORTS.unpack_from(packet, pos)
        ports = natt_ports or _DEFAULT_NATT_PORTS
        if dport not in ports and sport not in ports:
            return None
        pos += 8
        if packet[pos:pos + 4] == NON_ESP_MARKER:
            return None  # IKE on port 4500
    elif proto != IPPROTO_ESP:
        return None
    if pos + 8 > n:
        return None  # NAT keepalive (one 0xff byte) or a cut packet
    return family, dst_start, dst_end, pos, header_len, proto_at, length


_DEFAULT_NATT_PORTS = frozenset({NATT_PORT})


def esp_header(packet: bytes | memoryview, natt_ports: frozenset[int] | None = None) -> EspHeader | None:
    """The ESP header of an outer IP packet, or None when it carries none (see `locate`).

    `natt_ports` are the UDP ports taken as ESP-in-UDP (default 4500, either direction).
    """
    found = locate(packet, natt_ports)
    if found is None:
        return None
    family, dst_start, dst_end, pos, header_len, proto_at, length = found
    spi, seq = _ESP.unpack_from(packet, pos)
    if spi == 0:
        return None
    alen = dst_end - dst_start
    src = socket.inet_ntop(family, bytes(packet[dst_start - alen:dst_start]))
    dst = socket.inet_ntop(family, bytes(packet[dst_start:dst_end]))
    return EspHeader(family=family, src=src, dst=dst, spi=spi, seq=seq, offset=pos,
                     natt=pos != header_len, outer_header_len=header_len, proto_offset=proto_at,
                     length=length)
