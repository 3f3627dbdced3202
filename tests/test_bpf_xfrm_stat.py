"""XFRM counter deltas per namespace, for real: an acquire moves XfrmOutNoStates only where it
happened (policy with a template and no state), a block policy moves XfrmOutPolBlock."""

from __future__ import annotations

import pytest

from ipsec_capture.bpf.xfrm_stat import MEANINGS, XfrmStatReader, XfrmStatSource, deltas, parse
from ipsec_capture.errors import UserError
from tests.conftest import requires_root
from tests.support.bundles import send_udp

SAMPLE = b"XfrmInError             \t0\nXfrmInNoStates          \t7\nXfrmOutNoStates\t2\nbogus line\n"


def test_parse_and_deltas():
    before = parse(SAMPLE)
    assert before == {"XfrmInError": 0, "XfrmInNoStates": 7, "XfrmOutNoStates": 2}
    after = dict(before, XfrmInNoStates=10, XfrmNewCounter=1)
    evs = deltas(before, after, 123, 99)
    got = {e.reason: e.detail for e in evs}
    assert got == {"XfrmInNoStates": {"delta": 3, "value": 10}, "XfrmNewCounter": {"delta": 1, "value": 1}}
    assert all(e.source == "xfrm_stat" and e.kind == "counter" and e.netns == 99 and e.time_ns == 123
               for e in evs)


@requires_root
def test_every_counter_of_this_kernel_has_a_meaning():
    reader = XfrmStatReader(None)
    try:
        names = set(reader.read())
    finally:
        reader.close()
    assert names, "no counters read"
    assert names <= set(MEANINGS), f"undocumented counters: {names - set(MEANINGS)}"


def test_bad_netns_is_a_user_error():
    with pytest.raises(UserError, match="does not exist"):
        XfrmStatReader("ict-no-such-namespace")


def _collect(ns: str) -> tuple[XfrmStatSource, list]:
    events: list = []
    src = XfrmStatSource(ns, interval=0.1)
    src.start(events.append)
    return src, events


@requires_root
def test_acquire_moves_out_no_states_only_in_its_namespace(netns_pair):
    p = netns_pair
    p.run("a", "ip", "xfrm", "policy", "add", "src", p.a4, "dst", p.b4, "proto", "udp", "dir", "out",
          "tmpl", "src", p.a4, "dst", p.b4, "proto", "esp", "mode", "transport")
    src_a, ev_a = _collect(p.a)
    src_b, ev_b = _collect(p.b)
    try:
        send_udp(p, "a", p.b4, 3)
    finally:
        src_a.stop()
        src_b.stop()
    moved_a = {e.reason: e.detail["delta"] for e in ev_a}
    assert moved_a.get("XfrmOutNoStates", 0) >= 1, ev_a
    assert all(e.netns == src_a.reader.inode for e in ev_a)
    assert "XfrmOutNoStates" not in {e.reason for e in ev_b}, ev_b
    assert src_a.count == len(ev_a)


@requires_root
def test_block_policy_moves_out_pol_block(netns_pair):
    p = netns_pair
    p.run("a", "ip", "xfrm", "policy", "add", "src", p.a4, "dst", p.b4, "dir", "out", "action", "block")
    src, events = _collect(p.a)
    try:
        send_udp(p, "a", p.b4, 2)
    finally:
        src.stop()  # the final sample on stop catches what the last poll missed
    total = sum(e.detail["delta"] for e in events if e.reason == "XfrmOutPolBlock")
    assert total >= 2, events
    last = [e for e in events if e.reason == "XfrmOutPolBlock"][-1]
    assert last.detail["value"] == total  # the namespace started at 0: values are per netns
