"""WatchState and its collector without root: per-SA numbers from dumps, causes pinned on SAs only
as far as the kernel's counters go, gone SAs forgotten, incidents opened once per quiet period, and
an exposition promtool accepts."""

from __future__ import annotations

import shutil

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from ipsec_capture.errors import UserError
from ipsec_capture.models import Event
from ipsec_capture.watch.exporter import WatchCollector, parse_listen
from ipsec_capture.watch.state import WatchState
from ipsec_capture.xfrm.sa import SA, Algorithm
from tests.support.prometheus import promtool_check

LOCAL = {"192.0.2.1"}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_state(**kw) -> tuple[WatchState, Clock]:
    clock = Clock()
    return WatchState(lambda ns, addr: addr in LOCAL, clock=clock, **kw), clock


def sa(spi: int, src: str, dst: str, packets: int = 0, replay: int = 0, icv: int = 0, reqid: int = 1) -> SA:
    return SA(src=src, dst=dst, spi=spi, reqid=reqid, aead=Algorithm("rfc4106(gcm(aes))", b"k" * 20, 128),
              lifetime_cur={"packets": packets, "bytes": packets * 100},
              stats={"replay_window": 0, "replay": replay, "integrity_failed": icv})


def samples(state: WatchState) -> dict[tuple[str, tuple], float]:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(WatchCollector(state))
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def find(smp: dict, name: str, **labels: str) -> list[float]:
    return [v for (n, ls), v in smp.items() if n == name and all((k, v2) in ls for k, v2 in labels.items())]


def test_dump_gives_per_sa_counters_with_direction_and_algorithm():
    st, _ = make_state()
    st.sync_sas("gw", [sa(0x100, "192.0.2.2", "192.0.2.1", packets=7),
                       sa(0x200, "192.0.2.1", "192.0.2.2", 3)])
    smp = samples(st)
    assert find(smp, "ipsec_capture_sa_packets_total", spi="0x00000100", direction="in",
                algorithm="rfc4106(gcm(aes))", netns="gw") == [7]
    assert find(smp, "ipsec_capture_sa_bytes_total", spi="0x00000200", direction="out") == [300]
    assert find(smp, "ipsec_capture_sa_failed_packets_total", spi="0x00000100", cause="replay") == [0]


def test_per_sa_replay_and_icv_counters_open_one_incident_each():
    st, clock = make_state(quiet_after=60)
    st.sync_sas("gw", [sa(0x100, "192.0.2.2", "192.0.2.1")])
    inc = st.sync_sas("gw", [sa(0x100, "192.0.2.2", "192.0.2.1", replay=3, icv=1)])
    assert sorted(i.cause for i in inc) == ["icv-fail", "replay"]
    d = next(i for i in inc if i.cause == "replay").to_dict()
    assert d["sa"]["spi"] == "0x00000100" and d["peer"] == "192.0.2.2" and d["count"] == 3
    assert "replay +3" in d["evidence"][0]
    clock.t += 10
    assert st.sync_sas("gw", [sa(0x100, "192.0.2.2", "192.0.2.1", replay=5, icv=1)]) == []  # same incident
    # the namespace counter for the same drops does not open a second, SA-less incident
    ev = Event(time_ns=1, source="xfrm_stat", kind="counter", reason="XfrmInStateSeqError",
               detail={"delta": 2, "value": 5})
    assert st.on_event(ev, "gw") == []
    clock.t += 61
    assert [i.cause for i in st.sync_sas("gw", [sa(0x100, "192.0.2.2", "192.0.2.1", replay=6, icv=1)])] == \
        ["replay"]  # quiet for longer than quiet_after: a new incident
    assert find(samples(st), "ipsec_capture_sa_failed_packets_total", cause="replay") == [6]


def test_no_state_is_pinned_on_the_deleted_sa_only_as_far_as_the_counter_moved():
    st, clock = make_state()
    st.sync_sas("gw", [sa(0x100, "192.0.2.2", "192.0.2.1", packets=5)])
    st.on_event(Event(time_ns=1, source="xfrm_monitor", kind="sa-delete", spi=0x100,
                      detail={"sa": sa(0x100, "192.0.2.2", "192.0.2.1").to_dict()}), "gw")
    assert not st.has_sa("gw", "192.0.2.1", 0x100)
    for _ in range(4):
        st.add_candidate("gw", "192.0.2.1", 0x100, "192.0.2.2", 1, "esp-tap")
    st.add_candidate("gw", "192.0.2.1", 0x999, "192.0.2.3", 1, "esp-tap")
    clock.t += 0.5
    inc = st.on_event(Event(time_ns=2, source="xfrm_stat", kind="counter", reason="XfrmInNoStates",
                            detail={"delta": 3, "value": 3}), "gw")
    assert [(i.cause, i.sa.spi if i.sa else None, i.count) for i in inc] == [("no-state", 0x100, 3)]
    ev = inc[0].to_dict()
    assert ev["sa"]["algorithm"] == "rfc4106(gcm(aes))" and ev["sa"]["installed"] is False
    assert any("deleted 0.5 s before" in line for line in ev["evidence"])
    smp = samples(st)
    assert find(smp, "ipsec_capture_sa_failed_packets_total", spi="0x00000100", cause="no-state") == [3]
    assert find(smp, "ipsec_capture_sa_installed", spi="0x00000100") == [0]
    assert find(smp, "ipsec_capture_sa_lifecycle_total", event="delete") == [1]
    assert not find(smp, "ipsec_capture_sa_failed_packets_total", spi="0x00000999")  # counter spent


def test_candidates_without_a_counter_move_are_never_counted():
    st, clock = make_state(candidate_ttl=5)
    st.add_candidate("gw", "192.0.2.1", 0x42, "192.0.2.2", 10, "esp-tap")  # e.g. a host without ESP
    clock.t += 6
    inc = st.on_event(Event(time_ns=2, source="xfrm_stat", kind="counter", reason="XfrmInNoStates",
                            detail={"delta": 1, "value": 1}), "gw")
    assert inc == [] and st.settle() == []  # it waits a moment for packets still on their way
    clock.t += st.no_state_grace
    inc = st.settle()
    assert [(i.cause, i.sa) for i in inc] == [("no-state", None)]  # expired: blamed on the namespace
    smp = samples(st)
    assert find(smp, "ipsec_capture_unattributed_failed_packets_total", cause="no-state") == [1]
    assert not find(smp, "ipsec_capture_sa_failed_packets_total", spi="0x00000042")


def test_gone_sas_are_forgotten_and_rekeys_counted():
    st, clock = make_state(forget_after=60)
    st.sync_sas("gw", [sa(0x100, "192.0.2.1", "192.0.2.2", reqid=7)])
    st.on_event(Event(time_ns=1, source="xfrm_monitor", kind="sa-new", spi=0x101,
                      detail={"sa": sa(0x101, "192.0.2.1", "192.0.2.2", reqid=7).to_dict()}), "gw")
    st.on_event(Event(time_ns=1, source="xfrm_monitor", kind="expire", spi=0x100,
                      detail={"sa": sa(0x100, "192.0.2.1", "192.0.2.2").to_dict(), "hard": False}), "gw")
    st.sync_sas("gw", [sa(0x101, "192.0.2.1", "192.0.2.2", reqid=7)])
    smp = samples(st)
    assert find(smp, "ipsec_capture_sa_lifecycle_total", event="rekey") == [1]
    assert find(smp, "ipsec_capture_sa_lifecycle_total", event="expire-soft") == [1]
    assert find(smp, "ipsec_capture_sa_installed", spi="0x00000100") == [0]
    clock.t += 61
    st.sync_sas("gw", [sa(0x101, "192.0.2.1", "192.0.2.2", reqid=7)])
    smp = samples(st)
    assert not find(smp, "ipsec_capture_sa_installed", spi="0x00000100")
    assert find(smp, "ipsec_capture_sa_installed", spi="0x00000101") == [1]


def test_labels_stay_bounded_under_sa_churn():
    st, clock = make_state(forget_after=30)
    for i in range(200):  # 200 SAs come and go, one per 10 s
        st.sync_sas("gw", [sa(0x1000 + i, "192.0.2.1", "192.0.2.2")])
        clock.t += 10
    series = find(samples(st), "ipsec_capture_sa_installed")
    assert len(series) <= 4, series


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: apt-get install prometheus")
def test_exposition_passes_promtool():
    st, _ = make_state()
    st.sync_sas("gw", [sa(0x100, "192.0.2.2", "192.0.2.1", packets=7, replay=1)])
    st.set_counters("gw", {"XfrmInNoStates": 0, "XfrmOutPolBlock": 2})
    st.set_source("gw", "tracepoint", True)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(WatchCollector(st))
    proc = promtool_check(generate_latest(reg).decode())
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc


def test_listen_syntax():
    assert parse_listen("127.0.0.1:9477") == ("127.0.0.1", 9477)
    assert parse_listen(":9") == ("0.0.0.0", 9)
    assert parse_listen("[::1]:80") == ("::1", 80)
    with pytest.raises(UserError, match="ADDR:PORT"):
        parse_listen("localhost")


def test_ring_is_bounded_by_bytes_and_returns_a_window_in_time_order():
    from ipsec_capture.models import Record
    from ipsec_capture.watch.recorder import RECORD_OVERHEAD, Ring

    size = 1000 + RECORD_OVERHEAD
    ring = Ring(limit=10 * size)
    for i in range(100):  # batches of two packets, 1000 bytes each
        ring.add([Record(time_ns=i * 10 + 1, point="p", payload=b"x" * 1000),
                  Record(time_ns=i * 10, point="p", payload=b"x" * 1000)])
    assert ring.size <= 10 * size and ring.packets == 10 and ring.evicted == 190
    got = ring.between(950, 991)
    assert [r.time_ns for r in got] == [950, 951, 960, 961, 970, 971, 980, 981, 990, 991]


def test_same_dst_and_spi_from_two_peers_are_two_sas():
    """Cilium: every peer's inbound SA on a node has the node's address and the same SPI."""
    st, _ = make_state()
    st.sync_sas("node", [sa(3, "192.0.2.2", "192.0.2.1", packets=4), sa(3, "192.0.2.3", "192.0.2.1", 9)])
    got = sorted((s.src, s.packets) for s in st.sas.values())
    assert got == [("192.0.2.2", 4), ("192.0.2.3", 9)]
    st.on_event(Event(time_ns=1, source="xfrm_monitor", kind="sa-delete", spi=3,
                      detail={"sa": sa(3, "192.0.2.3", "192.0.2.1").to_dict()}), "node")
    assert st.has_sa("node", "192.0.2.1", 3)  # the other peer's SA still takes (dst, SPI)
    st.add_candidate("node", "192.0.2.1", 3, "192.0.2.3", 2, "esp-tap")
    inc = st.on_event(Event(time_ns=2, source="xfrm_stat", kind="counter", reason="XfrmInNoStates",
                            detail={"delta": 2, "value": 2}), "node")
    assert [(i.sa.src, i.count) for i in inc] == [("192.0.2.3", 2)]


def test_recorder_writes_bundles_around_incidents_and_keeps_at_most_max_bundles(tmp_path):
    import time as _time

    from ipsec_capture.capture.pcapread import read_records
    from ipsec_capture.models import Record
    from ipsec_capture.watch.recorder import FlightRecorder
    from ipsec_capture.watch.service import WatchOptions
    from ipsec_capture.watch.state import Incident

    st, _ = make_state()
    opts = WatchOptions(netns=["gw"], dir=str(tmp_path), ring_mb=1, ring_before=1, ring_after=0,
                        ring_max_bundles=2, ring_min_gap=0)
    rec = FlightRecorder(opts, st, clock={"wall_minus_mono_ns": 0, "wall_minus_boot_ns": 0})
    rec.points["gw"] = ["raw-pre-esp"]
    now = _time.time_ns()
    rec.add("gw", [Record(time_ns=now - 2_000_000_000, point="raw-pre-esp", payload=b"\x45" + bytes(39)),
                   Record(time_ns=now - 500_000_000, point="raw-pre-esp", payload=b"\x45" + bytes(39))])
    paths = []
    for i in range(3):
        inc = Incident(now + i, "no-state", "gw", None, 1, [f"n{i}"])
        paths.append(rec.trigger(inc))  # the same second: names made unique
    assert len(set(paths)) == 3
    rec.tick()
    left = sorted(p.name for p in tmp_path.glob("incident-*.pcapng"))
    assert len(left) == 2 and rec.bundles == 3
    newest = next(p for p in paths if p.endswith(left[-1]))
    assert len(list(read_records(newest))) == 1  # only the packet within `before` of the incident


def test_a_no_state_move_waits_for_its_packets_still_in_an_nflog_batch():
    st, clock = make_state()
    inc = st.on_event(Event(time_ns=2, source="xfrm_stat", kind="counter", reason="XfrmInNoStates",
                            detail={"delta": 2, "value": 2}), "gw")
    assert inc == []
    clock.t += 0.3
    st.add_candidate("gw", "192.0.2.1", 0x55, "192.0.2.2", 2, "esp-tap")
    inc = st.settle()
    assert [(i.cause, i.sa.spi, i.count) for i in inc] == [("no-state", 0x55, 2)]
    assert st.settle() == [] and not st.unattributed
