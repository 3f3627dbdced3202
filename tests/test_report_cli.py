"""`ipsec-capture report` on bundles written by the real writers (PcapngWriter, EventLogWriter,
esp_sa): named causes with evidence, the JSON schema, missing companions, two-bundle joins, and
one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from ipsec_capture.bpf.eventlog import EventLogWriter, make_header
from ipsec_capture.capture.pcapng import PcapngWriter
from ipsec_capture.correlate.synthetic import Host, esp4, gcm_sa, udp4
from ipsec_capture.xfrm.esp_sa import write_esp_sa

from ipsec_capture.cli import main

A, B = "192.0.2.1", "192.0.2.2"
IA, IB = "10.1.0.1", "10.2.0.1"
MS = 1_000_000
T0 = 1_700_000_000 * 1_000_000_000
SPI, SPI_BACK = 0xC0FFEE01, 0xC0FFEE02
KEY = bytes(range(20))


def write_bundle(stem: Path, host: Host, sas=(), header_sources=None) -> Path:
    records, events = host.sorted()
    cap = stem.with_suffix(".pcapng")
    with PcapngWriter(cap, ifname=lambda i: f"if{i}") as w:
        for r in records:
            w.write(r)
    with EventLogWriter(f"{stem}.events.jsonl", make_header(sources=header_sources or [])) as ev:
        for e in events:
            ev.write(e)
    if sas:
        Path(f"{stem}.esp_sa").write_text(write_esp_sa(list(sas)))
    return cap


def no_state_host() -> Host:
    """Receiver B: 5 packets decapsulated, SA deleted, 3 more dropped, XfrmInNoStates +3."""
    h = Host()
    h.sa_snapshot(T0 - 1000, SPI, A, B)
    for seq in range(1, 9):
        t = T0 + seq * 100 * MS
        inner = udp4(IA, IB, seq, b"x" * 40)
        h.esp_in(t, esp4(A, B, SPI, seq, inner, KEY, ident=seq))
        if seq <= 5:
            h.clear(t + 20_000, "mangle-pre-in", inner)
    h.sa_change(T0 + 550 * MS, "sa-delete", SPI, A, B)
    h.counter(T0 + 1000 * MS, "XfrmInNoStates", 3, 3)
    return h


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["report", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_names_no_state_with_evidence_and_schema(tmp_path, capsys):
    cap = write_bundle(tmp_path / "b", no_state_host(), sas=[gcm_sa(SPI, A, B, KEY)])
    rc, out, _ = run(capsys, str(cap), "--format", "json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["schema"] == "ipsec-capture-report" and doc["version"] == 1 and doc["peers"] == []
    (rep,) = doc["reports"]
    for k in ("capture", "totals", "sas", "drops", "incidents", "sa_history", "timeline", "packets",
              "series", "causes"):
        assert k in rep
    assert rep["capture"]["missing"] == []
    assert rep["totals"]["ok"] == 5 and rep["totals"]["failed"] == 3 and rep["totals"]["unknown"] == 0
    (drop,) = rep["drops"]
    assert drop["cause"] == "no-state" and drop["spi"] == "0xc0ffee01" and drop["packets"] == 3
    assert drop["counters"] == {"XfrmInNoStates": 3}
    assert "deleted at" in drop["evidence"] and "3 packets for it dropped after" in drop["evidence"]
    assert "XfrmInNoStates +3" in drop["evidence"]
    (sa,) = rep["sas"]
    assert sa["failed"] == {"no-state": 3} and sa["ok"] == 5 and sa["algorithm"] == "rfc4106(gcm(aes))"
    rows = rep["packets"]["rows"]
    assert [r["decrypt"] for r in rows] == ["ok"] * 8
    assert {r["verdict"] for r in rows[5:]} == {"failed"}
    assert set(rows[0]) >= {"time_ns", "point", "spi", "seq", "verdict", "cause", "counter", "evidence"}
    assert "no-state" in rep["causes"]


def test_text_report_and_filters(tmp_path, capsys):
    cap = write_bundle(tmp_path / "b", no_state_host())
    rc, out, _ = run(capsys, str(cap), "--verdict", "failed")
    assert rc == 0
    assert "no-state" in out and "XfrmInNoStates +3" in out and "Packets (3 of 3 matching)" in out
    assert "note: no key file" in out
    rc, out, _ = run(capsys, str(cap), "--spi", "0xdeadbeef")
    assert "Packets (0 of 0 matching)" in out


def test_missing_events_log_is_said_and_report_still_works(tmp_path, capsys):
    cap = write_bundle(tmp_path / "b", no_state_host(), sas=[gcm_sa(SPI, A, B, KEY)])
    os.unlink(tmp_path / "b.events.jsonl")
    rc, out, _ = run(capsys, str(cap), "--format", "json")
    rep = json.loads(out)["reports"][0]
    assert rc == 0 and any("no events log" in m for m in rep["capture"]["missing"])
    assert rep["totals"]["ok"] == 5 and rep["totals"]["unknown"] == 3  # no counters: no cause claimed


def test_two_bundles_join_by_spi_and_seq(tmp_path, capsys):
    a = Host()
    b = no_state_host()
    for seq in range(1, 10):  # A sent 9; B logged 8 (seq 9 lost on the wire)
        a.esp_out(T0 + seq * 100 * MS - 300_000, esp4(A, B, SPI, seq, udp4(IA, IB, seq, b"x" * 40), KEY))
    cap_a = write_bundle(tmp_path / "a", a)
    cap_b = write_bundle(tmp_path / "b", b)
    rc, out, _ = run(capsys, str(cap_a), str(cap_b), "--format", "json")
    assert rc == 0
    (peer,) = json.loads(out)["peers"]
    (row,) = peer["sas"]
    assert row["from"] == "a.pcapng" and row["to"] == "b.pcapng"
    assert (row["sent"], row["arrived"], row["lost"], row["ok"]) == (9, 8, 1, 5)
    assert row["failed"] == {"no-state": 3}
    rc, out, _ = run(capsys, str(cap_a), str(cap_b))
    assert "a.pcapng -> b.pcapng" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["missing.pcapng"], "not found"),
    (["{cap}", "--events", "nope.jsonl"], "events log nope.jsonl not found"),
    (["{cap}", "--limit", "-1"], "--limit"),
    (["{cap}", "--cause", "bogus"], "unknown cause 'bogus'"),
    (["{cap}", "--keys", "a", "--keys", "b"], "once per capture"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    cap = write_bundle(tmp_path / "b", no_state_host())
    rc, out, err = run(capsys, *[a.format(cap=cap) for a in argv])
    assert rc != 0 and out == ""
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
