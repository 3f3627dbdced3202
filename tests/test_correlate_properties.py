"""Properties of the join, whatever the events log holds: a cause never fails more packets than
the kernel's own signals of that cause allow, and a packet whose probe says the kernel took it
is never failed.

The generated captures: inbound ESP packets of one SA (each with its own seq and skb), and in the
log, in time order, any mix of their xfrm_input probes (any return code), audit anchors (for
captured packets or not), kfree_skb drops (of their skbs or of others, named reasons or bare),
xfrm_stat polls (several counters per poll, any deltas), and the same kinds of events from
another namespace, which must count for nothing.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipsec_capture.correlate.analysis import analyse
from ipsec_capture.correlate.bundle import Inputs
from ipsec_capture.correlate.causes import ANCHOR_CAUSES, cause_for_counter, cause_for_drop, cause_for_ret
from ipsec_capture.models import Event, Record
from tests.support.synthetic import esp4, udp4

A, B, IA, IB = "192.0.2.1", "192.0.2.2", "10.1.0.1", "10.2.0.1"
MS = 1_000_000
T0 = 1_700_000_000 * 1_000_000_000
SPI = 0xC0FFEE01
OWN, OTHER = 11, 22
WINDOW, CLEAR_WINDOW = 3000 * MS, 50 * MS  # the join's defaults
HEADER = {"sources": [{"name": "kprobe"}, {"name": "xfrm_stat"}], "netns": {"name": "own", "inode": OWN}}
COUNTERS = ["XfrmInNoStates", "XfrmInStateProtoError", "XfrmInStateSeqError", "XfrmInError",
            "XfrmInPolBlock", "XfrmOutStateModeError"]
MERGED = {"mode-mismatch": "mtu"}  # a mode error of a too-big packet is named mtu

packet_spec = st.fixed_dictionaries({
    "gap_ms": st.integers(0, 400),
    "probe": st.sampled_from([None, 0, 0, 0, -22, -115]),
    "probe_skew_us": st.integers(-3000, 3000),  # NFLOG's clock may lag the probes'
    "anchor": st.sampled_from([None, None, *ANCHOR_CAUSES]),
    "drop": st.sampled_from([None, None, "bare", "XFRM_POLICY"]),
    "netns": st.sampled_from([OWN, OWN, OWN, OTHER]),  # whose probe/anchor/drop this is
})
poll_spec = st.fixed_dictionaries({
    "at_ms": st.integers(0, 12_000),
    "deltas": st.dictionaries(st.sampled_from(COUNTERS), st.integers(0, 4), max_size=3),
    "netns": st.sampled_from([OWN, OWN, OTHER]),
})
stray_spec = st.fixed_dictionaries({  # anchors and drops for packets the capture never saw
    "at_ms": st.integers(0, 12_000),
    "kind": st.sampled_from([*ANCHOR_CAUSES, "drop"]),
    "netns": st.sampled_from([OWN, OTHER]),
})


def build(packets, polls, strays):
    records, events = [], []
    t = T0
    for seq, spec in enumerate(packets, 1):
        t += spec["gap_ms"] * MS
        records.append(Record(t, "raw-pre-esp", esp4(A, B, SPI, seq, udp4(IA, IB, seq, b"x"), ident=seq),
                              2, hook=0))
        ns, skb = spec["netns"], f"0x{seq:x}"
        at = t + spec["probe_skew_us"] * 1000
        if spec["probe"] is not None or spec["drop"] is not None:
            events.append(Event(at, "kprobe", "xfrm_input", netns=ns, spi=SPI, seq=seq,
                                ret=spec["probe"] if spec["probe"] is not None else 0, detail={"skb": skb}))
        if spec["anchor"]:
            events.append(Event(at + 1000, "kprobe", spec["anchor"], netns=ns, spi=SPI, seq=seq,
                                detail={"skb": skb}))
        if spec["drop"]:
            reason = None if spec["drop"] == "bare" else spec["drop"]
            events.append(Event(at + 2000, "kfree_skb", "drop", netns=ns, reason=reason,
                                detail={"location": "xfrm_input+0x2de", "skbaddr": skb}))
    for i, s in enumerate(strays):
        at = T0 + s["at_ms"] * MS + 7
        if s["kind"] == "drop":
            events.append(Event(at, "kfree_skb", "drop", netns=s["netns"], reason="XFRM_POLICY",
                                detail={"location": "ip_forward+0x1", "skbaddr": f"0xdead{i:x}"}))
        else:
            events.append(Event(at, "kprobe", s["kind"], netns=s["netns"], spi=SPI, seq=100_000 + i))
    for p in polls:
        at = T0 + p["at_ms"] * MS + 3
        for name, delta in p["deltas"].items():
            events.append(Event(at, "xfrm_stat", "counter", netns=p["netns"], reason=name,
                                detail={"delta": delta, "value": 0}))
    records.sort(key=lambda r: r.time_ns)
    events.sort(key=lambda e: e.time_ns)
    return records, events


def allowance(records, events) -> Counter:
    """Per cause: the packets its own-namespace signals can fail at most. Per-packet signals of a
    captured packet (an anchor, a drop, an error return) each allow one; a counter delta allows
    what the anchors of its cause inside its poll window (clear of the windows' edges) do not
    already explain."""
    own = [e for e in events if e.netns in (OWN, None)]
    captured = {(SPI, seq) for seq in range(1, len(records) + 1)}
    allow: Counter = Counter()
    for e in own:
        if e.source == "kprobe" and e.kind in ANCHOR_CAUSES and (e.spi, e.seq) in captured:
            allow[ANCHOR_CAUSES[e.kind]] += 1
        elif e.source == "kfree_skb":
            cause = cause_for_drop(e.reason, e.detail["location"])
            allow[cause] += 1
        elif e.source == "kprobe" and cause_for_ret(e.kind, e.ret):
            allow[cause_for_ret(e.kind, e.ret)] += 1
    polls = sorted({e.time_ns for e in own if e.source == "xfrm_stat"})
    anchors = [e for e in own if e.source == "kprobe" and e.kind in ANCHOR_CAUSES]
    for e in own:
        if e.source != "xfrm_stat" or e.detail["delta"] <= 0:
            continue
        cause = cause_for_counter(e.reason)[0]
        before = [t for t in polls if t < e.time_ns]
        since = before[-1] if before else e.time_ns - WINDOW
        core = sum(1 for a in anchors if ANCHOR_CAUSES[a.kind] == cause
                   and since + CLEAR_WINDOW < a.time_ns < e.time_ns - CLEAR_WINDOW)
        allow[MERGED.get(cause, cause)] += max(0, e.detail["delta"] - core)
    return allow


def probe_accepted(seq, events) -> bool:
    """From the log alone: the packet's own probe returned 0 (or -EINPROGRESS) and nothing of its
    namespace names it (no anchor, no drop of its skb, no error return)."""
    mine = [e for e in events if e.netns in (OWN, None) and
            ((e.source == "kprobe" and e.seq == seq) or
             (e.source == "kfree_skb" and e.detail.get("skbaddr") == f"0x{seq:x}"))]
    probes = [e for e in mine if e.kind == "xfrm_input"]
    return bool(probes) and all(e.kind == "xfrm_input" and e.ret in (0, -115) for e in mine)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(packet_spec, min_size=1, max_size=40), st.lists(poll_spec, max_size=8),
       st.lists(stray_spec, max_size=4))
def test_failures_never_exceed_their_signals_and_accepted_packets_never_fail(packets, polls, strays):
    records, events = build(packets, polls, strays)
    an = analyse(Inputs(name="prop", records=lambda: iter(records), events=lambda: iter(events),
                        header=HEADER))
    rows = an.summary.packets
    assert len(rows) == len(records)
    failed = Counter(MERGED.get(p.cause, p.cause) for p in rows if p.verdict == "failed")
    allow = allowance(records, events)
    merged = Counter()
    for cause, n in allow.items():
        merged[MERGED.get(cause, cause)] += n
    for cause, n in failed.items():
        assert n <= merged[cause], (cause, n, dict(merged), [(p.seq, p.evidence) for p in rows])
    for p in rows:
        if probe_accepted(p.seq, events):
            assert p.verdict == "ok", (p.seq, p.evidence)
        if p.verdict == "failed":  # what failed it is of its own namespace
            assert all(e.netns in (OWN, None) for e in p.events)
