"""Joined packets as scapy objects, for notebook users: the outer packet as captured and, when
the keys decrypt it, the inner one, so `p.scapy().inner.show()` works on any packet of a report.

scapy is an optional extra (`pip install 'ipsec-capture[scapy]'`): it is imported here on demand
only, never by the join or the reports (scapy parses ~5k packets a second, the join ~1M).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ipsec_capture.decrypt.decoder import NOT_ESP, EspDecoder
from ipsec_capture.errors import UserError


@dataclass(frozen=True, slots=True)
class ScapyPair:
    """`outer`: the captured IP packet (ESP still encrypted, or a cleartext point's packet);
    `inner`: the decrypted inner packet (tunnel: the inner IP packet; transport: the packet
    rebuilt around the payload), None when there is no ESP or it did not decrypt; `status`: the
    decoder's result (ok, icv-fail, no-sa, ...), None for a packet without ESP."""

    outer: Any
    inner: Any | None
    status: str | None


def _scapy_ip(payload: bytes) -> Any:
    try:
        from scapy.layers.inet import IP
        from scapy.layers.inet6 import IPv6
        from scapy.packet import Raw
    except ModuleNotFoundError as err:
        raise UserError("Packet.scapy() needs scapy: pip install 'ipsec-capture[scapy]'") from err
    version = payload[0] >> 4 if payload else 0
    return IP(payload) if version == 4 else IPv6(payload) if version == 6 else Raw(payload)


def decoder_for(keys: EspDecoder | Iterable[Any] | Any | None) -> EspDecoder | None:
    """An EspDecoder from what a caller has at hand: a decoder, a loaded bundle (its key file),
    or SAs."""
    if keys is None or isinstance(keys, EspDecoder):
        return keys
    decoder = getattr(keys, "decoder", None)
    if isinstance(decoder, EspDecoder):
        return decoder
    return EspDecoder(keys)


def scapy_pair(payload: bytes | memoryview, keys: EspDecoder | Iterable[Any] | Any | None = None
               ) -> ScapyPair:
    """The scapy view of one captured packet, decrypted with `keys` when they match its SA."""
    data = bytes(payload)
    decoder = decoder_for(keys)
    if decoder is None:
        return ScapyPair(_scapy_ip(data), None, None)
    result = decoder.decrypt(data)
    if result.status == NOT_ESP:
        return ScapyPair(_scapy_ip(data), None, None)
    inner = _scapy_ip(result.inner) if result.inner else None
    return ScapyPair(_scapy_ip(data), inner, result.status)

