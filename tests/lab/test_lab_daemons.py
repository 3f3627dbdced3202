"""The product against SAs from real IKE daemons (strongSwan's charon, Libreswan's pluto).

The kernel half (tests/lab/daemon_run.py, once per session in the VM) starts capturing inside the
right namespace before the IKE exchange, connects every child (GCM transport, AES-256-CBC +
SHA-256 ESN tunnel, ChaCha20-Poly1305 tunnel, IPv6, a NAT-T tunnel), sends traffic on each both
ways, lets the daemon rekey every child and sends more. Each test here checks the bundle it left
against something the product did not make: the kernel's `ip xfrm state`, Wireshark's dissector,
the payloads the lab sent (lab/traffic.payload), the IKE header on the wire.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ipsec_capture.capture.pcapread import read_records
from ipsec_capture.lab.daemons import CHILDREN
from ipsec_capture.lab.traffic import UDP_PORT, payload
from ipsec_capture.lab.vm import LabVM
from ipsec_capture.xfrm.esp_sa import wireshark_columns
from ipsec_capture.xfrm.keyfile import load_sas
from tests.lab.daemon_run import COUNT, DAEMONS

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1500)]

CLI = [sys.executable, "-m", "ipsec_capture"]
VERDICT = re.compile(r"ESP SPI 0x[0-9a-f]+ seq \d+: ([a-z-]+)")  # decrypt's comment on an ESP packet
INBOUND = {"raw-pre-esp", "raw-pre-ike"}
WIRE = {"raw-pre-esp", "raw-out-esp", "raw-pre-ike", "raw-out-ike"}
IKE_PORTS = {500, 4500}
IKE_SA_INIT = 34  # RFC 7296 exchange type


@pytest.fixture(scope="session")
def daemon_run(request: pytest.FixtureRequest) -> Path:
    """Run the kernel half once (both daemons); IPSEC_CAPTURE_DAEMON_RESULTS points at an earlier
    run instead (developers changing host-side checks only; said on stdout; CI never sets it)."""
    earlier = os.environ.get("IPSEC_CAPTURE_DAEMON_RESULTS")
    if earlier:
        print(f"\nchecking the earlier daemon run in {earlier} (IPSEC_CAPTURE_DAEMON_RESULTS)")
        return Path(earlier)
    lab_vm: LabVM = request.getfixturevalue("lab_vm")
    out = Path(lab_vm.rw[0]) / "daemons"
    r = lab_vm.run([sys.executable, "-m", "tests.lab.daemon_run", str(out)], timeout=1200,
                   on_output=lambda kind, chunk: sys.stdout.write(chunk.decode(errors="replace")))
    assert r.rc == 0, r.stderr[-3000:]
    return out


def case(run: Path, daemon: str) -> dict:
    data = json.loads((run / f"{daemon}.json").read_text())
    assert "error" not in data, data["error"]
    assert data["up"]["rc"] == 0, data["up"]["stderr"]
    assert data["connect"]["rc"] == 0, data["connect"]["stderr"]
    assert data["capture"]["rc"] == 0, data["capture"]["stderr"][-2000:]
    return data


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)


def _l4(pkt: bytes) -> tuple[int, int]:
    """(protocol, offset of the L4 header) of an IPv4 / IPv6 packet (no extension headers)."""
    if pkt[0] >> 4 == 4:
        return pkt[9], (pkt[0] & 0x0F) * 4
    return pkt[6], 40


def ike_exchange(pkt: bytes) -> int | None:
    """The IKE exchange type of a UDP 500 / 4500 (non-ESP marker) packet, else None."""
    proto, off = _l4(pkt)
    if proto != 17 or len(pkt) < off + 8 + 28:
        return None
    sport, dport = int.from_bytes(pkt[off:off + 2], "big"), int.from_bytes(pkt[off + 2:off + 4], "big")
    if not {sport, dport} & IKE_PORTS:
        return None
    ike = off + 8
    if 4500 in (sport, dport):
        if pkt[ike:ike + 4] != b"\0\0\0\0":
            return None  # ESP in UDP
        ike += 4
    return pkt[ike + 18]


def is_esp(pkt: bytes) -> bool:
    proto, off = _l4(pkt)
    if proto == 50:
        return True
    return proto == 17 and int.from_bytes(pkt[off + 2:off + 4], "big") == 4500 and \
        len(pkt) > off + 12 and pkt[off + 8:off + 12] != b"\0\0\0\0"


def esp_records(pcapng: Path) -> list:
    return [r for r in read_records(str(pcapng)) if r.point in WIRE and is_esp(bytes(r.payload))]


_STATE = re.compile(r"^src (\S+) dst (\S+)\n\s+proto esp spi (0x[0-9a-f]+)", re.M)
_KEY = re.compile(r"^\s+(aead|enc|auth-trunc) (\S+) (0x[0-9a-f]+)", re.M)


def kernel_states(text: str) -> dict[int, dict]:
    """`ip -s xfrm state` as the kernel printed it: SPI -> addresses, algorithms, keys, ESN."""
    out = {}
    starts = [m.start() for m in _STATE.finditer(text)] + [len(text)]
    for a, b in itertools.pairwise(starts):
        block = text[a:b]
        src, dst, spi = _STATE.match(block).groups()
        keys = {k: (n, v[2:]) for k, n, v in _KEY.findall(block)}
        out[int(spi, 16)] = {"src": src, "dst": dst, "keys": keys,
                             "esn": bool(re.search(r"flag .*\besn\b", block))}
    return out


def wireshark_decrypts(state: dict) -> bool:
    """Can this tshark decrypt the SA? 4.0 (8 columns) has neither ChaCha20 nor an ESN column."""
    names = {n for n, _ in state["keys"].values()}
    if wireshark_columns() == 8:
        return not state["esn"] and "rfc7539esp(chacha20,poly1305)" not in names
    return True


@pytest.mark.parametrize("daemon", DAEMONS)
def test_every_child_passes_traffic_both_ways_before_and_after_the_rekey(daemon_run: Path,
                                                                         daemon: str) -> None:
    data = case(daemon_run, daemon)
    for rnd in data["traffic"]:
        lines = rnd["stdout"].splitlines()
        for child in data["state"]["children"]:
            for proto in ("icmp", "udp"):
                for way in ("left -> right", "right -> left"):
                    assert f"{child}: {proto} {way}: sent {COUNT}, received {COUNT}" in lines, (child, lines)
    rekey = json.loads(data["rekey"]["stdout"])
    assert rekey["after"] == 2 * len(data["state"]["children"]), rekey  # two new SPIs per child


@pytest.mark.parametrize("daemon", DAEMONS)
def test_the_ike_exchange_is_at_the_raw_ike_points(daemon_run: Path, daemon: str) -> None:
    data = case(daemon_run, daemon)
    exchanges: Counter[tuple[str, int]] = Counter()
    for r in read_records(str(daemon_run / f"{daemon}.pcapng")):
        ex = ike_exchange(bytes(r.payload))
        if ex is not None:
            exchanges[(r.point, ex)] += 1
            assert r.point in ("raw-pre-ike", "raw-out-ike"), r.point
    # IKE_SA_INIT request in, response out, for every IKE SA (the right host is the responder)
    ike_sas = len({CHILDREN[c].ike for c in data["state"]["children"]}) if daemon == "strongswan" \
        else len(data["state"]["children"])
    assert exchanges[("raw-pre-ike", IKE_SA_INIT)] >= ike_sas, exchanges
    assert exchanges[("raw-out-ike", IKE_SA_INIT)] >= ike_sas, exchanges
    kinds = {ex for _, ex in exchanges}
    assert {35, 36} <= kinds, exchanges  # IKE_AUTH, and CREATE_CHILD_SA (children, rekeys)


@pytest.mark.parametrize("daemon", DAEMONS)
def test_tshark_decrypts_every_sa_wireshark_supports_with_the_bundle_keys(daemon_run: Path,
                                                                          daemon: str) -> None:
    data = case(daemon_run, daemon)
    pcapng = daemon_run / f"{daemon}.pcapng"
    states = {**kernel_states(data["xfrm_state_connected"]), **kernel_states(data["xfrm_state"])}
    args = cli("keys", "--from-text", str(pcapng.with_suffix(".esp_sa")), "--tshark-args")
    assert args.returncode == 0, args.stderr
    r = subprocess.run(["tshark", "-n", "-r", str(pcapng), *shlex.split(args.stdout), "-Y", "esp", "-T",
                        "fields", "-E", "separator=|", "-e", "esp.spi", "-e", "esp.icv_good",
                        "-e", "esp.protocol"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    per_spi: dict[int, Counter[str]] = {}
    for line in r.stdout.splitlines():
        spi, good, proto = [*line.split("|"), "", ""][:3]
        ok = good.split(",")[0] in ("1", "True") and proto
        per_spi.setdefault(int(spi, 16), Counter())["good" if ok else "not good"] += 1
    supported = {spi for spi, st in states.items() if wireshark_decrypts(st)}
    assert set(per_spi) == set(states), (sorted(per_spi), sorted(states))  # every SA carried traffic
    rekeyed = set(kernel_states(data["xfrm_state"])) - set(kernel_states(data["xfrm_state_connected"]))
    assert rekeyed & supported, "no rekeyed SA among the ones Wireshark can check"
    bad = {f"{spi:#010x}": c for spi, c in per_spi.items() if spi in supported and c["not good"]}
    assert not bad, bad


@pytest.mark.parametrize("daemon", DAEMONS)
def test_decrypt_says_ok_for_every_esp_packet_and_gives_back_what_was_sent(daemon_run: Path, daemon: str,
                                                                          tmp_path: Path) -> None:
    data = case(daemon_run, daemon)
    pcapng = daemon_run / f"{daemon}.pcapng"
    out = tmp_path / "dec.pcapng"
    r = cli("decrypt", str(pcapng), "-w", str(out))
    assert r.returncode == 0, r.stderr
    esp = len(esp_records(pcapng))
    verdicts: Counter[str] = Counter()
    udp: Counter[tuple[bool, bytes]] = Counter()
    for rec in read_records(str(out)):
        m = VERDICT.match(rec.comment or "") if rec.point in WIRE else None
        if m is None:
            continue
        verdicts[m[1]] += 1
        if m[1] == "ok":
            pkt = bytes(rec.payload)
            proto, off = _l4(pkt)
            if proto == 17 and UDP_PORT in (int.from_bytes(pkt[off:off + 2], "big"),
                                            int.from_bytes(pkt[off + 2:off + 4], "big")):
                udp[(rec.point in INBOUND, pkt[off + 8:])] += 1
    assert verdicts == Counter({"ok": esp}) and esp > 0, verdicts
    # every datagram once each way at the right host: the request and its echo
    expected: Counter[tuple[bool, bytes]] = Counter()
    for child in data["state"]["children"]:
        for src in ("left", "right"):
            for i in range(2 * COUNT):
                expected[(src == "left", payload(child, src, i))] += 1
                expected[(src != "left", payload(child, src, i))] += 1
    assert udp == expected, (udp - expected, expected - udp)


@pytest.mark.parametrize("daemon", DAEMONS)
def test_report_gives_every_esp_packet_ok_and_counts_the_rekeys(daemon_run: Path, daemon: str) -> None:
    data = case(daemon_run, daemon)
    pcapng = daemon_run / f"{daemon}.pcapng"
    r = cli("report", str(pcapng), "--format", "json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)["reports"][0]
    totals = rep["totals"]
    esp = len(esp_records(pcapng))
    assert totals["failed"] == 0 and totals["unknown"] == 0, totals
    assert totals["esp"] == totals["ok"] == esp, (totals, esp)
    children = data["state"]["children"]
    rows = [row for row in rep["sas"] if row["packets"]]
    assert len(rows) == 4 * len(children), rows  # in and out, before and after the rekey
    assert all(row["rekeys"] >= 1 for row in rows), [(row["spi"], row["rekeys"]) for row in rows]


@pytest.mark.parametrize("daemon", DAEMONS)
def test_keys_netns_lists_exactly_the_kernels_states(daemon_run: Path, daemon: str) -> None:
    """`keys --netns` writes a row for every kernel state: Wireshark's columns carry the keys where
    Wireshark names the algorithm, and our `# ipsec-capture-sa` line carries every SA whole
    (ChaCha20-Poly1305 included, which Wireshark 4.0 cannot name)."""
    data = case(daemon_run, daemon)
    assert data["keys"]["rc"] == 0, data["keys"]["stderr"]
    states = kernel_states(data["xfrm_state"])
    path = daemon_run / f"{daemon}.kernel.esp_sa"
    rows = {}
    for line in path.read_text().lower().splitlines():
        if line.startswith("#"):
            continue
        cols = [c.strip('"') for c in line.split(",")]
        rows[int(cols[3], 16)] = cols
    assert set(rows) == set(states), (sorted(rows), sorted(states))
    ours = {sa.spi: sa for sa in load_sas(path)}
    assert set(ours) == set(states), (sorted(ours), sorted(states))
    for spi, st in states.items():
        cols = rows[spi]
        assert cols[1] in (st["src"], "*") and cols[2] in (st["dst"], "*"), (cols, st)
        held = {a.key.hex() for a in (ours[spi].aead, ours[spi].enc, ours[spi].auth) if a is not None}
        for _, key in st["keys"].values():
            assert key in held, (f"{spi:#010x}", st["keys"], held)
            if wireshark_decrypts(st):
                assert f"0x{key}" in cols, (f"{spi:#010x}", st["keys"], cols)


@pytest.mark.parametrize("daemon", DAEMONS)
def test_kernel_events_are_the_capture_namespaces_own(daemon_run: Path, daemon: str) -> None:
    """Started inside the right namespace (no --netns), the capture must not record the left
    namespace's kernel events (issue 13: 160 probe events of the other namespace)."""
    case(daemon_run, daemon)
    lines = (daemon_run / f"{daemon}.events.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    own = header["netns"]["inode"]
    foreign = Counter(f"{e.get('source')}/{e.get('kind')}" for e in map(json.loads, lines[1:])
                      if e.get("netns") not in (None, own))
    assert not foreign, (own, foreign)


def test_every_daemon_ran(daemon_run: Path) -> None:
    seconds = {p.stem: json.loads(p.read_text()).get("seconds", 0) for p in daemon_run.glob("*.json")}
    print(f"\nlab daemon run: {json.dumps(seconds)}; total {sum(seconds.values()):.0f} s")
    assert set(seconds) == set(DAEMONS)
