"""`ipsec-capture watch` for real on this host: run in a test namespace, faults the host kernel can
make (a block policy -> XfrmOutPolBlock; a policy whose SA is missing -> an acquire and
XfrmOutNoStates), a real Prometheus server scraping it, `promtool check metrics` on the endpoint,
SIGHUP reloads, SIGTERM leaves no rule and no tracefs instance behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ipsec_capture.bpf.kfree_skb import INSTANCE_PREFIX, Tracefs
from tests.conftest import require_tool, requires_root
from tests.netlab import NetnsPair, netfilter_state
from tests.support.bundles import send_udp
from tests.support.prometheus import free_port, prometheus, promtool_check

CLI = [sys.executable, "-m", "ipsec_capture"]
ROOT = Path(__file__).parent.parent


class Running:
    """A `watch` subprocess: stderr lines collected in a thread, stdout (incidents) likewise."""

    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.port = port
        self.err: list[str] = []
        self.out: list[str] = []
        self._t = [threading.Thread(target=self._pump, args=(proc.stderr, self.err), daemon=True),
                   threading.Thread(target=self._pump, args=(proc.stdout, self.out), daemon=True)]
        for t in self._t:
            t.start()

    @staticmethod
    def _pump(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def wait_line(self, lines: list[str], prefix: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in lines:
                if line.startswith(prefix) or prefix in line:
                    return line
            if self.proc.poll() is not None and not any(prefix in x for x in lines):
                break
            time.sleep(0.1)
        pytest.fail(f"no {prefix!r} from watch: stderr={''.join(self.err)} stdout={''.join(self.out)}")

    def incidents(self) -> list[dict]:
        return [json.loads(x) for x in list(self.out) if x.startswith("{")]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()


@contextmanager
def watching(netns: str, *extra: str) -> Iterator[Running]:
    port = free_port()
    proc = subprocess.Popen([*CLI, "watch", "--netns", netns, "--listen", f"127.0.0.1:{port}",
                             "--interval", "1", *extra], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run = Running(proc, port)
    try:
        run.wait_line(run.err, "ready")
        yield run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def our_instances() -> list[str]:
    tfs = Tracefs()
    try:
        base = os.path.join(tfs.path, "instances")
        return [n for n in os.listdir(base) if n.startswith(INSTANCE_PREFIX)]
    finally:
        tfs.close()


@requires_root
def test_watch_scraped_by_prometheus_sees_policy_block_and_acquire(netns_pair: NetnsPair):
    require_tool("prometheus")
    require_tool("promtool")
    p = netns_pair
    p.run("a", "ip", "xfrm", "policy", "add", "src", p.a4, "dst", p.b4, "proto", "udp", "dport", "9",
          "dir", "out", "action", "block")
    p.run("a", "ip", "xfrm", "policy", "add", "src", p.a6, "dst", p.b6, "proto", "udp", "dir", "out",
          "tmpl", "src", p.a6, "dst", p.b6, "proto", "esp", "mode", "transport")
    with watching(p.a, "--kernel-events", "tracefs") as w, prometheus([f"127.0.0.1:{w.port}"]) as prom:
        pid_instance = f"{INSTANCE_PREFIX}{w.proc.pid}"
        assert pid_instance in our_instances()
        assert "ipsec_capture" in netfilter_state(p.a)  # the ESP tap rule
        send_udp(p, "a", p.b4, 4)
        code = ("import socket\ns = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
                f"for _ in range(3):\n    try: s.sendto(b'x', ('{p.b6}', 9))\n    except OSError: pass\n")
        p.run("a", "python3", "-c", code)
        sel = f'netns="{p.a}"'
        res = prom.wait_for(f'ipsec_capture_xfrm_stat_total{{{sel},counter="XfrmOutPolBlock"}}',
                            lambda r: r and float(r[0]["value"][1]) >= 4)
        assert res and float(res[0]["value"][1]) >= 4, (res, prom.targets())
        assert res[0]["metric"]["cause"] == "policy-block" and res[0]["metric"]["direction"] == "out"
        res = prom.wait_for(f'ipsec_capture_xfrm_stat_total{{{sel},counter="XfrmOutNoStates"}}',
                            lambda r: r and float(r[0]["value"][1]) >= 1)
        assert res and res[0]["metric"]["cause"] == "no-sa-out", res
        res = prom.wait_for(f'ipsec_capture_unattributed_failed_packets_total{{{sel},cause="policy-block"}}',
                            lambda r: r and float(r[0]["value"][1]) >= 4)
        assert res, prom.query("ipsec_capture_unattributed_failed_packets_total")
        up = {r["metric"]["source"]: r["value"][1] for r in prom.wait_for(
            f"ipsec_capture_source_up{{{sel}}}", lambda r: len(r) >= 4)}
        assert up["tracepoint"] == "1" and up["xfrm_stat"] == "1" and up["xfrm_monitor"] == "1", up
        assert up["kprobe"] == "0" and up["esp_tap"] == "1", up
        inc = prom.wait_for(f'ipsec_capture_incidents_total{{{sel}}}', lambda r: len(r) >= 2)
        assert {r["metric"]["cause"] for r in inc} >= {"policy-block", "no-sa-out"}, inc
        lint = promtool_check(w.metrics())
        assert lint.returncode == 0 and not lint.stdout.strip(), lint

        # one JSON line per incident, not per packet
        w.wait_line(w.out, '"no-sa-out"')
        causes = [i["incident"] for i in w.incidents()]
        assert causes.count("policy-block") == 1 and causes.count("no-sa-out") == 1, causes
        block = next(i for i in w.incidents() if i["incident"] == "policy-block")
        assert block["netns"] == p.a and any("XfrmOutPolBlock" in e for e in block["evidence"]), block
        assert block["sa"] is None and block["count"] >= 4  # a block policy names no SA

        w.proc.send_signal(signal.SIGHUP)
        w.wait_line(w.err, "reloaded")
        send_udp(p, "a", p.b4, 1)  # incident memory dropped: the next drop opens a new one
        deadline = time.monotonic() + 15
        def blocks() -> int:
            return [i["incident"] for i in w.incidents()].count("policy-block")

        while blocks() < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert blocks() == 2, w.incidents()
        assert w.proc.poll() is None

        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(30) == 0, "".join(w.err)
    assert pid_instance not in our_instances()
    assert "ipsec_capture" not in netfilter_state(p.a)


@requires_root
def test_watch_refuses_a_busy_port_in_one_line(netns_pair: NetnsPair):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([*CLI, "watch", "--netns", netns_pair.a, "--listen", f"127.0.0.1:{port}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("ipsec-capture: error: cannot listen on")
    assert "Traceback" not in proc.stderr
    assert "ipsec_capture" not in netfilter_state(netns_pair.a)


ESP_SENDER = r"""
import socket, struct, sys
dst, spi, n = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
for seq in range(1, n + 1):
    s.sendto(struct.pack("!II", spi, seq) + b"\xa5" * 48, (dst, 0))
"""


@requires_root
def test_flight_recorder_writes_a_bundle_around_an_incident(netns_pair: NetnsPair, tmp_path: Path):
    from ipsec_capture.capture.esp_header import esp_header
    from ipsec_capture.capture.pcapread import read_records

    p = netns_pair
    p.run("a", "ip", "xfrm", "policy", "add", "src", p.a4, "dst", p.b4, "proto", "udp", "dport", "9",
          "dir", "out", "action", "block")
    out = tmp_path / "bundles"
    with watching(p.a, "--ring", "4", "--before", "4", "--after", "1", "--min-gap", "60",
                  "--dir", str(out)) as w:
        assert "flight recorder 4 MB" in w.wait_line(w.err, "ready")
        p.run("b", sys.executable, "-c", ESP_SENDER, p.a4, "0x1234abcd", "5")
        time.sleep(0.3)
        send_udp(p, "a", p.b4, 2)  # the incident: policy-block
        line = w.wait_line(w.out, '"policy-block"')
        first = json.loads(line)
        assert first["bundle"] and first["bundle"].startswith(str(out)), first
        p.run("a", "ip", "xfrm", "policy", "add", "src", p.a4, "dst", p.b4, "proto", "udp", "dport", "10",
              "dir", "out", "tmpl", "src", p.a4, "dst", p.b4, "proto", "esp", "mode", "transport")
        code = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                f"try: s.sendto(b'x', ('{p.b4}', 10))\nexcept OSError: pass\n")
        p.run("a", "python3", "-c", code)  # a second incident within --min-gap: no bundle
        second = json.loads(w.wait_line(w.out, '"no-sa-out"'))
        assert second["bundle"] is None
        deadline = time.monotonic() + 20
        while not Path(first["bundle"]).with_suffix(".esp_sa").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        metrics = w.metrics()
        while "ipsec_capture_recorder_bundles_total 1.0" not in metrics and time.monotonic() < deadline + 10:
            time.sleep(0.2)  # the counter is published on the loop's next tick after the write
            metrics = w.metrics()
        assert "ipsec_capture_recorder_bundles_total 1.0" in metrics, metrics
        assert "ipsec_capture_recorder_skipped_total 1.0" in metrics
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(30) == 0
    capture = Path(first["bundle"])
    recs = [r for r in read_records(str(capture)) if r.point == "raw-pre-esp"]
    heads = [esp_header(r.payload) for r in recs]
    assert [(h.spi, h.seq) for h in heads if h] == [(0x1234abcd, s) for s in range(1, 6)], heads
    log = capture.with_suffix(".events.jsonl")
    events = [json.loads(x) for x in log.read_text().splitlines()]
    assert events[0]["flight_recorder"]["incident"]["incident"] == "policy-block"
    assert any(e.get("reason") == "XfrmOutPolBlock" for e in events[1:]), events
    assert (capture.parent / (capture.stem + ".esp_sa")).stat().st_mode & 0o777 == 0o600
    rep = subprocess.run([*CLI, "report", "--format", "json", str(capture)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert "policy-block" in rep.stdout
    assert len(list(out.glob("incident-*.pcapng"))) == 1


@requires_root
def test_one_watch_for_two_namespaces_keeps_their_counters_apart(netns_pair: NetnsPair):
    p = netns_pair
    p.run("b", "ip", "xfrm", "policy", "add", "src", p.b4, "dst", p.a4, "proto", "udp", "dport", "9",
          "dir", "out", "action", "block")
    with watching(p.a, "--netns", p.b) as w:
        assert f"watching {p.a}, {p.b}" in w.wait_line(w.err, "ready")
        send_udp(p, "b", p.a4, 3)
        w.wait_line(w.out, '"policy-block"', timeout=30)
        text = w.metrics()
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(30) == 0
    def value(ns: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith("ipsec_capture_xfrm_stat_total")
                    and 'counter="XfrmOutPolBlock"' in x and f'netns="{ns}"' in x)
        return float(line.rsplit(" ", 1)[1])

    assert value(p.b) >= 3 and value(p.a) == 0
    assert f'ipsec_capture_source_up{{netns="{p.a}",source="tracepoint"}} 1.0' in text
    assert f'ipsec_capture_source_up{{netns="{p.b}",source="tracepoint"}} 0.0' in text  # one per process
    assert [i["netns"] for i in w.incidents()] == [p.b]
    for ns in (p.a, p.b):
        assert "ipsec_capture" not in netfilter_state(ns)
