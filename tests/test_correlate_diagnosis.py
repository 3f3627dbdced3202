"""The join and the diagnosis on synthetic captures: each fault scenario gets its named cause and
the evidence a user needs; a clean run leaves nothing unexplained."""

from __future__ import annotations

import os

from ipsec_capture.correlate.analysis import analyse
from ipsec_capture.correlate.bundle import Inputs
from tests.support.synthetic import Host, esp4, gcm_sa, ip4, udp4

A, B = "192.0.2.1", "192.0.2.2"
IA, IB = "10.1.0.1", "10.2.0.1"
MS = 1_000_000
T0 = 1_700_000_000 * 1_000_000_000
SPI = 0xC0FFEE01


def inputs(host: Host, sas=(), header=None) -> Inputs:
    records, events = host.sorted()
    return Inputs(name="synthetic", records=lambda: iter(records), events=lambda: iter(events),
                  header=header or {}, sas=list(sas))


def traffic_in(host: Host, t: int, seq: int, key: bytes | None, decap: bool, spi: int = SPI,
               seal_key: bytes | None = None) -> None:
    inner = udp4(IA, IB, seq, f"payload {seq}".encode())
    host.esp_in(t, esp4(A, B, spi, seq, inner, seal_key or key, ident=seq))
    if decap:
        host.clear(t + 20_000, "mangle-pre-in", inner)
        host.clear(t + 40_000, "filter-in", inner)


def by_seq(analysis):
    return {p.seq: p for p in analysis.summary.packets}


def test_no_state_after_sa_delete_names_deletion_and_counter():
    h = Host(netns=4026531999)
    h.sa_snapshot(T0 - 1000, SPI, A, B)
    for seq in range(1, 6):
        traffic_in(h, T0 + seq * 100 * MS, seq, None, decap=True)
    h.sa_change(T0 + 600 * MS, "sa-delete", SPI, A, B)
    for seq in range(6, 9):
        traffic_in(h, T0 + (seq * 100 + 50) * MS, seq, None, decap=False)
    h.counter(T0 + 500 * MS, "XfrmInStateProtoError", 0, 0)  # a zero delta is ignored
    h.counter(T0 + 1000 * MS, "XfrmInNoStates", 3, 3)
    an = analyse(inputs(h))
    pk = by_seq(an)
    assert [pk[s].verdict for s in range(1, 6)] == ["ok"] * 5
    assert all(set(dict(pk[s].clear)) == {"mangle-pre-in", "filter-in"} for s in range(1, 6))
    for s in (6, 7, 8):
        assert pk[s].verdict == "failed" and pk[s].cause == "no-state", pk[s].evidence
        assert pk[s].counter == "XfrmInNoStates"
        text = " | ".join(pk[s].evidence)
        assert "XfrmInNoStates +3" in text and "deleted at" in text
    drops = an.to_dict()["drops"]
    assert len(drops) == 1
    d = drops[0]
    assert d["cause"] == "no-state" and d["spi"] == f"0x{SPI:08x}" and d["packets"] == 3
    assert d["counters"] == {"XfrmInNoStates": 3}
    assert "deleted at" in d["evidence"] and "3 packets for it dropped after" in d["evidence"]
    sa = an.to_dict()["sas"][0]
    assert sa["packets"] == 8 and sa["ok"] == 5 and sa["failed"] == {"no-state": 3}
    assert sa["deleted_ns"] == T0 + 600 * MS


def test_icv_fail_with_keys_and_counter():
    key, wrong = os.urandom(20), os.urandom(20)
    h = Host()
    h.sa_snapshot(T0, SPI, A, B)
    traffic_in(h, T0 + 10 * MS, 1, key, decap=True)
    traffic_in(h, T0 + 20 * MS, 2, key, decap=False, seal_key=wrong)
    traffic_in(h, T0 + 30 * MS, 3, key, decap=True)
    h.counter(T0 + 500 * MS, "XfrmInStateProtoError", 1, 1)
    an = analyse(inputs(h, sas=[gcm_sa(SPI, A, B, key)]))
    pk = by_seq(an)
    assert pk[1].decrypt == "ok" and pk[1].verdict == "ok"
    assert pk[3].verdict == "ok"
    assert pk[2].decrypt == "icv-fail"
    assert pk[2].verdict == "failed" and pk[2].cause == "icv-fail"
    assert "XfrmInStateProtoError +1" in " ".join(pk[2].evidence)


def test_anchor_names_cause_without_counters():
    h = Host(netns=7)
    for seq in (1, 2):
        traffic_in(h, T0 + seq * MS, seq, None, decap=seq == 1)
    h.event(T0 + 2 * MS + 5000, "kprobe", "xfrm_input", spi=SPI, seq=2, ret=0, detail={"skb": "0xff01"})
    h.event(T0 + 2 * MS + 6000, "kprobe", "replay", spi=SPI, seq=2)
    an = analyse(inputs(h))
    pk = by_seq(an)
    assert pk[1].verdict == "ok"
    assert pk[2].cause == "replay" and pk[2].verdict == "failed"
    assert any("xfrm_audit_state_replay" in e for e in pk[2].evidence)


def test_replay_duplicate_gets_seq_error():
    h = Host()
    traffic_in(h, T0 + 1 * MS, 1, None, decap=True)
    traffic_in(h, T0 + 2 * MS, 2, None, decap=True)
    traffic_in(h, T0 + 3 * MS, 1, None, decap=False)  # replayed copy
    h.counter(T0 + 400 * MS, "XfrmInStateSeqError", 1, 1)
    an = analyse(inputs(h))
    rows = an.summary.packets
    assert [p.verdict for p in rows] == ["ok", "ok", "failed"]
    assert rows[2].seq == 1 and rows[2].cause == "replay" and rows[2].counter == "XfrmInStateSeqError"


def test_policy_block_drop_linked_by_skb_and_unlinked_drop_reported():
    h = Host()
    traffic_in(h, T0 + MS, 1, None, decap=False)
    h.event(T0 + MS + 1000, "kprobe", "xfrm_input", spi=SPI, seq=1, ret=0, detail={"skb": "0xabc"})
    h.event(T0 + MS + 3000, "kfree_skb", "drop", reason="XFRM_POLICY",
            detail={"location": "__xfrm_policy_check+0x55", "skbaddr": "0xabc"})
    h.event(T0 + 50 * MS, "kfree_skb", "drop", reason="XFRM_POLICY",
            detail={"location": "ip_forward+0x1d", "skbaddr": "0xdef"})
    an = analyse(inputs(h))
    p = an.summary.packets[0]
    assert p.verdict == "failed" and p.cause == "policy-block"
    assert "kfree_skb reason XFRM_POLICY at __xfrm_policy_check+0x55" in p.evidence
    drops = an.to_dict()["drops"]
    assert {(d["cause"], d["spi"]) for d in drops} == {("policy-block", f"0x{SPI:08x}"),
                                                       ("policy-block", None)}


def test_xfrm_input_ret0_is_not_accepted_when_a_drop_follows():
    h = Host()
    traffic_in(h, T0 + MS, 1, None, decap=False)
    traffic_in(h, T0 + 2 * MS, 2, None, decap=False)
    h.event(T0 + MS + 100, "kprobe", "xfrm_input", spi=SPI, seq=1, ret=0, detail={"skb": "0x1"})
    h.event(T0 + MS + 200, "kfree_skb", "drop", detail={"location": "xfrm_input+0x2de", "skbaddr": "0x1"})
    h.event(T0 + 2 * MS + 100, "kprobe", "xfrm_input", spi=SPI, seq=2, ret=0, detail={"skb": "0x2"})
    an = analyse(inputs(h))
    pk = by_seq(an)
    assert pk[1].verdict == "failed" and pk[1].cause == "no-state"
    assert pk[2].verdict == "ok" and "xfrm_input returned 0" in pk[2].evidence[-1]


TRACEPOINT_SOURCES = {"sources": [{"name": "xfrm_stat", "active": True},
                                  {"name": "kfree_skb", "active": True}]}


def test_tracepoint_mode_bare_drop_leaves_the_cause_to_the_counter():
    """Without kprobes no drop is joined to a packet; a bare xfrm_input location guesses no-state,
    but the counter that moved with it knows better (here an ICV failure)."""
    key = bytes(range(20))
    h = Host()
    traffic_in(h, T0 + MS, 1, key, decap=True)
    traffic_in(h, T0 + 2 * MS, 2, bytes(20), decap=False, seal_key=bytes(20))
    h.event(T0 + 2 * MS + 200, "kfree_skb", "drop", reason="NOT_SPECIFIED",
            detail={"location": "xfrm_input+0x2de", "skbaddr": "0x7"})
    h.counter(T0 + 400 * MS, "XfrmInStateProtoError", 1, 1)
    for header, bare_incident in ((TRACEPOINT_SOURCES, False), ({}, True)):
        an = analyse(inputs(h, header=header))
        pk = by_seq(an)
        assert pk[1].verdict == "ok" and pk[2].verdict == "failed", pk[2].evidence
        assert pk[2].counter == "XfrmInStateProtoError" and pk[2].cause != "no-state"
        d = an.to_dict()
        assert ("no-state" in {x["cause"] for x in d["drops"]}) is bare_incident, d["drops"]
        if not bare_incident:
            assert d["totals"]["events_unmatched"] == {"kfree_skb/drop": 1}
            assert any("unjoined; the counters explain it" in t["text"] for t in d["timeline"])


def test_outbound_clear_matched_and_no_sa_out():
    h = Host()
    inner = ip4(A, B, 17, b"\x9c\x40\x00\x09\x00\x0cxxxx", ident=77)
    h.clear(T0 + MS, "filter-out", inner)
    h.esp_out(T0 + MS + 30_000, esp4(A, B, SPI, 1, b"\x00" * 12, ident=77))  # transport: same IP ID
    lost = ip4(A, "198.51.100.9", 17, b"\x9c\x40\x00\x09\x00\x0cyyyy", ident=78)
    h.clear(T0 + 100 * MS, "filter-out", lost)
    h.event(T0 + 100 * MS + 10, "xfrm_monitor", "acquire",
            tuple={"src": A, "dst": "198.51.100.9", "proto": 50})
    h.counter(T0 + 300 * MS, "XfrmOutNoStates", 1, 1)
    an = analyse(inputs(h))
    rows = an.summary.packets
    assert len(rows) == 2
    esp, clear = rows
    assert esp.kind == "esp" and esp.verdict == "ok" and esp.clear == [("filter-out", T0 + MS)]
    assert clear.kind == "clear" and clear.verdict == "failed" and clear.cause == "no-sa-out"
    assert any("acquire" in t for _, t in an.joiner.timeline)


def test_clean_run_with_keys_has_nothing_unexplained():
    key = os.urandom(20)
    h = Host()
    h.sa_snapshot(T0, SPI, A, B)
    for seq in range(1, 201):
        traffic_in(h, T0 + seq * MS, seq, key, decap=True)
    an = analyse(inputs(h, sas=[gcm_sa(SPI, A, B, key)]))
    d = an.to_dict()
    assert d["totals"]["ok"] == 200 and d["totals"]["failed"] == 0 and d["totals"]["unknown"] == 0
    assert d["totals"]["cleartext_matched"] == 400
    assert d["drops"] == []


def test_without_evidence_the_verdict_is_unknown_not_ok():
    h = Host()
    traffic_in(h, T0, 1, None, decap=False)
    an = analyse(inputs(h))
    p = an.summary.packets[0]
    assert p.verdict == "unknown" and p.cause is None
    assert "no cleartext capture point" in p.evidence[0]


def test_mode_error_on_big_df_packets_is_mtu_and_each_packet_counts_once():
    """A tunnel refusing DF packets too big once encapsulated moves XfrmOutStateModeError: each
    refused packet, logged at filter-out and again at mangle-post-out, is one failed packet, `mtu`."""
    h = Host(netns=4026531999)
    big = [udp4(IA, IB, 100 + i, b"\xa5" * 1172) for i in range(3)]
    assert all(p[6] & 0x40 for p in big) and len(big[0]) == 1200  # synthetic packets carry DF
    for i, pkt in enumerate(big):
        h.clear(T0 + i * MS, "filter-out", pkt)
        h.clear(T0 + i * MS + 10_000, "mangle-post-out", pkt)
    small = udp4(IA, IB, 200, b"x")
    h.clear(T0 + 5 * MS, "filter-out", small)
    h.clear(T0 + 5 * MS + 10_000, "mangle-post-out", small)
    h.counter(T0 + 50 * MS, "XfrmOutStateModeError", 4, 4)
    an = analyse(inputs(h))
    packets = an.summary.packets
    assert len(packets) == 4 and all(p.verdict == "failed" for p in packets)
    assert all(p.also == [("mangle-post-out", p.time_ns + 10_000)] for p in packets)
    causes = sorted(p.cause for p in packets)
    assert causes == ["mode-mismatch", "mtu", "mtu", "mtu"]  # a 29-byte packet cannot be too big
    mtu = [p for p in packets if p.cause == "mtu"]
    assert all("1200-byte IPv4 packet (DF set" in " ".join(p.evidence) for p in mtu)
    drops = {d["cause"]: d for d in an.to_dict()["drops"]}
    assert drops["mtu"]["packets"] == 3 and "3 cleartext packets never became ESP" in drops["mtu"]["evidence"]


def test_a_reused_skb_address_names_the_latest_packet_not_an_older_one():
    """skb addresses are reused at once, and NFLOG's clock may lag the probes': packet 2's probe
    and drop come before its record, with the address packet 1 had. The drop is packet 2's."""
    h = Host()
    traffic_in(h, T0 + MS, 1, None, decap=True)
    h.event(T0 + MS - 500, "kprobe", "xfrm_input", spi=SPI, seq=1, ret=0, detail={"skb": "0x77"})
    h.event(T0 + 2 * MS - 3000, "kprobe", "xfrm_input", spi=SPI, seq=2, ret=0, detail={"skb": "0x77"})
    drop = {"location": "xfrm_input+0x1df", "skbaddr": "0x77"}
    h.event(T0 + 2 * MS - 2000, "kfree_skb", "drop", detail=drop)
    traffic_in(h, T0 + 2 * MS, 2, None, decap=False)
    h.event(T0 + 3 * MS, "kfree_skb", "drop", detail=drop)
    an = analyse(inputs(h))
    pk = by_seq(an)
    assert pk[1].verdict == "ok" and not any(e.source == "kfree_skb" for e in pk[1].events)
    assert pk[2].verdict == "failed" and pk[2].cause == "no-state"
    assert sum(e.source == "kfree_skb" for e in pk[2].events) == 2
