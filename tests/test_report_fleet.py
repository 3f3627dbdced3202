"""`report A B C`: three nodes' bundles joined by (destination, SPI, seq) into a node-pair matrix and
per-packet paths; a fault on one pair (the receiver's SA deleted: two packets fail no-state, one is
lost on the wire) shows on that pair only, even when another pair uses the same SPI (Cilium's
scheme); two bundles stay the two-end peer join."""

from __future__ import annotations

import json

from ipsec_capture.cli import main
from tests.support.bundles import KEY, MS, T0, write_bundle
from tests.support.synthetic import Host, esp4, gcm_sa, udp4

N1, N2, N3 = "192.0.2.1", "192.0.2.2", "192.0.2.3"
I1, I2, I3 = "10.1.0.1", "10.2.0.1", "10.3.0.1"
SPI12, SPI_SHARED = 0x100, 0x777


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["report", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def send(sender: Host, receiver: Host | None, t: int, src: str, dst: str, spi: int, seq: int,
         isrc: str, idst: str, ok: bool = True) -> None:
    inner = udp4(isrc, idst, seq, b"y" * 32)
    packet = esp4(src, dst, spi, seq, inner, KEY, ident=seq)
    sender.esp_out(t - 300_000, packet)
    if receiver is not None:
        receiver.esp_in(t, packet)
        if ok:
            receiver.clear(t + 20_000, "mangle-pre-in", inner)


def three_nodes(tmp_path):
    n1, n2, n3 = Host(), Host(), Host()
    n2.sa_snapshot(T0 - 1000, SPI12, N1, N2)
    n3.sa_snapshot(T0 - 1000, SPI_SHARED, N1, N3)
    for seq in range(1, 6):
        send(n1, n2, T0 + seq * 100 * MS, N1, N2, SPI12, seq, I1, I2)
    for seq in range(1, 3):  # n2 -> n3 with the SPI n1 -> n3 uses too, the same seqs
        send(n2, n3, T0 + 50 * MS + seq * 100 * MS, N2, N3, SPI_SHARED, seq, I2, I3)
    n3.sa_change(T0 + 330 * MS, "sa-delete", SPI_SHARED, N1, N3)
    for seq in range(1, 7):
        t = T0 + 20 * MS + seq * 100 * MS
        if seq <= 3:
            send(n1, n3, t, N1, N3, SPI_SHARED, seq, I1, I3)
        elif seq <= 5:
            send(n1, n3, t, N1, N3, SPI_SHARED, seq, I1, I3, ok=False)  # no SA any more
        else:
            send(n1, None, t, N1, N3, SPI_SHARED, seq, I1, I3)  # lost on the wire
    n3.counter(T0 + 1000 * MS, "XfrmInNoStates", 2, 2)
    sas = [gcm_sa(SPI12, N1, N2, KEY), gcm_sa(SPI_SHARED, N1, N3, KEY)]
    return [str(write_bundle(tmp_path / name, h, sas)) for name, h in (("n1", n1), ("n2", n2), ("n3", n3))]


def test_matrix_shows_the_fault_on_its_pair_only(tmp_path, capsys):
    caps = three_nodes(tmp_path)
    rc, out, err = run(capsys, *caps, "--format", "json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["peers"] == [] and len(doc["reports"]) == 3
    fleet = doc["fleet"]
    assert fleet["nodes"] == ["n1.pcapng", "n2.pcapng", "n3.pcapng"]
    cells = {(r["from"], r["to"]): r for r in fleet["matrix"]}
    assert set(cells) == {("n1.pcapng", "n2.pcapng"), ("n1.pcapng", "n3.pcapng"), ("n2.pcapng", "n3.pcapng")}
    c12, c13 = cells["n1.pcapng", "n2.pcapng"], cells["n1.pcapng", "n3.pcapng"]
    c23 = cells["n2.pcapng", "n3.pcapng"]
    assert (c12["sent"], c12["arrived"], c12["ok"], c12["lost"], c12["failed"]) == (5, 5, 5, 0, {})
    assert (c23["sent"], c23["arrived"], c23["ok"], c23["lost"], c23["failed"]) == (2, 2, 2, 0, {})
    assert (c13["sent"], c13["arrived"], c13["ok"], c13["lost"]) == (6, 5, 3, 1)
    assert c13["failed"] == {"no-state": 2} and c13["spis"] == ["0x00000777"]
    assert fleet["addresses"] == {N1: "n1.pcapng", N2: "n2.pcapng", N3: "n3.pcapng"}
    paths = fleet["paths"]
    assert (paths["total"], paths["lost"], paths["failed"]) == (13, 1, 2)
    bad = [(p["seq"], p["from"], p["to"], p["verdict"], p["cause"])
           for p in paths["listed"] if p["verdict"] != "ok"]
    assert sorted(bad, key=lambda b: b[0]) == [(4, "n1.pcapng", "n3.pcapng", "failed", "no-state"),
                                               (5, "n1.pcapng", "n3.pcapng", "failed", "no-state"),
                                               (6, "n1.pcapng", "n3.pcapng", "lost", None)]
    ok_shared = [p for p in paths["listed"] if p["verdict"] == "ok" and p["spi"] == "0x00000777"]
    assert sorted((p["src"], p["seq"]) for p in ok_shared) == [(N1, 1), (N1, 2), (N1, 3), (N2, 1), (N2, 2)]


def test_text_matrix_and_two_bundles_stay_a_peer_join(tmp_path, capsys):
    caps = three_nodes(tmp_path)
    rc, out, _ = run(capsys, *caps)
    assert rc == 0
    assert "3 nodes joined by (destination, SPI, seq)" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("n1.pcapng -> n3.pcapng"))
    assert "no-state 2" in line and " 6 " in line
    assert "0x00000777 seq 6" in out and "lost" in out
    rc, out, _ = run(capsys, caps[0], caps[2], "--format", "json")
    doc = json.loads(out)
    assert "fleet" not in doc and len(doc["peers"]) == 1
    (row,) = [r for r in doc["peers"][0]["sas"] if r["spi"] == "0x00000777"]
    assert (row["sent"], row["lost"]) == (6, 1)
