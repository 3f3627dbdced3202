"""The decrypt pipeline over Records: ESP becomes its inner packet, other packets pass, results
are counted per SA and written as comments."""

from __future__ import annotations

import json

from scapy.layers.inet import ICMP, IP, UDP
from scapy.packet import Raw

from ipsec_capture.decrypt.decoder import EspDecoder
from ipsec_capture.decrypt.pipeline import DecryptSummary, comment_for, decrypt_records
from ipsec_capture.models import Record
from tests.support.esp_build import SUITES, Keys, make_sa, outer, seal

A, B = "192.0.2.1", "192.0.2.2"


def _records() -> tuple[list[Record], EspDecoder, bytes]:
    gcm, cbc = Keys.random(SUITES[0]), Keys.random(SUITES[12])
    inner = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP() / Raw(b"ping"))
    plain = bytes(IP(src=A, dst=B) / UDP(sport=500, dport=500) / Raw(b"ike"))
    wrong = Keys.random(SUITES[12])
    pkts = [
        outer(seal(gcm, 0x100, 1, inner, 4), A, B),
        plain,
        outer(seal(gcm, 0x100, 2, inner, 4), A, B),
        outer(seal(wrong, 0x200, 1, inner, 4), B, A),  # sealed with other keys than the SA's
        outer(seal(gcm, 0x999, 1, inner, 4), A, B),  # no SA
    ]
    records = [Record(time_ns=i * 1000, point="esp-in", payload=p) for i, p in enumerate(pkts)]
    dec = EspDecoder([make_sa(gcm, 0x100, A, B, mode="tunnel"), make_sa(cbc, 0x200, B, A, mode="tunnel")])
    return records, dec, inner


def test_pipeline_replaces_esp_and_passes_the_rest() -> None:
    records, dec, inner = _records()
    summary = DecryptSummary()
    out = list(decrypt_records(records, dec, summary))
    assert [r.status for _, r in out] == ["ok", "not-esp", "ok", "icv-fail", "no-sa"]
    assert out[0][0].payload == inner and out[2][0].payload == inner
    assert out[1][0] is records[1] and out[1][0].comment is None
    assert out[3][0].payload == records[3].payload and "icv-fail" in out[3][0].comment
    assert records[3].comment is None  # input untouched
    assert [rec.time_ns for rec, _ in out] == [r.time_ns for r in records]
    assert comment_for(out[2][1]).startswith("ESP SPI 0x00000100 seq 2: ok")

    assert summary.totals() == {"ok": 2, "icv-fail": 1, "no-sa": 1, "not-esp": 1}
    by_spi = {t["spi"]: t for t in json.loads(summary.to_json())["sas"]}
    assert by_spi["0x00000100"]["counts"] == {"ok": 2}
    assert by_spi["0x00000200"]["counts"] == {"icv-fail": 1}
    assert by_spi["0x00000999"] == {"spi": "0x00000999", "src": A, "dst": B, "algorithm": "unknown SA",
                                    "counts": {"no-sa": 1}}
    text = summary.format_text()
    assert "SPI 0x00000100 192.0.2.1 -> 192.0.2.2 rfc4106(gcm(aes)): ok 2" in text
    assert text.splitlines()[-1] == "5 packets: ok 2, icv-fail 1, no-sa 1, not-esp 1"


def test_progress_is_called() -> None:
    records, dec, _ = _records()
    seen: list[int] = []
    list(decrypt_records(records * 4, dec, DecryptSummary(), lambda s: seen.append(s.packets), every=5))
    assert seen == [5, 10, 15, 20]
