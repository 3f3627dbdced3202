"""`ipsec-capture report` on bundles written by the real writers (PcapngWriter, EventLogWriter,
esp_sa): named causes with evidence, the JSON schema, missing companions, two-bundle joins, and
one-line errors."""

from __future__ import annotations

import json
import os

import pytest

from ipsec_capture.cli import main
from tests.support.bundles import IA, IB, KEY, MS, SPI, T0, A, B, no_state_host, write_bundle
from tests.support.synthetic import Host, esp4, gcm_sa, udp4


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
