"""The ESP/cleartext matcher: which cleartext records are the same packet as an ESP record.

Keys, best first: a hash of the inner packet's addresses and L4 bytes when our decryption (keys)
gives the inner packet; else (transport mode) outer = inner addresses and IPv4 ID; else the
nearest unmatched packet of the same direction within `clear_window_ns`. A cleartext record
folded into its ESP packet is `absorbed` (the ESP packet's `clear` lists its points); the same
cleartext packet at its next point (filter-out, then mangle-post-out) becomes one packet.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

from ipsec_capture.decrypt.decoder import DECRYPTED

from .packet import CLEAR, ESP, Packet

_U16 = struct.Struct("!H")

# where the transport checksum sits, per protocol (TCP, UDP, ICMP, ICMPv6)
_CSUM_AT = {6: 16, 17: 6, 1: 2, 58: 2}


def _l4_key_bytes(proto: int, l4: bytes | memoryview) -> bytes:
    """L4 bytes with the checksum left out: the kernel logs outbound cleartext before the checksum
    is completed (CHECKSUM_PARTIAL, seen on IPv6 UDP over veth), ESP carries the finished one."""
    at = _CSUM_AT.get(proto)
    if at is None or len(l4) < at + 2:
        return bytes(l4)
    return bytes(l4[:at]) + bytes(l4[at + 2:])


def inner_key(pkt: bytes | memoryview) -> int | None:
    """Hash of the addresses and L4 bytes: the same for the inner packet we decrypted and the
    cleartext the kernel logged, whatever TTL/checksum/length fixes happened in between."""
    if len(pkt) < 20:
        return None
    v = pkt[0] >> 4
    if v == 4:
        ihl = (pkt[0] & 0x0F) * 4
        end = _U16.unpack_from(pkt, 2)[0] or len(pkt)
        return hash(bytes(pkt[12:20]) + _l4_key_bytes(pkt[9], pkt[ihl:end]))
    if v == 6 and len(pkt) >= 40:
        return hash(bytes(pkt[8:40]) + _l4_key_bytes(pkt[6], pkt[40:40 + _U16.unpack_from(pkt, 4)[0]]))
    return None


def id_key(pkt: bytes | memoryview) -> int | None:
    """Transport mode without keys: outer and inner share addresses and the IPv4 ID."""
    if len(pkt) >= 20 and pkt[0] >> 4 == 4:
        return hash((bytes(pkt[12:20]), _U16.unpack_from(pkt, 4)[0]))
    return None


class ClearMatcher:
    """Matches the join's pending ESP and cleartext packets. Shares the join's `pending` deque
    (arrival order) and counts matches into `stats.clear_matched`."""

    def __init__(self, pending: deque[Packet], stats: Any, decoder: Any, clear_window_ns: int) -> None:
        self.pending = pending
        self.stats = stats
        self.decoder = decoder
        self.clear_window_ns = clear_window_ns
        self.esp_wait: dict[int, Packet] = {}  # clear key -> ESP packet awaiting its cleartext
        self.clear_wait: dict[int, list[Packet]] = {}  # clear key -> cleartext awaiting its ESP
        # Without keys, an ESP packet's clear key (addresses + IPv4 ID) only serves a cleartext
        # record: until the first one arrives, it is left unbuilt (see key_pending_esp).
        self.lazy_keys = decoder is None
        self.clear_out = 0  # outbound cleartext packets pending: none, no nearest-match scan

    def esp(self, p: Packet) -> None:
        """A new ESP packet: decrypt it when there are keys, then fold in the cleartext waiting
        for it, or wait for its cleartext."""
        ckey = None
        if self.decoder is not None:
            res = self.decoder.decrypt(p.record.payload)
            p.decrypt = res.status
            inner = res.inner
            if inner is not None:
                ckey = inner_key(inner)
        elif self.lazy_keys:
            return  # no cleartext seen yet: nothing waits for this packet, nothing to match
        if ckey is None:
            ckey = id_key(p.record.payload)
        p.key = ckey
        if ckey is not None:
            waiting = self.clear_wait.pop(ckey, None)
            if waiting:
                for c in waiting:
                    self.absorb(p, c)
                return
            self.esp_wait[ckey] = p
        if p.direction == "out" and not p.clear and self.clear_out:
            self._absorb_nearest(p)

    def clear(self, c: Packet) -> None:
        """A new cleartext packet (not yet pending): fold it into its ESP packet, into its own
        first point's record, or let it wait."""
        if self.lazy_keys:
            self.key_pending_esp()
        self._match(c)
        if c.direction == "out":
            self.clear_out += 1

    def _match(self, c: Packet) -> None:
        payload = c.record.payload
        keys = [k for k in ((inner_key(payload) if self.decoder is not None else None), id_key(payload))
                if k is not None]
        for k in keys:
            esp = self.esp_wait.get(k)
            if esp is not None:
                self.absorb(esp, c)
                return
        if c.direction == "in":
            # inbound cleartext follows its ESP packet within microseconds: the nearest one
            for p in reversed(self.pending):
                if c.time_ns - p.time_ns > self.clear_window_ns:
                    break
                if p.kind == ESP and p.direction == "in" and p.decrypt not in DECRYPTED and \
                        all(pt != c.point for pt, _ in p.clear):
                    self.absorb(p, c)
                    return
        c.key = keys[0] if keys else None
        if c.key is not None:
            waiting = self.clear_wait.setdefault(c.key, [])
            first = waiting[-1] if waiting else None
            if first is not None and first.point != c.point and all(pt != c.point for pt, _ in first.also) \
                    and c.time_ns - first.time_ns <= self.clear_window_ns:
                # the same packet at its next point (filter-out then mangle-post-out): one packet
                c.absorbed = True
                if first.also:
                    first.also.append((c.point, c.time_ns))
                else:
                    first.also = [(c.point, c.time_ns)]
                return
            waiting.append(c)

    def key_pending_esp(self) -> None:
        """The first cleartext record: give the ESP packets still pending the clear keys they were
        left without, in arrival order (the latest of a key wins, as if built on arrival)."""
        self.lazy_keys = False
        esp_wait = self.esp_wait
        for p in self.pending:
            if p.kind == ESP:
                p.key = id_key(p.record.payload)
                if p.key is not None:
                    esp_wait[p.key] = p

    def _absorb_nearest(self, p: Packet) -> None:
        """Outbound ESP without a key match: the most recent unmatched cleartext just before it."""
        for c in reversed(self.pending):
            if p.time_ns - c.time_ns > self.clear_window_ns:
                break
            if c.kind == CLEAR and c.direction == "out" and not c.absorbed and \
                    (self.decoder is None or p.decrypt not in DECRYPTED):
                self.absorb(p, c)
                for other in reversed(self.pending):  # its other outbound points, same packet
                    if other.kind == CLEAR and not other.absorbed and other.key == c.key and other.key:
                        self.absorb(p, other)
                return

    def absorb(self, p: Packet, c: Packet) -> None:
        """Cleartext `c` is ESP packet `p` before encryption or after decryption."""
        c.absorbed = True
        if p.clear:
            p.clear.append((c.point, c.time_ns))
            p.clear.extend(c.also)
        else:
            p.clear = [(c.point, c.time_ns), *c.also]
        self.stats.clear_matched += 1 + len(c.also)
        if c.key is not None:
            lst = self.clear_wait.get(c.key)
            if lst and c in lst:
                lst.remove(c)
                if not lst:
                    del self.clear_wait[c.key]

    def forget_esp(self, p: Packet) -> None:
        """ESP packet p left the window: no cleartext can find it any more."""
        if p.key is not None and self.esp_wait.get(p.key) is p:
            del self.esp_wait[p.key]

    def forget_clear(self, p: Packet) -> None:
        """Cleartext packet p left the window."""
        if p.direction == "out":
            self.clear_out -= 1
        if p.key is not None:
            lst = self.clear_wait.get(p.key)
            if lst and p in lst:
                lst.remove(p)
                if not lst:
                    del self.clear_wait[p.key]
