"""The two shapes every source produces and every output consumes.

`Record` is one packet as seen at one capture point; `Event` is one kernel fact. A new source or
output is a new small module that speaks these, never a new shape (see shared/STYLE.md).
Times are wall-clock nanoseconds since the epoch everywhere: sources on other clocks (BPF's
monotonic clock) convert before they build an Event.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(slots=True)
class Record:
    """One packet at one capture point (an NFLOG message, or a frame read from a pcap).

    `payload` is the packet from its network header on (IPv4/IPv6), as the kernel logged it,
    possibly cut at the snap length (`caplen` < `length`). `nflog` keeps the whole NFLOG
    message body (nfgenmsg + TLVs) when the source had one, so writers can emit LINKTYPE_NFLOG
    without re-encoding. Fields the source did not give are None.
    """

    time_ns: int
    point: str
    payload: bytes | memoryview
    family: int = 0  # AF_INET (2) / AF_INET6 (10); 0 unknown
    length: int = 0  # original packet length (0: same as len(payload))
    hook: int | None = None  # NF_INET_* hook number
    indev: int | None = None  # ifindex
    outdev: int | None = None
    mark: int | None = None
    uid: int | None = None
    gid: int | None = None
    seq: int | None = None  # nflog per-instance sequence number
    seq_global: int | None = None
    netns: int | None = None  # inode of the netns the packet was captured in
    nflog: bytes | memoryview | None = None
    comment: str | None = None

    @property
    def caplen(self) -> int:
        return len(self.payload)

    @property
    def wire_length(self) -> int:
        return self.length or len(self.payload)


@dataclass(slots=True)
class Event:
    """One kernel fact: a probe firing, a drop, a counter delta, an SA change or snapshot.

    `source` names the producer (`kprobe`, `kfree_skb`, `xfrm_stat`, `xfrm_monitor`, `sa_snapshot`,
    `capture`); `kind` what happened (`xfrm_input`, `xfrm_output`, `drop`, `counter`, `sa-new`,
    `sa-delete`, `sa-update`, `expire`, `acquire`, `policy-new`, ...). `ret` is a kernel return code,
    `reason` a named cause (a drop reason, a counter name). `tuple` is the outer addresses and
    protocol where known: {"src", "dst", "proto", "sport", "dport"}; `inner` the same for the
    inner packet. `detail` is source specific and JSON-serialisable.
    """

    time_ns: int
    source: str
    kind: str
    netns: int | None = None
    spi: int | None = None
    seq: int | None = None
    ret: int | None = None
    reason: str | None = None
    tuple: dict[str, Any] | None = None
    inner: dict[str, Any] | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """One JSON line, fields that say nothing left out. Built from the fields directly:
        dataclasses.asdict deep-copies every nested dict first (30 us an event, the largest
        cost of a kprobe event on its way to the log)."""
        d = {}
        for name in _EVENT_FIELDS:
            v = getattr(self, name)
            if v is not None and v != {}:
                d[name] = v
        return json_line(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known.setdefault("detail", {})
        return cls(**known)


class EncodedEvent:
    """An Event already as its events-log line (what Event.to_json gives for it), with its kind
    for the producer's counts: a source whose events come by the thousand a second encodes them
    straight from what it read (bpf/kprobes.py), skipping the Event object and the JSON encoder.
    Anything that only logs events takes either."""

    __slots__ = ("kind", "line")

    def __init__(self, kind: str, line: str) -> None:
        self.kind, self.line = kind, line

    def to_json(self) -> str:
        return self.line


_EVENT_FIELDS = tuple(f.name for f in fields(Event))
# one encoder for every event: json.dumps builds a new one per call when given options
json_line = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode
