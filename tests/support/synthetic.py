"""Synthetic but wire-correct traffic for the correlation tests and bench: IPv4 ESP packets (real
AES-GCM tunnel-mode ESP when a key is given, opaque ciphertext otherwise), their cleartext, and the
kernel Events a capture of them would log.

Lives in the room (not in tests/) because bench/correlate.py generates millions of the same
packets; it writes only bytes and models, never files or sockets.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from ipsec_capture.models import Event, Record

IPPROTO_IPIP = 4  # <netinet/in.h>
IPPROTO_UDP = 17
IPPROTO_ESP = 50
NF_INET_PRE_ROUTING, NF_INET_LOCAL_OUT = 0, 3  # <linux/netfilter.h>
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_ESP = struct.Struct("!II")


def ip4(src: str, dst: str, proto: int, payload: bytes, ident: int = 0, ttl: int = 64) -> bytes:
    head = _IP4.pack(0x45, 0, 20 + len(payload), ident & 0xFFFF, 0x4000, ttl, proto, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    total = sum(struct.unpack("!10H", head))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return head[:10] + struct.pack("!H", ~total & 0xFFFF) + head[12:] + payload


def udp4(src: str, dst: str, ident: int, data: bytes, sport: int = 40000, dport: int = 9) -> bytes:
    return ip4(src, dst, IPPROTO_UDP, _UDP.pack(sport, dport, 8 + len(data), 0) + data, ident)


def esp4(src: str, dst: str, spi: int, seq: int, inner: bytes, key: bytes | None = None,
         ident: int = 0) -> bytes:
    """A tunnel-mode ESP packet carrying `inner`: sealed with rfc4106(gcm(aes)) (16-byte ICV) when
    `key` (AES key + 4-byte salt) is given, else opaque bytes of the right shape."""
    pad = -(len(inner) + 2) % 4
    plain = inner + bytes(range(1, pad + 1)) + bytes((pad, IPPROTO_IPIP))
    head = _ESP.pack(spi, seq)
    if key is None:
        body = seq.to_bytes(8, "big") + os.urandom(len(plain) + 16)
    else:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        iv = seq.to_bytes(8, "big")
        body = iv + AESGCM(key[:-4]).encrypt(key[-4:] + iv, plain, head)
    return ip4(src, dst, IPPROTO_ESP, head + body, ident)


def sa_dict(spi: int, src: str, dst: str, reqid: int = 1, mode: str = "tunnel") -> dict[str, Any]:
    """What xfrm_monitor / sa_snapshot events carry in detail["sa"] (SA.to_dict(keys=False))."""
    from ipsec_capture.xfrm.sa import SA, Algorithm

    sa = SA(src=src, dst=dst, spi=spi, mode=mode, family=socket.AF_INET, reqid=reqid,
            aead=Algorithm("rfc4106(gcm(aes))", b"", icv_bits=128))
    return sa.to_dict(keys=False)


def gcm_sa(spi: int, src: str, dst: str, key: bytes, mode: str = "tunnel") -> Any:
    from ipsec_capture.xfrm.sa import SA, Algorithm

    return SA(src=src, dst=dst, spi=spi, mode=mode, family=socket.AF_INET,
              aead=Algorithm("rfc4106(gcm(aes))", key, icv_bits=128))


@dataclass(slots=True)
class Host:
    """One end of a tunnel as a capture sees it: builds its Records and Events in time order."""

    netns: int | None = None
    records: list[Record] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def esp_in(self, t: int, packet: bytes) -> None:
        self.records.append(Record(t, "raw-pre-esp", packet, socket.AF_INET, hook=NF_INET_PRE_ROUTING,
                                   netns=self.netns))

    def esp_out(self, t: int, packet: bytes) -> None:
        self.records.append(Record(t, "raw-out-esp", packet, socket.AF_INET, hook=NF_INET_LOCAL_OUT,
                                   netns=self.netns))

    def clear(self, t: int, point: str, packet: bytes) -> None:
        hook = NF_INET_LOCAL_OUT if "out" in point else NF_INET_PRE_ROUTING
        self.records.append(Record(t, point, packet, socket.AF_INET, hook=hook, netns=self.netns))

    def event(self, t: int, source: str, kind: str, **kw: Any) -> Event:
        ev = Event(t, source, kind, netns=self.netns, **kw)
        self.events.append(ev)
        return ev

    def sa_snapshot(self, t: int, spi: int, src: str, dst: str, reqid: int = 1) -> None:
        self.event(t, "sa_snapshot", "sa", spi=spi, detail={"sa": sa_dict(spi, src, dst, reqid)})

    def sa_change(self, t: int, kind: str, spi: int, src: str, dst: str, reqid: int = 1) -> None:
        self.event(t, "xfrm_monitor", kind, spi=spi, tuple={"src": src, "dst": dst, "proto": IPPROTO_ESP},
                   detail={"sa": sa_dict(spi, src, dst, reqid)})

    def counter(self, t: int, name: str, delta: int, value: int) -> None:
        self.event(t, "xfrm_stat", "counter", reason=name, detail={"delta": delta, "value": value})

    def sorted(self) -> tuple[list[Record], list[Event]]:
        self.records.sort(key=lambda r: r.time_ns)
        self.events.sort(key=lambda e: e.time_ns)
        return self.records, self.events
