"""Source selection on this host (no kprobes) and the whole companion writing one events log."""

from __future__ import annotations

import os
import time

import pytest

from ipsec_capture.bpf.eventlog import EventLogWriter, make_header, read_events
from ipsec_capture.bpf.sources import KernelEvents, describe, kprobe_status, plan_sources
from ipsec_capture.errors import UserError
from tests.conftest import requires_root
from tests.support.bundles import send_udp

HAS_KPROBES = os.path.isdir("/sys/bus/event_source/devices/kprobe")


def test_bad_mode_and_namespace():
    with pytest.raises(UserError, match="--kernel-events must be one of"):
        plan_sources("fentry")
    with pytest.raises(UserError, match="does not exist"):
        plan_sources("auto", "ict-no-such-ns")


def test_off_turns_everything_off():
    plan = plan_sources("off")
    assert plan and not any(s.active for s in plan)
    assert all(s.why == "--kernel-events off" for s in plan)


@requires_root
@pytest.mark.skipif(HAS_KPROBES, reason="this kernel has kprobes: the no-kprobes plan does not apply")
def test_host_without_kprobes_gets_the_core_tracepoint_program():
    """This host: BTF, but no kprobes and tracing programs refused. The plan is a guess (CO-RE
    may attach); attaching tries CO-RE then bcc for the per-packet slot, and ends with the CO-RE
    tracepoint program for drops, saying why the rest did not attach."""
    assert plan_sources("auto")[0].via == "core"  # the guess: CO-RE first
    ke = KernelEvents(None, mode="auto")
    try:
        got = {s.name: s for s in ke.attach()}
    finally:
        ke.stop()
    assert set(got) == {"kprobe", "tracepoint", "xfrm_stat", "xfrm_monitor"}
    kp, tp = got["kprobe"], got["tracepoint"]
    assert not kp.active and "CO-RE: fentry:" in kp.why and "bcc: this kernel has no kprobes" in kp.why
    assert kprobe_status().why in kp.why
    assert tp.active and tp.via == "core" and "raw_tracepoint:kfree_skb" in tp.why
    assert got["xfrm_stat"].active
    line = describe(list(got.values()))
    assert "kprobe off" in line and "tracepoint on" in line
    assert tp.to_dict()["via"] == "core" and "via" not in kp.to_dict()


@requires_root
@pytest.mark.skipif(HAS_KPROBES, reason="this kernel has kprobes")
def test_asking_for_kprobes_without_them_is_a_user_error(tmp_path):
    with EventLogWriter(tmp_path / "e.jsonl", make_header()) as w:
        ke = KernelEvents(w, mode="kprobe")
        with pytest.raises(UserError, match=r"--kernel-events kprobe: .*kprobes"):
            ke.start()
        assert ke.running == []


@requires_root
def test_kernel_events_write_drops_and_counters_of_the_namespace(netns_pair, tmp_path):
    p = netns_pair
    p.run("b", "ip", "xfrm", "policy", "add", "src", p.a4, "dst", p.b4, "dir", "in", "action", "block")
    p.run("b", "ip", "xfrm", "policy", "add", "src", p.b4, "dst", p.a4, "proto", "udp", "dir", "out",
          "tmpl", "src", p.b4, "dst", p.a4, "proto", "esp", "mode", "transport")
    path = tmp_path / "out.events.jsonl"
    plan = plan_sources("tracepoint", p.b)
    with EventLogWriter(path, make_header(sources=[s.to_dict() for s in plan],
                                          netns={"name": p.b, "inode": None})) as w:
        ke = KernelEvents(w, mode="tracepoint", netns=p.b, poll_interval=0.1)
        ke.start()
        try:
            p.run("a", "ping", "-c", "2", "-i", "0.2", "-W", "1", p.b4, check=False)
            send_udp(p, "b", p.a4, 2)  # acquire: template without a state
            time.sleep(0.3)
        finally:
            summary = ke.stop()
        assert ke.running == []
    header, events = read_events(path)
    got = list(events)
    assert header["netns"]["name"] == p.b
    counters = {e.reason for e in got if e.source == "xfrm_stat"}
    assert {"XfrmInPolBlock", "XfrmOutNoStates"} <= counters, got
    drops = [e for e in got if e.source == "kfree_skb" and e.reason == "XFRM_POLICY"]
    assert len(drops) >= 2, got
    assert summary["events"]["xfrm_stat"] == sum(e.source == "xfrm_stat" for e in got)
    assert summary["events"]["kfree_skb"] >= 2
    if "xfrm_monitor" in summary["events"]:  # the xfrm room's monitor, plugged in as a source
        assert any(e.source == "xfrm_monitor" and e.kind == "acquire" for e in got), got
