"""Fold the stream of joined Packets into what the reports show: the per-SA table, drops grouped
by cause with their evidence, time series for the plots, and a bounded packet list.

Everything here grows with SAs, causes and seconds of capture, never with packets: the packet
list keeps at most `packet_limit` rows (the report says how many more matched).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ipsec_capture.wire import SECOND

from .causes import CAUSES
from .diagnosis import fmt_time
from .join import Joiner
from .packet import FAILED, OK, UNKNOWN, Packet
from .sahistory import SaLife


@dataclass(slots=True)
class ReportFilter:
    """Which packets the per-packet list shows (`report --spi/--verdict/--cause/--direction`)."""

    spi: int | None = None
    verdict: str | None = None
    cause: str | None = None
    direction: str | None = None

    def __call__(self, p: Packet) -> bool:
        return ((self.spi is None or p.spi == self.spi)
                and (self.verdict is None or p.verdict == self.verdict)
                and (self.cause is None or p.cause == self.cause)
                and (self.direction is None or p.direction == self.direction))


@dataclass(slots=True)
class SaRow:
    spi: int | None
    direction: str
    src: str
    dst: str
    netns: int | None = None
    packets: int = 0
    bytes: int = 0
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    unknown: int = 0
    first_ns: int = 0
    last_ns: int = 0
    algorithm: str = ""
    mode: str = ""
    rekeys: int = 0
    created_ns: int | None = None
    deleted_ns: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"spi": None if self.spi is None else f"0x{self.spi:08x}", "direction": self.direction,
                "src": self.src, "dst": self.dst, "netns": self.netns, "packets": self.packets,
                "bytes": self.bytes, "ok": self.ok, "failed": dict(sorted(self.failed.items())),
                "unknown": self.unknown, "first_ns": self.first_ns, "last_ns": self.last_ns,
                "algorithm": self.algorithm, "mode": self.mode, "rekeys": self.rekeys,
                "created_ns": self.created_ns, "deleted_ns": self.deleted_ns}


@dataclass(slots=True)
class DropGroup:
    """Failed packets of one cause and SPI (or kernel-only evidence with no packet captured)."""

    cause: str
    spi: int | None
    direction: str
    packets: int = 0
    first_ns: int = 0
    last_ns: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    example: list[str] = field(default_factory=list)
    evidence: str = ""

    def to_dict(self) -> dict[str, Any]:
        c = CAUSES.get(self.cause)
        return {"cause": self.cause, "summary": c.summary if c else "", "hint": c.hint if c else "",
                "spi": None if self.spi is None else f"0x{self.spi:08x}", "direction": self.direction,
                "packets": self.packets, "first_ns": self.first_ns, "last_ns": self.last_ns,
                "counters": dict(self.counters), "evidence": self.evidence, "example": list(self.example)}


class Summary:
    """Add Packets as they come (`add`), then `finish(joiner)` once the join is exhausted."""

    def __init__(self, packet_filter: ReportFilter | None = None, packet_limit: int = 1000,
                 bucket_ns: int = SECOND // 100, max_buckets: int = 1000) -> None:
        self.filter = packet_filter or ReportFilter()
        self.packet_limit = packet_limit
        self.bucket_ns = bucket_ns
        self.max_buckets = max_buckets
        # (SPI, direction, netns, which state): SAs sharing an SPI (Cilium) get a row each. Inbound
        # the packet's mark tells the states apart as the kernel does (and keeps a deleted state's
        # late packets in its row); outbound the joined SA life does (by destination)
        self.rows: dict[tuple[int | None, str, int | None, int], SaRow] = {}
        self._row_life: dict[tuple[int | None, str, int | None, int], SaLife] = {}
        self.drops: dict[tuple[str, int | None, str], DropGroup] = {}
        self.packets: list[Packet] = []
        self.matched = 0
        self.rate: dict[str, dict[int, int]] = {}  # SA label -> bucket -> packets
        # (SPI, direction, netns) -> its row and its label's rate series
        self._row_rate: dict[tuple[int | None, str, int | None, int], tuple[SaRow, dict[int, int]]] = {}
        self.errors: dict[str, dict[int, int]] = {}  # cause -> bucket -> packets
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        # Per packet, two comparisons stand for the arithmetic they save: the time from which the
        # buckets are too many ((t - first) // bucket_ns > max_buckets), and whether the packet
        # list has room (limit <= 0: unbounded).
        self._coarse_at = 0
        self._room = True

    @property
    def filter(self) -> ReportFilter:
        return self._filter

    @filter.setter
    def filter(self, packet_filter: ReportFilter) -> None:
        self._filter = packet_filter
        # the default filter passes everything: add() then calls nothing per packet
        self._everything = type(packet_filter) is ReportFilter and packet_filter == ReportFilter()

    @property
    def totals(self) -> dict[str, int]:
        """Packets per verdict, from the rows (which count them anyway)."""
        rows = self.rows.values()
        return {OK: sum(r.ok for r in rows), FAILED: sum(sum(r.failed.values()) for r in rows),
                UNKNOWN: sum(r.unknown for r in rows)}

    def add(self, p: Packet) -> None:
        verdict = p.verdict
        t = p.time_ns
        first = self.first_ns
        if first is None or t < first:
            self.first_ns = t
            self._coarse_at = t + (self.max_buckets + 1) * self.bucket_ns
        last = self.last_ns
        if last is None or t > last:
            self.last_ns = t
        sa = p.sa
        direction = p.direction
        key = (p.spi, direction, p.netns, (p.record.mark or 0) if direction == "in" else
               0 if sa is None else id(sa))
        found = self._row_rate.get(key)
        if found is None:
            found = self._new_row(p, key, t)
        row, rate = found
        row.packets += 1
        row.bytes += p.length
        row.last_ns = t
        if t >= self._coarse_at:
            self._coarser()
        bucket = t // self.bucket_ns
        if verdict == OK:
            row.ok += 1
        elif verdict == FAILED:
            cause = p.cause or "other"
            row.failed[cause] = row.failed.get(cause, 0) + 1
            series = self.errors.setdefault(cause, {})
            series[bucket] = series.get(bucket, 0) + 1
            self._drop(p, cause)
        else:
            row.unknown += 1
        rate[bucket] = rate.get(bucket, 0) + 1
        if self._everything or self._filter(p):
            self.matched += 1
            if self._room:
                self.packets.append(p)
                self._room = self.packet_limit <= 0 or len(self.packets) < self.packet_limit

    def _new_row(self, p: Packet, key: tuple[int | None, str, int | None, int], t: int
                 ) -> tuple[SaRow, dict[int, int]]:
        """The first packet of an SA (and direction, netns): its row, and its rate series, which
        rows of the same label share (kept with the row: the label is a string to build)."""
        row = self.rows[key] = SaRow(p.spi, p.direction, p.src, p.dst, p.netns, first_ns=t)
        if p.sa is not None:
            self._row_life[key] = p.sa
        found = self._row_rate[key] = (row, self.rate.setdefault(self.label(p.spi, p.direction), {}))
        return found

    def _coarser(self) -> None:
        """Ten times wider buckets, so the series stay bounded however long the capture. Each
        series is rebuilt in place: the rows hold their rate series."""
        self.bucket_ns *= 10
        self._coarse_at = self.first_ns + (self.max_buckets + 1) * self.bucket_ns  # type: ignore[operator]
        for group in (self.rate, self.errors):
            for series in group.values():
                merged: dict[int, int] = {}
                for b, n in series.items():
                    merged[b // 10] = merged.get(b // 10, 0) + n
                series.clear()
                series.update(merged)

    @staticmethod
    def label(spi: int | None, direction: str) -> str:
        return f"{direction} {'cleartext' if spi is None else f'0x{spi:08x}'}"

    def _drop(self, p: Packet, cause: str) -> None:
        key = (cause, p.spi, p.direction)
        g = self.drops.get(key)
        if g is None:
            g = self.drops[key] = DropGroup(cause, p.spi, p.direction, first_ns=p.time_ns,
                                            example=list(p.evidence))
        g.packets += 1
        g.last_ns = p.time_ns

    def finish(self, joiner: Joiner) -> None:
        """Add what only the end of the join knows: SA facts, counters per group, evidence lines,
        and kernel failures that no captured packet explains."""
        history = joiner.history
        for key, row in self.rows.items():
            if row.spi is None:
                continue
            own = self._row_life.get(key)
            lives = [own] if own is not None else [
                life for life in history.by_spi.get(row.spi, ())
                if (row.netns is None or life.netns is None or life.netns == row.netns)
                and (key[3] == 0 or life.dst == row.dst)]
            if lives:
                life = lives[-1]
                row.algorithm, row.mode = life.algorithm, life.mode
                row.created_ns, row.deleted_ns = lives[0].start_ns, lives[-1].end_ns
                row.rekeys = history.rekeys(life)
        for inc in joiner.incidents:
            for spi in inc.spis:
                g = self.drops.get((inc.cause, spi, inc.direction))
                if g is not None:
                    g.counters[inc.name] = g.counters.get(inc.name, 0) + inc.delta
            clear = inc.attributed - sum(inc.spis.values())  # cleartext packets it was given to
            g = self.drops.get((inc.cause, None, inc.direction)) if clear > 0 else None
            if g is not None:
                g.counters[inc.name] = g.counters.get(inc.name, 0) + clear
            rest = inc.delta - inc.attributed if inc.source == "xfrm_stat" else \
                (0 if inc.spis and (inc.cause, next(iter(inc.spis)), inc.direction) in self.drops else 1)
            if rest <= 0:
                continue
            drop_key = (inc.cause, None, inc.direction)
            g = self.drops.get(drop_key)
            if g is None:
                g = self.drops[drop_key] = DropGroup(inc.cause, None, inc.direction, first_ns=inc.time_ns)
            g.last_ns = max(g.last_ns, inc.time_ns)
            g.counters[inc.name] = g.counters.get(inc.name, 0) + rest
            if inc.detail and inc.detail not in g.example and len(g.example) < 5:
                g.example.append(inc.detail)
        for g in self.drops.values():
            g.evidence = self._evidence(g, joiner)

    @staticmethod
    def _evidence(g: DropGroup, joiner: Joiner) -> str:
        parts = []
        counters = ", ".join(f"{k} +{v}" for k, v in sorted(g.counters.items()))
        if g.spi is None:
            parts.append(f"{g.packets} cleartext packet{'s' if g.packets != 1 else ''} never became ESP"
                         if g.packets else "no captured packet explains it")
            if counters:
                parts.append(counters)
            parts.extend(e for e in g.example if not any(e.startswith(c) for c in counters.split(", ") if c))
            return "; ".join(parts)
        gone = joiner.history.deleted_before(g.spi, g.first_ns) if g.cause == "no-state" else None
        if gone is not None and gone.end_ns is not None:
            parts.append(f"SA spi 0x{g.spi:08x} ({gone.src} -> {gone.dst}) deleted at "
                         f"{fmt_time(gone.end_ns)}, "
                         f"{g.packets} packet{'s' if g.packets != 1 else ''} for it dropped after")
        else:
            parts.append(f"{g.packets} packet{'s' if g.packets != 1 else ''} for spi 0x{g.spi:08x} "
                         f"failed ({g.cause})")
        if counters:
            parts.append(counters)
        return ", ".join(parts)


def drop_spi_label(group: dict[str, Any]) -> str:
    """The SPI column of a drop group (JSON form): its SPI, cleartext packets, or kernel-only."""
    return group["spi"] or ("cleartext" if group["packets"] else "(no packet)")
