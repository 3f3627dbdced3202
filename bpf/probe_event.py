"""The probes' one event shape: `struct ipsec_event`, shared by both BPF programs (xfrm_probes.c
for bcc, xfrm_probes.bpf.c for CO-RE, field for field), mirrored by EVENT here, and its decoding
into Events (STYLE: one event shape, many sources; tests/test_bpf_kprobes.py checks the C against
EVENT). Packet events (nearly every sample) go straight to their events-log line
(encode_packet_event); the rare kinds take decode(). Either loader gives identical log lines.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

from ipsec_capture.models import EncodedEvent, Event, json_line
from ipsec_capture.wire import IPPROTO_ESP, XFRM_MODES

from .kallsyms import Kallsyms

SOURCE = "kprobe"
# struct ipsec_event in xfrm_probes.c and xfrm_probes.bpf.c, field for field
EVENT = struct.Struct("<QQQqIIIIIIIIIiHHBBBB16s16s16s16s")
EVENT_SIZE = 144
assert EVENT.size == EVENT_SIZE

# enum in xfrm_probes.c -> Event.kind
KINDS = {1: "xfrm_input", 2: "xfrm_output", 3: "notfound", 4: "icvfail", 5: "replay",
         6: "replay-overflow", 7: "drop"}
F_RESUMED = 1
F_ESN = 2
AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
MODES = XFRM_MODES

_addrs: dict[tuple[int, bytes], str | None] = {}


def _addr(family: int, raw: bytes) -> str | None:
    """An address as text; remembered, since a tunnel's few addresses come in every event."""
    key = (family, raw)
    text = _addrs.get(key, False)
    if text is False:
        if family == AF_INET:
            text = str(ipaddress.IPv4Address(raw[:4]))
        elif family == AF_INET6:
            text = str(ipaddress.IPv6Address(raw))
        else:
            text = None
        if len(_addrs) < 4096:
            _addrs[key] = text
    return text  # type: ignore[return-value]


def decode(raw: bytes, wall_minus_mono: int, reasons: dict[int, str],
           ksyms: Kallsyms | None) -> Event:
    """One perf sample -> Event (pure: the lab test feeds it real samples, unit tests fake ones)."""
    (ts, skb, location, ret, kind, netns, ifindex, mark, spi, seq, seq_hi, reason, length, encap,
     family, protocol, l4proto, mode, sa_family, flags, saddr, daddr, sa_saddr, sa_daddr) = \
        EVENT.unpack_from(raw)
    name = KINDS.get(kind, f"kind-{kind}")
    detail: dict[str, Any] = {"skb": f"0x{skb:x}", "ifindex": ifindex, "mark": mark}
    ev = Event(time_ns=ts + wall_minus_mono, source=SOURCE, kind=name, netns=netns or None, detail=detail)
    if name == "drop":
        ev.source = "kfree_skb"
        ev.reason = reasons.get(reason, str(reason))
        detail.update(location=ksyms.symbolize(location) if ksyms else f"0x{location:x}",
                      protocol=protocol, skbaddr=f"0x{skb:x}", via="bpf")
        del detail["skb"]
        return ev
    pkt = {"src": _addr(family, saddr), "dst": _addr(family, daddr), "proto": l4proto} if family else None
    sa = {"src": _addr(sa_family, sa_saddr), "dst": _addr(sa_family, sa_daddr), "proto": IPPROTO_ESP} \
        if sa_family and any(sa_daddr) else None
    ev.spi = socket.ntohl(spi) or None
    ev.seq = None if flags & F_RESUMED else seq
    detail["len"] = length
    if flags & F_ESN:
        detail["seq_hi"] = seq_hi
    if name == "xfrm_input":
        ev.ret = ret
        ev.tuple = pkt
        detail["encap"] = encap
        if flags & F_RESUMED:
            detail["resumed"] = True  # after async crypto: the first pass had the SPI and seq
    elif name == "xfrm_output":
        ev.ret = ret
        ev.tuple, ev.inner = sa, pkt
        detail["mode"] = MODES.get(mode, str(mode))
    elif name == "notfound":
        ev.tuple = pkt
    else:  # icvfail, replay, replay-overflow: the SA names the tunnel
        ev.tuple = sa or pkt
        if name == "replay-overflow":
            ev.inner = pkt
    return ev


_flows: dict[tuple[int, bytes, bytes, int], str] = {}


def _flow(family: int, saddr: bytes, daddr: bytes, proto: int) -> str:
    """The JSON of a tuple {"dst", "proto", "src"}, remembered: a tunnel's few flows come in
    every event."""
    key = (family, saddr, daddr, proto)
    text = _flows.get(key)
    if text is None:
        text = json_line({"dst": _addr(family, daddr), "proto": proto, "src": _addr(family, saddr)})
        if len(_flows) < 4096:
            _flows[key] = text
    return text


def encode_packet_event(raw: bytes, wall_minus_mono: int) -> EncodedEvent | None:
    """An xfrm_input / xfrm_output sample straight to the line `decode(raw, ...).to_json()`
    gives (keys sorted, fields that say nothing left out); None for the other kinds, which take
    decode()."""
    (ts, skb, _location, ret, kind, netns, ifindex, mark, spi, seq, seq_hi, _reason, length, encap,
     family, _protocol, l4proto, mode, sa_family, flags, saddr, daddr, sa_saddr, sa_daddr) = \
        EVENT.unpack_from(raw)
    esn = f',"seq_hi":{seq_hi}' if flags & F_ESN else ""
    if kind == 1:
        name = "xfrm_input"
        resumed = ',"resumed":true' if flags & F_RESUMED else ""
        detail = (f'{{"encap":{encap},"ifindex":{ifindex},"len":{length},"mark":{mark}{resumed}{esn},'
                  f'"skb":"0x{skb:x}"}}')
        inner = ""
        tup = f',"tuple":{_flow(family, saddr, daddr, l4proto)}' if family else ""
    elif kind == 2:
        name = "xfrm_output"
        detail = (f'{{"ifindex":{ifindex},"len":{length},"mark":{mark},'
                  f'"mode":{json_line(MODES.get(mode, str(mode)))}{esn},"skb":"0x{skb:x}"}}')
        inner = f',"inner":{_flow(family, saddr, daddr, l4proto)}' if family else ""
        tup = f',"tuple":{_flow(sa_family, sa_saddr, sa_daddr, IPPROTO_ESP)}' \
            if sa_family and any(sa_daddr) else ""
    else:
        return None
    host_spi = socket.ntohl(spi)
    ns = f',"netns":{netns}' if netns else ""
    sequence = "" if flags & F_RESUMED else f',"seq":{seq}'
    spi_text = f',"spi":{host_spi}' if host_spi else ""
    return EncodedEvent(name, f'{{"detail":{detail}{inner},"kind":"{name}"{ns},"ret":{ret}{sequence},'
                              f'"source":"{SOURCE}"{spi_text},"time_ns":{ts + wall_minus_mono}{tup}}}')
