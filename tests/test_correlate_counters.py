"""Counter deltas and per-packet evidence together: a drop the kernel anchored is counted once,
whatever order the sources wrote their lines in, and a packet whose probe says the kernel took it
is never failed by a counter."""

from __future__ import annotations

import json

import pytest

from ipsec_capture.cli import main
from tests.support.planted import write_planted_bundle


@pytest.mark.parametrize("keys", [True, False], ids=["keys", "no-keys"])
def test_planted_icv_failures_are_counted_exactly(tmp_path, capsys, keys):
    """100k packets, 4 planted ICV failures, each with its anchor, its drop and its share of an
    XfrmInStateProtoError delta: the report says 4 icv-fail, the planted ones, nothing else."""
    n, planted = 100_000, 4
    cap, bad = write_planted_bundle(tmp_path / "planted", n, planted, keys=keys)
    assert main(["report", str(cap), "--format", "json", "--verdict", "failed"]) == 0
    (rep,) = json.loads(capsys.readouterr().out)["reports"]
    assert rep["totals"]["failed"] == planted and rep["totals"]["ok"] == n - planted
    assert {d["cause"]: d["packets"] for d in rep["drops"]} == {"icv-fail": planted}
    assert {row["seq"] for row in rep["packets"]["rows"]} == bad
    (drop,) = rep["drops"]
    assert drop["counters"] == {"XfrmInStateProtoError": planted}


def _inputs(host, header=None, sas=()):
    from ipsec_capture.correlate.bundle import Inputs

    records, events = host.sorted()
    return Inputs(name="synthetic", records=lambda: iter(records), events=lambda: iter(events),
                  header=header or {}, sas=list(sas))


A, B, IA, IB = "192.0.2.1", "192.0.2.2", "10.1.0.1", "10.2.0.1"
MS = 1_000_000
T0 = 1_700_000_000 * 1_000_000_000
SPI = 0xC0FFEE01
KPROBE = {"sources": [{"name": "kprobe"}, {"name": "xfrm_stat"}]}


def _esp_with_probe(h, t, seq, skb):
    from tests.support.synthetic import esp4, udp4

    h.esp_in(t, esp4(A, B, SPI, seq, udp4(IA, IB, seq, b"x" * 20), ident=seq))
    h.event(t + 1000, "kprobe", "xfrm_input", spi=SPI, seq=seq, ret=0, detail={"skb": skb})


def test_a_counter_alone_never_fails_a_packet_its_probe_accepted():
    """XfrmInNoStates +1 while every captured packet's xfrm_input returned 0 with no drop or
    anchor: the drop was a packet the capture did not see; no captured packet is failed."""
    from ipsec_capture.correlate.analysis import analyse
    from tests.support.synthetic import Host

    h = Host()
    for seq in range(1, 6):
        _esp_with_probe(h, T0 + seq * MS, seq, f"0x{seq:x}")
    h.counter(T0 + 400 * MS, "XfrmInNoStates", 1, 1)
    an = analyse(_inputs(h, KPROBE))
    assert an.summary.totals == {"ok": 5, "failed": 0, "unknown": 0}
    (drop,) = an.to_dict()["drops"]
    assert drop["packets"] == 0 and drop["counters"] == {"XfrmInNoStates": 1}
    assert "no captured packet explains it" in drop["evidence"]


def test_an_anchor_of_a_packet_not_captured_consumes_its_delta():
    """The kernel anchored an ICV failure of a packet NFLOG never gave us; the poll counts it:
    the delta is that anchor's, not a captured packet's (these have no probe to clear them)."""
    from ipsec_capture.correlate.analysis import analyse
    from tests.support.synthetic import Host, esp4, udp4

    h = Host()
    for seq in range(1, 4):
        h.esp_in(T0 + seq * MS, esp4(A, B, SPI, seq, udp4(IA, IB, seq, b"x"), ident=seq))
    h.event(T0 + 5 * MS, "kprobe", "icvfail", spi=SPI, seq=99)
    h.counter(T0 + 400 * MS, "XfrmInStateProtoError", 1, 1)
    an = analyse(_inputs(h, KPROBE))
    assert an.summary.totals["failed"] == 0, [p.evidence for p in an.summary.packets]
    d = an.to_dict()
    assert {x["cause"] for x in d["drops"]} == {"icv-fail"}
    assert sum(x["packets"] for x in d["drops"]) == 0


def test_evidence_from_another_netns_never_decides_a_verdict():
    """A bundle of namespace 11 whose log also holds namespace 22's anchor, drop and
    counter for the same (SPI, seq) and skb (a veth carries one skb across namespaces): its
    packet's verdict comes from its own events only, and the other three are counted, not used."""
    from ipsec_capture.correlate.analysis import analyse
    from tests.support.synthetic import Host, esp4, udp4

    own, other = Host(netns=None), Host(netns=22)
    own.esp_in(T0 + MS, esp4(A, B, SPI, 1, udp4(IA, IB, 1, b"x"), ident=1))
    own.event(T0 + MS + 1000, "kprobe", "xfrm_input", spi=SPI, seq=1, ret=0, detail={"skb": "0xab"})
    own.events[-1].netns = 11
    other.event(T0 + MS + 2000, "kprobe", "notfound", spi=SPI, seq=1, detail={"skb": "0xab"})
    other.event(T0 + MS + 3000, "kfree_skb", "drop",
                detail={"location": "xfrm_input+0x2de", "skbaddr": "0xab"})
    other.counter(T0 + 400 * MS, "XfrmInNoStates", 1, 1)
    own.events += other.events
    header = {**KPROBE, "netns": {"name": "ls-b", "inode": 11}}
    an = analyse(_inputs(own, header))
    (p,) = an.summary.packets
    assert p.verdict == "ok" and p.cause is None, p.evidence
    assert all(e.netns == 11 for e in p.events)
    d = an.to_dict()
    assert d["drops"] == [] and d["incidents"] == []
    assert d["totals"]["events_other_netns"] == 3
    # the same log without the header's namespace (a bundle of another tool) still mixes them
    mixed = analyse(_inputs(own, KPROBE))
    assert mixed.summary.packets[0].verdict == "failed"


def test_a_drop_on_the_receive_path_of_a_packet_this_host_sent_is_the_peers():
    """A veth hands the same skb to its peer namespace: the peer's xfrm_input drop of it (a drop
    without a netns of its own) must not fail the outbound packet that had that skb here."""
    from ipsec_capture.correlate.analysis import analyse
    from tests.support.synthetic import Host, esp4, udp4

    h = Host()
    h.esp_out(T0 + MS, esp4(B, A, SPI, 1, udp4(IB, IA, 1, b"x"), ident=1))
    h.event(T0 + MS - 500, "kprobe", "xfrm_output", spi=SPI, seq=1, ret=0, detail={"skb": "0xcd"})
    h.event(T0 + MS + 2000, "kfree_skb", "drop", detail={"location": "xfrm_input+0x2de", "skbaddr": "0xcd"})
    an = analyse(_inputs(h, {**KPROBE, "netns": {"name": "ls-b", "inode": 11}}))
    (p,) = an.summary.packets
    assert p.verdict == "ok" and not any(e.source == "kfree_skb" for e in p.events), p.evidence
    d = an.to_dict()
    assert d["drops"] == [] and d["totals"]["events_other_netns"] == 1


@pytest.mark.parametrize("late_ms", [0, 100])
def test_packets_stamped_when_read_join_the_poll_that_counted_them(late_ms):
    """As a flight-recorder bundle of `watch` holds them (lab: tests/lab/test_lab_watch.py): an
    NFLOG packet the kernel did not stamp is stamped when its batch is read, here 80 ms after the
    kernel dropped it and so after the xfrm_stat poll that counted the drop. The header says how
    late a stamp may be; with it, each of three no-state drops is pinned on its own packet.
    Without it (bundles written before the header had the field) the last packet, 80 ms past its
    poll, is left unexplained and its delta too: what the lab saw in one run of five."""
    from ipsec_capture.bpf.eventlog import STAMP_LATE_KEY
    from ipsec_capture.correlate.analysis import analyse
    from tests.support.synthetic import Host, esp4, udp4

    h = Host()
    for seq in range(1, 4):
        drop = T0 + seq * 500 * MS
        h.esp_in(drop + 80 * MS, esp4(A, B, SPI, seq, udp4(IA, IB, seq, b"x" * 20), ident=seq))
        h.counter(drop + 25 * MS, "XfrmInNoStates", 1, seq)
    header = {"sources": [{"name": "xfrm_stat"}], STAMP_LATE_KEY: late_ms * MS}
    rep = analyse(_inputs(h, header)).to_dict()
    got = {d["spi"]: (d["packets"], d["counters"]["XfrmInNoStates"]) for d in rep["drops"]}
    if late_ms:
        assert got == {f"0x{SPI:08x}": (3, 3)}
    else:
        assert got[None] == (0, 1) and got[f"0x{SPI:08x}"] == (2, 2)
