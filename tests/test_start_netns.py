"""`ipsec-capture start` end to end in two namespaces: ESP (scapy, raw sockets) and IKE/NAT-T on UDP
500/4500, IPv4 and IPv6, both directions, both rule backends; tshark reads the file. Stop signals
leave zero rules; overload shows as drops and a non-zero exit; a busy group and a non-root user
get one line; tcpdump's own nflog capture is read by read_records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from scapy.layers.ipsec import ESP

from ipsec_capture.capture.nflog import NflogReader
from ipsec_capture.capture.pcapread import read_records
from tests.conftest import require_tool
from tests.netlab import NetnsPair, netfilter_state

CLI = [sys.executable, "-m", "ipsec_capture"]
ROOT = Path(__file__).parent.parent

# Runs inside a namespace: argv = [(kind, family, dst, spi_or_port, count), ...] as JSON.
SENDER = r"""
import json, socket, struct, sys
for kind, fam, dst, value, count, esp_hex in json.loads(sys.argv[1]):
    af = socket.AF_INET6 if fam == 6 else socket.AF_INET
    if kind == "esp":
        s = socket.socket(af, socket.SOCK_RAW, 50)
        for i in range(count):
            s.sendto(bytes.fromhex(esp_hex), (dst, 0))
    else:  # udp from and to `value` (500, 4500); esp_hex non-empty: NAT-T ESP, else IKE
        s = socket.socket(af, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::" if fam == 6 else "0.0.0.0", value))
        body = bytes.fromhex(esp_hex) if esp_hex else b"\0\0\0\0" + b"IKE_SA_INIT" * 4
        for i in range(count):
            s.sendto(body, (dst, value))
    s.close()
"""


def esp(spi: int, seq: int = 1) -> str:
    """An ESP header and opaque ciphertext, made with scapy (the kernel adds the IP header)."""
    return bytes(ESP(spi=spi, seq=seq) / (b"\xa5" * 48)).hex()


def send(pair: NetnsPair, host: str, items: list[tuple]) -> None:
    pair.run(host, sys.executable, "-c", SENDER, json.dumps(items), timeout=120)


@contextmanager
def started(*args: str, netns: str) -> Iterator[subprocess.Popen[str]]:
    """`start` as a subprocess, returned once it printed `ready`; killed if the test fails."""
    proc = subprocess.Popen([*CLI, "start", "--netns", netns, *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        before = ""
        line = proc.stderr.readline()
        while line and not line.startswith("ready"):  # the kernel event sources come first
            before += line
            line = proc.stderr.readline()
        if not line:
            proc.wait(30)
            pytest.fail(f"start did not get ready: {before}{proc.stderr.read()}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def finish(proc: subprocess.Popen[str], sig: int = signal.SIGINT) -> tuple[int, dict, str]:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, json.loads(out) if out.strip() else {}, err


def our_rules(ns: str) -> list[str]:
    return [line for line in netfilter_state(ns).splitlines()
            if "ipsec-capture" in line or "ipsec_capture" in line]


def tshark_rows(path: Path) -> list[tuple[str, str, str, str]]:
    out = subprocess.run([require_tool("tshark"), "-r", str(path), "-T", "fields", "-E", "separator=|",
                          "-e", "frame.interface_name", "-e", "nflog.prefix", "-e", "esp.spi",
                          "-e", "udp.dstport"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [tuple(line.split("|")) for line in out.splitlines()]


# SPIs name (direction, family): 0xB1A4 = from b to a over IPv4, ...
TRAFFIC_B = [("esp", 4, "192.0.2.1", 0, 3, esp(0xB1A4)), ("esp", 6, "2001:db8::1", 0, 3, esp(0xB1A6)),
             ("udp", 4, "192.0.2.1", 500, 2, ""), ("udp", 6, "2001:db8::1", 4500, 2, "")]
TRAFFIC_A = [("esp", 4, "192.0.2.2", 0, 3, esp(0xA1B4)), ("esp", 6, "2001:db8::2", 0, 3, esp(0xA1B6)),
             ("udp", 4, "192.0.2.2", 4500, 2, ""), ("udp", 6, "2001:db8::2", 500, 2, "")]


@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_esp_and_ike_both_directions(netns_pair: NetnsPair, tmp_path: Path, backend: str) -> None:
    out = tmp_path / "cap.pcapng"
    with started("--group", "21", "-w", str(out), "--backend", backend, "--json", "--quiet",
                 netns=netns_pair.a) as proc:
        assert our_rules(netns_pair.a), "rules should be installed while capturing"
        send(netns_pair, "b", TRAFFIC_B)
        send(netns_pair, "a", TRAFFIC_A)
        time.sleep(0.3)
        rc, summary, err = finish(proc)
    assert rc == 0, err
    assert our_rules(netns_pair.a) == []
    rows = tshark_rows(out)
    assert all(iface == prefix for iface, prefix, _, _ in rows), rows
    by = Counter((iface, spi or port) for iface, _, spi, port in rows)
    assert by == Counter({
        ("raw-pre-esp", "0x0000b1a4"): 3, ("raw-pre-esp", "0x0000b1a6"): 3,
        ("raw-out-esp", "0x0000a1b4"): 3, ("raw-out-esp", "0x0000a1b6"): 3,
        ("raw-pre-ike", "500"): 2, ("raw-pre-ike", "4500"): 2,
        ("raw-out-ike", "4500"): 2, ("raw-out-ike", "500"): 2,
    })
    assert summary["points"] == {"raw-pre-esp": 6, "raw-out-esp": 6, "raw-pre-ike": 4, "raw-out-ike": 4}
    assert summary["complete"] and summary["lost"] == 0 and summary["backend"].startswith(backend)
    ours = list(read_records(str(out)))
    assert Counter(r.point for r in ours) == Counter(summary["points"])
    assert {r.hook for r in ours if r.point.startswith("raw-pre")} == {0}  # NF_INET_PRE_ROUTING
    assert {r.hook for r in ours if r.point.startswith("raw-out")} == {3}  # NF_INET_LOCAL_OUT


@pytest.mark.parametrize(("backend", "sig"), [("nft", signal.SIGTERM), ("iptables", signal.SIGTERM),
                                              ("nft", signal.SIGHUP)])
def test_stop_signals_leave_no_rules(netns_pair: NetnsPair, tmp_path: Path, backend: str, sig: int) -> None:
    out = tmp_path / "s.pcapng"
    with started("--group", "22", "-w", str(out), "--backend", backend, "--json", "--quiet",
                 netns=netns_pair.a) as proc:
        assert our_rules(netns_pair.a)
        send(netns_pair, "b", TRAFFIC_B[:1])
        time.sleep(0.2)
        rc, summary, err = finish(proc, sig)
    assert rc == 0, err
    assert our_rules(netns_pair.a) == []
    assert summary["stopped_by"] == signal.Signals(sig).name and summary["packets"] == 3
    assert len(tshark_rows(out)) == 3


@pytest.mark.parametrize("backend", ["nft", "iptables", "no-rules"])
def test_spi_and_host_filters_incl_natt(netns_pair: NetnsPair, tmp_path: Path, backend: str) -> None:
    """With rules the kernel applies --spi/--host (what they drop never reaches the socket);
    with --no-rules (our unfiltered rules installed by hand) the user-space filter does."""
    mode = ["--no-rules"] if backend == "no-rules" else ["--backend", backend]
    if backend == "no-rules":
        subprocess.run([*CLI, "rules", "install", "--group", "23", "--netns", netns_pair.a], cwd=ROOT,
                       check=True, capture_output=True)
    out = tmp_path / "f.pcapng"
    with started("--group", "23", "-w", str(out), "--spi", "0xb1a4", "--json", "--quiet", *mode,
                 netns=netns_pair.a) as proc:
        send(netns_pair, "b", [*TRAFFIC_B, ("udp", 4, "192.0.2.1", 4500, 4, esp(0xB1A4)),
                               ("udp", 6, "2001:db8::1", 4500, 5, esp(0xCCCC))])
        time.sleep(0.3)
        rc, summary, err = finish(proc)
    assert rc == 0, err
    rows = tshark_rows(out)
    assert len(rows) == 3 + 4 and summary["packets"] == 7
    if backend == "no-rules":
        assert summary["filtered_out"] == summary["received"] - 7 > 0
    else:
        assert summary["received"] == 7 and summary["filtered_out"] == 0
        assert our_rules(netns_pair.a) == []  # the filtered jumps and chains came out too
    out6 = tmp_path / "h.pcapng"
    with started("--group", "23", "-w", str(out6), "--host", "2001:db8::1", "--linktype", "raw", "--json",
                 "--quiet", *mode, netns=netns_pair.a) as proc:
        send(netns_pair, "b", TRAFFIC_B)
        time.sleep(0.3)
        rc, summary, err = finish(proc)
    assert rc == 0, err
    assert summary["packets"] == 3 + 2  # IPv6 ESP and IKE only
    assert summary["received"] == (summary["packets"] + summary["filtered_out"] if backend == "no-rules"
                                   else summary["packets"])
    assert {r.family for r in read_records(str(out6))} == {10}
    if backend == "no-rules":
        subprocess.run([*CLI, "rules", "remove", "--group", "23", "--netns", netns_pair.a], cwd=ROOT,
                       check=True, capture_output=True)


def test_count_stops_by_itself(netns_pair: NetnsPair, tmp_path: Path) -> None:
    out = tmp_path / "c.pcapng"
    with started("--group", "24", "-w", str(out), "-c", "4", "--json", "--points", "raw-pre-esp",
                 netns=netns_pair.a) as proc:
        send(netns_pair, "b", TRAFFIC_B)
        out_text, err = proc.communicate(timeout=30)
    summary = json.loads(out_text)
    assert proc.returncode == 0, err
    assert summary["stopped_by"] == "count" and summary["packets"] == 4
    assert our_rules(netns_pair.a) == []
    assert "4 packets written" in err  # the text summary (not --quiet)


def test_overload_reports_drops_and_fails(netns_pair: NetnsPair, tmp_path: Path) -> None:
    """A stopped reader with a tiny socket buffer: the kernel must drop, and we must say so. The
    packets are read by a forked child that dropped root (capture/privdrop.py): it is stopped too."""
    out = tmp_path / "o.pcapng"
    with started("--group", "25", "-w", str(out), "--points", "raw-pre-esp", "--rcvbuf", "1", "--json",
                 netns=netns_pair.a) as proc:
        stopped = [proc.pid, *_children(proc.pid)]
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            send(netns_pair, "b", [("esp", 4, "192.0.2.1", 0, 3000, esp(0xD0D0))])
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        time.sleep(0.5)
        rc, summary, err = finish(proc)
    assert rc == 3, err
    assert not summary["complete"] and summary["lost"] + summary["enobufs"] > 0
    assert summary["packets"] < 3000
    assert summary["lost"] == 0 or summary["packets"] + summary["lost"] == 3000
    assert "PACKETS LOST" in err
    assert our_rules(netns_pair.a) == []


def test_busy_group_one_line_no_rules_no_file(netns_pair: NetnsPair, tmp_path: Path) -> None:
    out = tmp_path / "busy.pcapng"
    with NflogReader(26, netns=netns_pair.a):
        proc = subprocess.run([*CLI, "start", "--group", "26", "-w", str(out), "--netns", netns_pair.a],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "already read by another process" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert our_rules(netns_pair.a) == [] and not out.exists()


def test_not_root_one_line(tmp_path: Path) -> None:
    setpriv = require_tool("setpriv")
    out = tmp_path / "nr.pcapng"
    proc = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *CLI, "start",
                           "--group", "27", "-w", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "HOME": "/tmp"})
    assert proc.returncode == 77, proc.stderr
    assert "needs root" in proc.stderr and proc.stderr.count("\n") == 1


def test_tcpdump_nflog_capture_is_read(netns_pair: NetnsPair, tmp_path: Path) -> None:
    tcpdump = require_tool("tcpdump")
    out = tmp_path / "td.pcap"
    subprocess.run([*CLI, "rules", "install", "--group", "28", "--netns", netns_pair.a,
                    "--points", "raw-pre-esp,raw-out-ike"], cwd=ROOT, check=True, capture_output=True,
                   timeout=60)
    try:
        td = subprocess.Popen(["ip", "netns", "exec", netns_pair.a, tcpdump, "-i", "nflog:28", "-w", str(out),
                               "-U"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            assert "listening" in td.stderr.readline()
            send(netns_pair, "b", TRAFFIC_B[:1])
            send(netns_pair, "a", TRAFFIC_A[2:3])
            time.sleep(1.5)  # tcpdump's nflog reader leaves the kernel's default 1 s batching on
        finally:
            td.send_signal(signal.SIGINT)
            td.wait(30)
    finally:
        subprocess.run([*CLI, "rules", "remove", "--group", "28", "--netns", netns_pair.a], cwd=ROOT,
                       capture_output=True, timeout=60)
    recs = list(read_records(str(out)))
    assert Counter(r.point for r in recs) == Counter({"raw-pre-esp": 3, "raw-out-ike": 2})
    assert all(r.payload[0] >> 4 == 4 and r.hook in (0, 3) for r in recs)
