"""Decrypt a stream of Records: each ESP packet becomes its inner packet (or stays as it was, with
the reason), every other packet passes untouched, and the results are counted per SA.

Kept apart from the CLI so the correlation code and tests can run the same pipeline on Records
from any source (a pcap, a live capture) without files. `decrypt_to_writer` is the same pipeline
fused with the pcapng writer for `ipsec-capture decrypt`: it writes exactly what writing each
`decrypt_records` pair with its `comment_for` would, without an output Record or a comment string
per packet (the comment's text is fixed per SA and result, except for the sequence number).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ipsec_capture.models import Record
from ipsec_capture.wire import IPPROTO_ESP
from ipsec_capture.xfrm.sa import MODE_UNKNOWN

from .decoder import (
    DECRYPTED,
    IP4_ESP,
    NO_SA,
    NOT_ESP,
    OK,
    OK_UNVERIFIED,
    ROOM,
    STATUSES,
    TUNNEL_HEADERS,
    DecryptResult,
    EspDecoder,
    Lane,
    esp_header,
)

if TYPE_CHECKING:
    from ipsec_capture.capture.pcapng import PcapngWriter

_AF_INET, _AF_INET6 = 2, 10
_MAX_COMMENT_KINDS = 4096  # distinct (SA, result, detail) comments remembered by decrypt_to_writer


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
    per_sa: dict[tuple, SaTally] = field(default_factory=dict)

    def add(self, result: DecryptResult, packet: bytes | memoryview) -> None:
        """Count one packet: its result, and the result of every ESP layer inside it."""
        self.packets += 1
        if result.status == NOT_ESP:
            self.not_esp += 1
            return
        layer: DecryptResult | None = result
        while layer is not None:
            counts = self.counts_for(layer, packet)
            counts[layer.status] = counts.get(layer.status, 0) + 1
            layer = layer.layer

    def counts_for(self, result: DecryptResult, packet: bytes | memoryview) -> dict[str, int]:
        """The counts of the SA (or unknown SPI) of an ESP result, its tally created on first use
        (named from `packet` when there is no SA). SAs sharing a destination and SPI (marks) are
        counted apart; a key for any SPI is counted per SPI it opened."""
        sa = result.sa
        key = (sa.src, sa.dst, sa.spi or result.spi or 0, sa.mark) if sa is not None \
            else ("", "", result.spi or 0, None)
        tally = self.per_sa.get(key)
        if tally is None:
            tally = self.per_sa[key] = _tally(result, packet)
        return tally.counts

    @classmethod
    def merged(cls, parts: Iterable[DecryptSummary]) -> DecryptSummary:
        """One summary of several (the shares of parallel workers), per SA and overall."""
        total = cls()
        for s in parts:
            total.packets += s.packets
            total.not_esp += s.not_esp
            for key, tally in s.per_sa.items():
                have = total.per_sa.get(key)
                if have is None:
                    total.per_sa[key] = replace(tally, counts=dict(tally.counts))
                else:
                    for status, n in tally.counts.items():
                        have.counts[status] = have.counts.get(status, 0) + n
        return total

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
        for t in sorted(self.per_sa.values(), key=lambda t: (t.dst, t.spi, t.src)):
            counts = ", ".join(f"{k} {v}" for k, v in sorted(t.counts.items(), key=lambda kv: -kv[1]))
            alg = f" {t.algorithm}" if t.algorithm else ""
            lines.append(f"SPI 0x{t.spi:08x} {t.src} -> {t.dst}{alg}: {counts}")
        totals = self.totals()
        text = ", ".join(f"{k} {v}" for k, v in totals.items())
        esp = sum(v for k, v in totals.items() if k != NOT_ESP)
        if esp > self.packets - self.not_esp:
            text += " (counted per ESP layer: ESP inside ESP)"
        lines.append(f"{self.packets} packets: {text or 'none'}")
        if totals.get(OK_UNVERIFIED):
            lines.append(f"{totals[OK_UNVERIFIED]} decrypted without an integrity check (ok-unverified: the "
                         "SA has no integrity, or the key file holds no integrity key): their content "
                         "is not proven")
        return "\n".join(lines)


def _tally(result: DecryptResult, packet: bytes | memoryview) -> SaTally:
    sa = result.sa
    if sa is not None:
        alg = sa.aead or sa.enc
        name = alg.name if alg else ""
        if sa.auth is not None and sa.aead is None:
            name += f"+{sa.auth.name}" if name else sa.auth.name
        return SaTally(sa.spi or result.spi or 0, sa.src, sa.dst, name)
    head = esp_header(packet)  # no SA: name the addresses from the packet itself
    src, dst = (head.src, head.dst) if head else ("?", "?")
    return SaTally(result.spi or 0, src, dst, "unknown SA" if result.status == NO_SA else "")


def comment_parts(result: DecryptResult) -> tuple[str, str]:
    """The comment of an ESP result around its sequence number: `before + str(seq) + after`.
    Everything but the number repeats for every packet of an SA with the same result (and next
    header: an SA whose mode the key file did not say is tunnel for an inner IP packet, as the
    decoder decides). A result with ESP layers inside (`layer`) names only its own here."""
    before = f"ESP SPI 0x{(result.spi or 0):08x} seq "
    after = f": {result.status}"
    if result.status in DECRYPTED and result.inner_len >= 0:
        mode = result.sa.mode if result.sa else ""
        tunnel = mode == "tunnel" or (mode == MODE_UNKNOWN and result.next_header in TUNNEL_HEADERS)
        what = "inner packet" if tunnel else "transport payload under the outer header"
        after += f" (decrypted, {what})" if result.status == OK \
            else f" (decrypted, {what}; ICV not checked)"
    if result.detail:
        after += f" - {result.detail}"
    return before, after


def comment_for(result: DecryptResult) -> str | None:
    """The packet comment in OUT: SPI, sequence number and result of each ESP layer, outermost
    first (None for non-ESP)."""
    if result.status == NOT_ESP:
        return None
    parts = []
    for layer in result.layers():
        before, after = comment_parts(layer)
        parts.append(f"{before}{layer.seq}{after}")
    return "; ".join(parts)


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


@dataclass(slots=True)
class _CommentKind:
    """One (SPI, status, detail) seen by decrypt_to_writer: its comment around the sequence number,
    encoded, and the SA's counts to bump (the tally exists: the first packet went through add)."""

    before: bytes
    after: bytes
    counts: dict[str, int]
    sa: object  # the SA these counts belong to (two SAs may share an SPI)


def decrypt_to_writer(records: Iterable[Record], decoder: EspDecoder, summary: DecryptSummary,
                      writer: PcapngWriter, new_point: Callable[[str], object] | None = None,
                      progress: Callable[[DecryptSummary], None] | None = None, every: int = 50_000) -> None:
    """Decrypt `records` into `writer` (a raw-IP PcapngWriter): byte for byte what
    `writer.write(out, comment_for(result))` gives for each pair of `decrypt_records`, with the
    same counts in `summary` and the same `progress` calls. `new_point(point)` is called before
    a record whose point differs from the previous record's (the caller names interfaces)."""
    decrypt_into = decoder.decrypt_into
    reserve, commit = writer.reserve, writer.commit_packet
    kinds: dict[tuple, _CommentKind] = {}
    # IPv4 dst << 32 | SPI -> (the SA's fast lane, its ok comment around the seq, its counts):
    # entered after the SA's first ok tunnel packet went the general way
    lanes: dict[int, tuple[Lane, bytes, bytes, dict[str, int]]] = {}
    last_point: str | None = None
    for n, record in enumerate(records, 1):
        if new_point is not None and record.point != last_point:
            last_point = record.point
            new_point(last_point)
        payload = record.payload
        size = len(payload)
        at = reserve(record, size + ROOM)  # the decrypted packet is written where its block needs it
        inner_len = -1
        dst_spi = -1  # an IPv4 ESP packet's, whole and without options: the lane's shape
        if size >= 28:
            first, length, frag, proto, dst_spi, seq = IP4_ESP.unpack_from(payload)
            if first == 0x45 and proto == IPPROTO_ESP and length == size and not frag & 0x3FFF:
                entry = lanes.get(dst_spi)
                if entry is not None:
                    fast = entry  # what the ok branch below reads: inner_len >= 0 only after this
                    inner_len = fast[0](payload, writer.buf, writer.view, at)
            else:
                dst_spi = -1
        if inner_len >= 0:
            summary.packets += 1
            fast[3][OK] += 1
            commit(record, inner_len, inner_len, b"%b%d%b" % (fast[1], seq, fast[2]))
        else:
            result = decrypt_into(payload, writer.buf, writer.view, at)
            status = result.status
            inner_len = result.inner_len
            if status == NOT_ESP:
                summary.packets += 1
                summary.not_esp += 1
                comment = b""
            elif result.layer is not None:  # ESP in ESP: every layer counted and named (rare)
                summary.add(result, payload)
                comment = (comment_for(result) or "").encode()
            else:
                key = (status, result.spi, result.detail, inner_len < 0, result.next_header)
                kind = kinds.get(key)
                if kind is None or kind.sa is not result.sa:  # new, or another SA with the same SPI
                    summary.add(result, payload)
                    kind = _comment_kind(result, summary.counts_for(result, payload))
                    if key not in kinds and len(kinds) < _MAX_COMMENT_KINDS:  # details naming lengths
                        kinds[key] = kind  # differ per packet: remember a bounded number
                else:
                    summary.packets += 1
                    kind.counts[status] += 1
                seq = result.seq
                comment = b"%b%d%b" % (kind.before, seq, kind.after) if seq is not None \
                    else kind.before + b"None" + kind.after
                if inner_len >= 0 and dst_spi >= 0 and status == OK and not result.detail \
                        and result.next_header in TUNNEL_HEADERS and dst_spi not in lanes:
                    lane = decoder.lane(dst_spi)
                    if lane is not None:
                        lanes[dst_spi] = (lane, kind.before, kind.after, kind.counts)
            if inner_len < 0:  # not decrypted (or not ESP): the packet as it came
                writer.view[at:at + size] = payload
                commit(record, size, record.length or size, comment)
            else:
                commit(record, inner_len, inner_len, comment)
        if progress is not None and n % every == 0:
            progress(summary)


def _comment_kind(result: DecryptResult, counts: dict[str, int]) -> _CommentKind:
    """The encoded comment parts of a result, with the counts it goes to."""
    before, after = comment_parts(result)
    return _CommentKind(before.encode(), after.encode(), counts, result.sa)
