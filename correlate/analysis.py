"""One analysis of one bundle: run the join, fold it into a Summary, and give the report's data as
one JSON-ready dict (the stable schema every output renders from).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ipsec_capture.wire import SECOND

from .bundle import Inputs
from .causes import CAUSES
from .join import Joiner
from .packet import Packet
from .summary import ReportFilter, Summary

SCHEMA = "ipsec-capture-report"
SCHEMA_VERSION = 1


def joined(inputs: Inputs, window_ns: int = 3 * SECOND) -> tuple[Joiner, Iterator[Packet]]:
    """A fresh join over the bundle: (joiner, packets). The joiner's incidents and history are
    complete once the iterator is exhausted."""
    joiner = Joiner(sas=inputs.sas, window_ns=window_ns, header=inputs.header)
    return joiner, joiner.run(inputs.records(), inputs.events())


@dataclass(slots=True)
class Analysis:
    inputs: Inputs
    joiner: Joiner
    summary: Summary

    def to_dict(self) -> dict[str, Any]:
        s, j = self.summary, self.joiner
        st = j.stats
        header = self.inputs.header
        return {
            "schema": SCHEMA, "version": SCHEMA_VERSION,
            "capture": {"name": self.inputs.name, "path": self.inputs.capture_path,
                        "events": self.inputs.events_path, "keys": self.inputs.keys_path,
                        "missing": list(self.inputs.missing), "host": header.get("host"),
                        "kernel": header.get("kernel"), "sources": header.get("sources", []),
                        "first_ns": s.first_ns, "last_ns": s.last_ns},
            "totals": {"records": st.records, "esp": st.esp, "cleartext": st.clear, "ike": st.ike,
                       "other": st.other, "cleartext_matched": st.clear_matched, "events": st.events,
                       "events_matched": st.events_matched, "events_unmatched": dict(st.events_unmatched),
                       "events_other_netns": st.events_other_netns,
                       "packets": sum(s.totals.values()), **s.totals},
            "sas": [r.to_dict() for r in sorted(s.rows.values(), key=lambda r: (r.first_ns, r.direction))],
            "drops": [g.to_dict() for g in sorted(s.drops.values(), key=lambda g: (g.first_ns, g.cause))],
            "incidents": [i.to_dict() for i in j.incidents],
            "sa_history": [life.to_dict() for life in j.history.lives()],
            "timeline": [{"time_ns": t, "text": text} for t, text in sorted(j.timeline)],
            "packets": {"matched": s.matched, "listed": len(s.packets),
                        "rows": [p.to_dict() for p in s.packets]},
            "series": {"bucket_ns": s.bucket_ns,
                       "rate": {k: sorted(v.items()) for k, v in s.rate.items()},
                       "errors": {k: sorted(v.items()) for k, v in s.errors.items()}},
            "capture_stats": dict(st.capture_stats),
            "causes": {name: {"summary": c.summary, "hint": c.hint} for name, c in CAUSES.items()
                       if any(g.cause == name for g in s.drops.values())},
        }


def analyse(inputs: Inputs, packet_filter: ReportFilter | None = None, packet_limit: int = 1000,
            window_ns: int = 3 * SECOND) -> Analysis:
    """Join and summarise the whole bundle in one streaming pass."""
    joiner, packets = joined(inputs, window_ns)
    summary = Summary(packet_filter, packet_limit)
    add = summary.add
    for p in packets:
        add(p)
    summary.finish(joiner)
    return Analysis(inputs, joiner, summary)
