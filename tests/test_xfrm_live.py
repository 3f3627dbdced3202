"""Real kernel, test namespaces: policy dump vs `ip xfrm policy` text, monitor events (incl. an
acquire), the keeper's file, and the `sa` command. This host cannot add any XFRM state (ESP, AH,
IPComp, route2/hao all fail with "Requested type not found"), so states are proven in
test_xfrm_netlink.py and in the lab VM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from ipsec_capture.xfrm.keeper import KeyFileKeeper
from ipsec_capture.xfrm.monitor import XfrmMonitor
from ipsec_capture.xfrm.netlink import dump_policies, dump_states
from ipsec_capture.xfrm.text import parse_policies

POLICIES = [
    ("src 192.0.2.1/32 dst 192.0.2.2/32 proto tcp dport 80 dir out priority 100 mark 0x5 mask 0xff "
     "if_id 7 tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 3 mode tunnel "
     "tmpl src 192.0.2.1 dst 192.0.2.2 proto ah mode transport level use"),
    "src 2001:db8::/64 dst ::/0 dir in action block priority 9",
    "src 10.0.0.0/8 dst 10.1.0.0/16 proto icmp type 8 dir fwd tmpl proto esp spi 0x1234 mode transport",
    "src 0.0.0.0/0 dst 0.0.0.0/0 proto udp sport 500 dir in priority 1",
]


def add_policies(pair) -> None:
    for spec in POLICIES:
        pair.run("a", "ip", "xfrm", "policy", "add", *spec.split())


def test_policy_dump_equals_ip_xfrm_policy_text(netns_pair):
    add_policies(pair := netns_pair)
    dumped = dump_policies(pair.a)
    assert len(dumped) == len(POLICIES)
    full = parse_policies(pair.run("a", "ip", "-s", "xfrm", "policy").stdout.decode())
    key = lambda p: (p.selector.src, p.direction)  # noqa: E731
    assert sorted(dumped, key=key) == sorted(full, key=key)
    short = parse_policies(pair.run("a", "ip", "xfrm", "policy").stdout.decode())
    for p in dumped:  # without -s there are no lifetimes and no index
        p.lifetime_cfg, p.lifetime_cur, p.index = {}, {}, 0
    assert sorted(dumped, key=key) == sorted(short, key=key)
    out = next(p for p in dumped if p.direction == "out")
    assert out.mark == (5, 0xFF) and out.if_id == 7 and out.priority == 100
    assert [(t.proto, t.mode, t.reqid, t.level) for t in out.templates] == [
        (50, "tunnel", 3, "required"), (51, "transport", 0, "use")]
    assert dump_states(pair.a) == []


def test_monitor_sees_policy_changes_and_an_acquire(netns_pair):
    pair = netns_pair
    events = []
    with XfrmMonitor(pair.a) as mon:
        pair.run("a", "ip", "xfrm", "policy", "add", "src", "192.0.2.1/32", "dst", "192.0.2.2/32",
                 "proto", "udp", "dir", "out", "tmpl", "src", "192.0.2.1", "dst", "192.0.2.2",
                 "proto", "esp", "reqid", "9", "mode", "transport")
        pair.run("a", "ip", "xfrm", "policy", "update", "src", "192.0.2.1/32", "dst", "192.0.2.2/32",
                 "proto", "udp", "dir", "out", "priority", "7", "tmpl", "src", "192.0.2.1", "dst",
                 "192.0.2.2", "proto", "esp", "reqid", "9", "mode", "transport")
        # a packet that needs an SA nobody has: the kernel asks the IKE daemon (acquire)
        pair.run("a", "sh", "-c", "echo x | ncat -u -w1 192.0.2.2 9999", check=False)
        pair.run("a", "ip", "xfrm", "policy", "del", "src", "192.0.2.1/32", "dst", "192.0.2.2/32",
                 "proto", "udp", "dir", "out")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "policy-delete" not in [e.kind for e in events]:
            events += list(mon.events(timeout=0.5))
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["policy-new", "policy-update"], kinds
    assert "acquire" in kinds and kinds[-1] == "policy-delete", kinds
    acq = next(e for e in events if e.kind == "acquire")
    assert acq.tuple == {"src": "192.0.2.1", "dst": "192.0.2.2", "proto": 50}
    assert acq.detail["policy"]["templates"][0]["reqid"] == 9
    assert acq.detail["selector"]["proto"] == 17
    assert events[1].detail["policy"]["priority"] == 7
    assert all(e.source == "xfrm_monitor" and e.netns for e in events)
    json.loads(acq.to_json())


def test_monitor_close_ends_a_blocked_reader(netns_pair):
    mon = XfrmMonitor(netns_pair.a)
    seen = []
    t = threading.Thread(target=lambda: seen.extend(mon.events()))
    t.start()
    time.sleep(0.2)
    mon.close()
    t.join(timeout=3)
    assert not t.is_alive()


def test_keeper_writes_0600_and_summarises(netns_pair, tmp_path):
    path = tmp_path / "out.esp_sa"
    keeper = KeyFileKeeper(path, netns=netns_pair.a, columns=8)
    keeper.start()
    netns_pair.run("a", "ip", "xfrm", "policy", "add", "src", "192.0.2.1/32", "dst", "192.0.2.2/32",
                   "dir", "out")
    time.sleep(0.2)
    summary = keeper.stop()
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text().startswith("# Wireshark esp_sa")
    assert summary["sas_written"] == 0 and summary["writes"] == 1 and summary["rekeys_seen"] == 0


def test_sa_command_json_in_a_namespace(netns_pair):
    add_policies(netns_pair)
    proc = subprocess.run([sys.executable, "-m", "ipsec_capture", "sa", "--netns", netns_pair.a, "--json"],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["states"] == [] and len(doc["policies"]) == len(POLICIES)


@pytest.mark.parametrize("argv", [["sa", "--netns", "ict-does-not-exist"],
                                  ["keys", "--from-text", "/nonexistent", "-w", "/tmp/x"],
                                  ["keys", "--wireshark-format", "8"]])
def test_cli_errors_are_one_line(argv):
    proc = subprocess.run([sys.executable, "-m", "ipsec_capture", *argv], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
