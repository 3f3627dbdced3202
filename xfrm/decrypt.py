"""Decrypt a stream of Records: each ESP packet becomes its inner packet (or stays as it was, with
the reason), every other packet passes untouched, and the results are counted per SA.

Kept apart from the CLI so the correlation code and tests can run the same pipeline on Records
from any source (a pcap, a live capture) without files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from ipsec_capture.xfrm.esp import NO_SA, NOT_ESP, OK, STATUSES, DecryptResult, EspDecoder, esp_header

from ipsec_capture.models import Record

_AF_INET, _AF_INET6 = 2, 10


@dataclass(slots=True)
class SaTally:
    """Results of one SA (or of one unknown SPI)."""

    spi: int
    src: str
    dst: str
    algorithm: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"spi": f"0x{self.spi:08x}", "src": self.src, "dst": self.dst,
                "algorithm": self.algorithm, "counts": dict(self.counts)}


@dataclass(slots=True)
class DecryptSummary:
    """Counts per SA and overall; `not_esp` counts packets passed through untouched."""

    packets: int = 0
    not_esp: int = 0
    per_sa: dict[tuple[str, int], SaTally] = field(default_factory=dict)

    def add(self, result: DecryptResult, packet: bytes | memoryview) -> None:
        self.packets += 1
        if result.status == NOT_ESP:
            self.not_esp += 1
            return
        sa = result.sa
        key = (sa.dst, sa.spi) if sa is not None else ("", result.spi or 0)
        tally = self.per_sa.get(key)
        if tally is None:
            tally = self.per_sa[key] = _tally(result, packet)
        tally.counts[result.status] = tally.counts.get(result.status, 0) + 1

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        out[NOT_ESP] = self.not_esp
        for tally in self.per_sa.values():
            for status, n in tally.counts.items():
                out[status] += n
        return {k: v for k, v in out.items() if v}

    def to_dict(self) -> dict[str, Any]:
        return {"packets": self.packets, "totals": self.totals(),
                "sas": [t.to_dict() for t in self.per_sa.values()]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def format_text(self) -> str:
        """One line per SA, then the totals: what a user reads after `decrypt`."""
        lines = []
        for t in sorted(self.per_sa.values(), key=lambda t: (t.dst, t.spi)):
            counts = ", ".join(f"{k} {v}" for k, v in sorted(t.counts.items(), key=lambda kv: -kv[1]))
            alg = f" {t.algorithm}" if t.algorithm else ""
            lines.append(f"SPI 0x{t.spi:08x} {t.src} -> {t.dst}{alg}: {counts}")
        totals = ", ".join(f"{k} {v}" for k, v in self.totals().items())
        lines.append(f"{self.packets} packets: {totals or 'none'}")
        return "\n".join(lines)


def _tally(result: DecryptResult, packet: bytes | memoryview) -> SaTally:
    sa = result.sa
    if sa is not None:
        alg = sa.aead or sa.enc
        name = alg.name if alg else ""
        if sa.auth is not None and sa.aead is None:
            name += f"+{sa.auth.name}" if name else sa.auth.name
        return SaTally(sa.spi, sa.src, sa.dst, name)
    head = esp_header(packet)  # no SA: name the addresses from the packet itself
    src, dst = (head.src, head.dst) if head else ("?", "?")
    return SaTally(result.spi or 0, src, dst, "unknown SA" if result.status == NO_SA else "")


def comment_for(result: DecryptResult) -> str | None:
    """The packet comment in OUT: SPI, sequence number and result (None for non-ESP)."""
    if result.status == NOT_ESP:
        return None
    text = f"ESP SPI 0x{(result.spi or 0):08x} seq {result.seq}: {result.status}"
    if result.status == OK and result.inner is not None:
        text += " (decrypted, inner packet)" if result.sa and result.sa.mode == "tunnel" \
            else " (decrypted, transport payload under the outer header)"
    if result.detail:
        text += f" - {result.detail}"
    return text


def output_record(record: Record, result: DecryptResult) -> Record:
    """The record OUT gets: the decrypted packet where there is one, else the original (ESP ones
    with their result as the comment; the input record is not changed)."""
    inner = result.inner
    if inner is None:
        return record if result.status == NOT_ESP else replace(record, comment=comment_for(result))
    family = _AF_INET if inner and inner[0] >> 4 == 4 else _AF_INET6
    return Record(time_ns=record.time_ns, point=record.point, payload=inner, family=family,
                  hook=record.hook, indev=record.indev, outdev=record.outdev, mark=record.mark,
                  netns=record.netns, comment=comment_for(result))


def decrypt_records(records: Iterable[Record], decoder: EspDecoder, summary: DecryptSummary,
                    progress: Callable[[DecryptSummary], None] | None = None,
                    every: int = 50_000) -> Iterator[tuple[Record, DecryptResult]]:
    """Yield (record for OUT, result) for each record; count into `summary`; call `progress`
    every `every` packets."""
    add = summary.add
    decrypt = decoder.decrypt
    for n, record in enumerate(records, 1):
        result = decrypt(record.payload)
        add(result, record.payload)
        yield output_record(record, result), result
        if progress is not None and n % every == 0:
            progress(summary)
