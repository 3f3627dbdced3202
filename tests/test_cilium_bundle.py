"""decrypt and report on node 1 of a Cilium-style cluster, offline (issue 13), from a bundle made
by the real writers: one SPI for every node pair with a key per pair, node 1's inbound states
`src 0.0.0.0 dst 10.99.0.1` told apart only by their marks (0x20d00 / 0x30d00, mask 0xffff0f00),
then a rotation race: node 1 replaced its state for node 2 by SPI 4 while node 2 kept sending
SPI 3, and XfrmInNoStates rose by exactly those packets. The same is proven on the lab kernel by
tests/lab/test_lab_cilium.py; here it runs on any host.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from ipsec_capture.capture.pcapread import read_records
from ipsec_capture.lab.cilium import MASK_IN, MASK_OUT, decrypt_mark, encrypt_mark, node_ip
from ipsec_capture.models import Record
from ipsec_capture.xfrm.keeper import state_id
from ipsec_capture.xfrm.sa import SA, Algorithm
from tests.support.bundles import MS, T0, write_bundle
from tests.support.synthetic import NF_INET_LOCAL_OUT, NF_INET_PRE_ROUTING, Host, esp4, udp4

N1, N2, N3 = node_ip(1), node_ip(2), node_ip(3)
KEYS = {(s, d): bytes([s * 16 + d]) * 20 for s in (1, 2, 3) for d in (1, 2, 3) if s != d}
GCM = "rfc4106(gcm(aes))"


def state(src: int, dst: int, spi: int = 3) -> SA:
    """Node 1's state for the pair: inbound `src 0.0.0.0` with the peer's decrypt mark, outbound
    with the peer's encrypt mark, as lab/cilium.py (and Cilium) install them."""
    inbound = dst == 1
    return SA(src="0.0.0.0" if inbound else node_ip(src), dst=node_ip(dst), spi=spi, mode="tunnel",
              family=socket.AF_INET, reqid=1,  # (Cilium sets ESN: the lab test has it; esp4 seals without)
              aead=Algorithm(GCM, KEYS[(src, dst)], icv_bits=128),
              mark=(decrypt_mark(src), MASK_IN) if inbound else (encrypt_mark(dst), MASK_OUT))


def cluster_node1(tmp_path: Path) -> tuple[Path, list[SA]]:
    h = Host()
    sas = [state(2, 1), state(3, 1), state(1, 2), state(1, 3)]
    for sa in sas:
        h.event(T0 - 1000, "sa_snapshot", "sa", spi=sa.spi, detail={"sa": sa.to_dict()})

    def inbound(t: int, peer: int, seq: int, spi: int = 3, decapsulated: bool = True) -> None:
        inner = udp4(f"10.200.{peer}.1", "10.200.1.1", seq, f"n{peer}-n1 #{seq}".encode().ljust(40, b"."))
        wire = esp4(node_ip(peer), N1, spi, seq, inner, KEYS[(peer, 1)])
        h.records.append(Record(t, "raw-pre-esp", wire, socket.AF_INET, hook=NF_INET_PRE_ROUTING,
                                mark=decrypt_mark(peer)))
        if decapsulated:
            h.records.append(Record(t + 20_000, "mangle-pre-in", inner, socket.AF_INET,
                                    hook=NF_INET_PRE_ROUTING,
                                    mark=0xD00))

    def outbound(t: int, peer: int, seq: int) -> None:
        inner = udp4("10.200.1.1", f"10.200.{peer}.1", seq, f"n1-n{peer} #{seq}".encode().ljust(40, b"."))
        h.records.append(Record(t, "mangle-post-out", inner, socket.AF_INET, hook=NF_INET_LOCAL_OUT,
                                mark=encrypt_mark(peer)))
        wire = esp4(N1, node_ip(peer), 3, seq, inner, KEYS[(1, peer)])
        h.records.append(Record(t + 20_000, "raw-out-esp", wire, socket.AF_INET, hook=NF_INET_LOCAL_OUT,
                                mark=0xE00))

    for seq in range(1, 4):
        for peer in (2, 3):
            t = T0 + (seq * 10 + peer) * MS
            inbound(t, peer, seq)
            outbound(t + 3 * MS, peer, seq)
    rotated = state(2, 1, spi=4)
    old = sas[0]
    h.event(T0 + 50 * MS, "xfrm_monitor", "sa-delete", spi=3, tuple={"src": old.src, "dst": N1, "proto": 50},
            detail={"sa": old.to_dict()})
    h.event(T0 + 50 * MS, "xfrm_monitor", "sa-new", spi=4, tuple={"src": old.src, "dst": N1, "proto": 50},
            detail={"sa": rotated.to_dict()})
    for seq in range(4, 7):  # node 2 still on SPI 3: dropped; node 3 fine
        inbound(T0 + (seq * 10 + 100) * MS, 2, seq, decapsulated=False)
        inbound(T0 + (seq * 10 + 101) * MS, 3, seq)
    h.counter(T0 + 400 * MS, "XfrmInNoStates", 3, 3)
    return write_bundle(tmp_path / "node1", h, sas=[*sas, rotated]), [*sas, rotated]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ipsec_capture", *args], capture_output=True, text=True,
                          timeout=120)


def test_the_key_file_keeps_a_row_per_kernel_state(tmp_path: Path) -> None:
    _, sas = cluster_node1(tmp_path)
    assert len({state_id(sa) for sa in sas}) == len(sas)  # same (dst, SPI), other marks: two states
    rows = [line for line in (tmp_path / "node1.esp_sa").read_text().splitlines() if not line.startswith("#")]
    assert len(rows) == len(sas) and all(sa.aead.key.hex() in "".join(rows) for sa in sas)


def test_decrypt_opens_each_peers_packets_with_its_pairs_key(tmp_path: Path) -> None:
    cap, _ = cluster_node1(tmp_path)
    out = tmp_path / "dec.pcapng"
    r = cli("decrypt", str(cap), "-w", str(out))
    assert r.returncode == 0, r.stderr
    esp = [rec for rec in read_records(str(out)) if rec.point in ("raw-pre-esp", "raw-out-esp")]
    assert len(esp) == 18 and all(rec.comment and ": ok" in rec.comment for rec in esp), \
        [rec.comment for rec in esp if not rec.comment or ": ok" not in rec.comment]
    inner = {bytes(rec.payload)[28:40] for rec in esp}
    assert {f"n2-n1 #{i}".encode().ljust(12, b".") for i in range(1, 7)} <= inner


def test_report_joins_by_destination_spi_and_mark_and_blames_only_the_stale_peer(tmp_path: Path) -> None:
    cap, _ = cluster_node1(tmp_path)
    r = cli("report", str(cap), "--format", "json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)["reports"][0]
    rows = {(row["direction"], row["src"], row["dst"], row["spi"]): row for row in rep["sas"]}
    spi3 = "0x00000003"
    assert set(rows) == {("in", N2, N1, spi3), ("in", N3, N1, spi3), ("out", N1, N2, spi3),
                         ("out", N1, N3, spi3)}, sorted(rows)
    assert rows[("in", N2, N1, spi3)]["failed"] == {"no-state": 3} and rows[("in", N2, N1, spi3)]["ok"] == 3
    assert rows[("in", N3, N1, spi3)]["ok"] == 6 and not rows[("in", N3, N1, spi3)]["failed"]
    packets = [p for p in rep["packets"]["rows"] if p["kind"] == "esp"]
    for p in packets:  # each joined to its own state: destination, and inbound the peer's mark
        assert p["sa"] is not None or p["verdict"] == "failed", p
        if p["sa"] is not None:
            assert p["sa"]["dst"] == p["dst"], p
            if p["direction"] == "in":
                assert p["sa"]["mark"] == [decrypt_mark(int(p["src"][-1])), MASK_IN], p
    failed = [p for p in packets if p["verdict"] == "failed"]
    assert len(failed) == 3 and {(p["src"], p["cause"]) for p in failed} == {(N2, "no-state")}
    assert all(any(f"0.0.0.0 -> {N1} mark 0x20d00/0xffff0f00) deleted at" in e for e in p["evidence"])
               for p in failed), failed[0]["evidence"]
    assert rep["totals"]["unknown"] == 0 and rep["totals"]["ok"] == 15, rep["totals"]
    (drop,) = [d for d in rep["drops"] if d["cause"] == "no-state"]
    assert drop["packets"] == 3 and drop["counters"] == {"XfrmInNoStates": 3}, drop
    assert not [i for i in rep["incidents"] if i["name"] == "XfrmInNoStates" and i["cause"] != "no-state"], \
        rep["incidents"]
