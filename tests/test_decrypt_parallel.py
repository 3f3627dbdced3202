"""`decrypt` on several processes gives the file one process gives, byte for byte (packets in
order, comments, interfaces placed before their first packet), the same counts, and tshark reads
it; failures leave no OUT behind."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.packet import Raw

from ipsec_capture.capture.pcapng import PcapngWriter
from ipsec_capture.capture.pcapread import read_records
from ipsec_capture.cli import main
from ipsec_capture.decrypt.cli import point_namer
from ipsec_capture.decrypt.decoder import EspDecoder
from ipsec_capture.decrypt.parallel import decrypt_parallel
from ipsec_capture.decrypt.pipeline import DecryptSummary, decrypt_to_writer
from ipsec_capture.models import Record
from ipsec_capture.xfrm.sa import SA, Replay
from tests.conftest import require_tool
from tests.support.bundles import scenario
from tests.support.esp_build import SUITES, Keys, make_sa, outer, seal

A4, B4, A6, B6 = "192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2"
T0 = 1_700_000_000_000_000_000
ROLL = 1 << 32


def mixed_capture(path: Path) -> list[SA]:
    """67 packets on three capture points (the third appears late): GCM tunnel, CBC+SHA256 over
    IPv6, an ESN SA crossing the 2^32 rollover, clear packets, a tampered one, an unknown SPI."""
    gcm, cbc, esn = Keys.random(SUITES[0]), Keys.random(SUITES[12]), Keys.random(SUITES[0])
    inner = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(id=1) / Raw(b"ping"))
    udp = bytes(UDP(sport=4000, dport=5000) / Raw(b"six"))
    packets: list[tuple[str, bytes]] = []
    for i in range(1, 21):
        packets.append(("raw-pre-esp", outer(seal(gcm, 0x101, i, inner, 4), A4, B4)))
        packets.append(("raw-out-esp", outer(seal(cbc, 0x202, i, udp, 17), A6, B6)))
        if i % 4 == 0:
            packets.append(("raw-pre-ike", bytes(IP(src=A4, dst=B4) / UDP(sport=500, dport=500) / b"ike")))
    bad = bytearray(outer(seal(gcm, 0x101, 21, inner, 4), A4, B4))
    bad[-1] ^= 1
    packets.append(("raw-pre-esp", bytes(bad)))
    packets.append(("raw-pre-esp", outer(seal(gcm, 0x999, 1, inner, 4), A4, B4)))
    for seq in range(ROLL - 10, ROLL + 10):  # high bits 0 then 1, inferred across the blocks
        packets.append(("raw-pre-esp", outer(seal(esn, 0x303, seq, inner, 4, esn=True), A4, B4)))
    with PcapngWriter(path, linktype="raw") as w:
        for i, (point, pkt) in enumerate(packets):
            w.write(Record(T0 + i * 1000, point, pkt))
    esn_sa = make_sa(esn, 0x303, A4, B4, mode="tunnel", esn=True,
                     replay=Replay(seq=ROLL - 40 & 0xFFFFFFFF, window=64))
    return [make_sa(gcm, 0x101, A4, B4, mode="tunnel"), make_sa(cbc, 0x202, A6, B6), esn_sa]


def packets_of(path: Path) -> list[tuple[str, int, bytes, str | None]]:
    return [(r.point, r.time_ns, bytes(r.payload), r.comment) for r in read_records(str(path))]


def serial(src: Path, sas: list[SA], out: Path) -> DecryptSummary:
    summary = DecryptSummary()
    with PcapngWriter(out, linktype="raw") as w:
        decrypt_to_writer(read_records(str(src)), EspDecoder(sas), summary, w, point_namer(w))
    return summary


@pytest.mark.parametrize(("jobs", "block"), [(2, 1), (3, 4), (4, 100)])
def test_parallel_output_is_the_serial_output(tmp_path: Path, jobs: int, block: int) -> None:
    src = tmp_path / "in.pcapng"
    sas = mixed_capture(src)
    one, many = tmp_path / "one.pcapng", tmp_path / "many.pcapng"
    want = serial(src, sas, one).to_dict()
    got = decrypt_parallel(str(src), EspDecoder(sas), str(many), jobs, point_namer, block=block).to_dict()
    assert want["totals"] == {"ok": 60, "not-esp": 5, "icv-fail": 1, "no-sa": 1}, want
    assert got["packets"] == want["packets"] and got["totals"] == want["totals"]
    assert sorted(got["sas"], key=str) == sorted(want["sas"], key=str)
    expected = packets_of(one)
    assert packets_of(many) == expected
    assert many.read_bytes() == one.read_bytes()  # the one-process file, byte for byte
    comments = [c for *_, c in expected if c and "0x00000303" in c]
    assert comments[9].startswith(f"ESP SPI 0x00000303 seq {ROLL - 1}: ok")
    assert comments[10].startswith(f"ESP SPI 0x00000303 seq {ROLL}: ok")  # the rollover, found
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pcapng", "many.pcapng", "one.pcapng"]
    assert many.stat().st_mode & 0o777 == 0o600


def test_tshark_reads_the_parallel_output(tmp_path: Path) -> None:
    tshark = require_tool("tshark")
    src, out = tmp_path / "in.pcapng", tmp_path / "out.pcapng"
    decrypt_parallel(str(src), EspDecoder(mixed_capture(src)), str(out), 3, point_namer, block=5)
    rows = subprocess.run([tshark, "-n", "-r", str(out), "-T", "fields", "-E", "separator=|",
                           "-e", "frame.interface_name", "-e", "frame.protocols"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(rows) == 67
    assert {r.split("|")[0] for r in rows} == {"raw-pre-esp", "raw-out-esp", "raw-pre-ike"}
    assert sum("esp" not in r.split("|")[1] for r in rows) == 65  # all but icv-fail and no-sa


def test_cli_jobs_give_the_same_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pcap, keys, _ = scenario(tmp_path)
    results = []
    for jobs in ("1", "3"):
        out = tmp_path / f"out{jobs}.pcapng"
        argv = ["decrypt", str(pcap), "--keys", str(keys), "-w", str(out), "--json", "-q", "-j", jobs]
        assert main(argv) == 0
        results.append((json.loads(capsys.readouterr().out), packets_of(out)))
    assert results[0] == results[1]
    assert results[0][0]["totals"] == {"ok": 3, "not-esp": 1, "icv-fail": 1, "no-sa": 1}


def test_bad_jobs_and_bad_input_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pcap, keys, _ = scenario(tmp_path)
    out = tmp_path / "o.pcapng"
    assert main(["decrypt", str(pcap), "--keys", str(keys), "-w", str(out), "-j", "-2"]) != 0
    assert "--jobs -2" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pcap"
    garbage.write_bytes(b"\x00" * 64)
    out = tmp_path / "g.pcapng"
    assert main(["decrypt", str(garbage), "--keys", str(keys), "-w", str(out), "-j", "2"]) != 0
    err = capsys.readouterr().err
    assert "not a pcap or pcapng file" in err and "Traceback" not in err
    assert not out.exists()


def test_a_cut_file_warns_once_and_keeps_every_whole_packet(tmp_path: Path,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.pcapng"
    sas = mixed_capture(src)
    data = src.read_bytes()
    src.write_bytes(data[:-30])  # a capture that crashed mid-block
    one, many = tmp_path / "one.pcapng", tmp_path / "many.pcapng"
    serial(src, sas, one)
    capfd.readouterr()
    decrypt_parallel(str(src), EspDecoder(sas), str(many), 3, point_namer, block=2)
    err = capfd.readouterr().err
    assert err.count("warning:") == 1 and "cut short" in err, err
    assert packets_of(many) == packets_of(one) and len(packets_of(one)) == 66


def test_sigterm_stops_the_workers_and_leaves_out_as_it_was(tmp_path: Path) -> None:
    """The blocks land out of order, so OUT appears only when whole: SIGTERM mid-way (sent on the
    first progress line) leaves the earlier OUT untouched, no partial file and no worker."""
    import signal
    import sys

    from bench.decrypt import build
    from ipsec_capture.xfrm.esp_sa import write_esp_sa

    pcap, keys, out = tmp_path / "big.pcap", tmp_path / "big.esp_sa", tmp_path / "out.pcapng"
    keys.write_text(write_esp_sa([build(pcap, "gcm", 200_000, 120)], 8))
    out.write_bytes(b"the earlier file")
    argv = [sys.executable, "-m", "ipsec_capture", "decrypt", str(pcap), "--keys", str(keys), "-w", str(out),
            "-j", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert line.startswith("decrypt: ") and int(line.split()[1]) < 200_000, line + proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert out.read_bytes() == b"the earlier file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.esp_sa", "big.pcap", "out.pcapng"]
    ps = subprocess.run(["pgrep", "-f", f"decrypt {pcap}"], capture_output=True, text=True)
    assert ps.stdout.strip() == "", "a worker outlived its parent"


def _raw_pcap(src: Path, dst: Path) -> None:
    """The packets of a capture as a raw-IP pcap (one capture point: the reader skips the other
    workers' blocks there instead of handing every record over)."""
    import struct

    with dst.open("wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 101))
        for r in read_records(str(src)):
            n = len(r.payload)
            fh.write(struct.pack("<IIII", r.time_ns // 10**9, r.time_ns % 10**9, n, n))
            fh.write(bytes(r.payload))


@pytest.mark.parametrize(("jobs", "block", "cut"),
                         [(2, 1, 0), (3, 4, 0), (4, 100, 0), (3, 5, 30), (2, 3, 1400)])
def test_raw_pcap_shares_are_skipped_and_the_output_is_the_serial_output(
        tmp_path: Path, jobs: int, block: int, cut: int, capfd: pytest.CaptureFixture[str]) -> None:
    """Also with the file cut in its last packet (one warning), or cut by more than a block."""
    pcapng, src = tmp_path / "in.pcapng", tmp_path / "in.pcap"
    sas = mixed_capture(pcapng)
    _raw_pcap(pcapng, src)
    if cut:
        src.write_bytes(src.read_bytes()[:-cut])
    one, many = tmp_path / "one.pcapng", tmp_path / "many.pcapng"
    want = serial(src, sas, one).to_dict()
    capfd.readouterr()
    got = decrypt_parallel(str(src), EspDecoder(sas), str(many), jobs, point_namer, block=block).to_dict()
    err = capfd.readouterr().err
    assert err.count("warning:") == (1 if cut else 0), err
    assert got["packets"] == want["packets"] and got["totals"] == want["totals"]
    assert (want["packets"] < 67) if cut else (want["packets"] == 67)
    assert many.read_bytes() == one.read_bytes()


def test_the_raw_pcap_reader_hands_over_only_its_share(tmp_path: Path) -> None:
    from ipsec_capture.capture.pcapread import Share

    pcapng, src = tmp_path / "in.pcapng", tmp_path / "in.pcap"
    mixed_capture(pcapng)
    _raw_pcap(pcapng, src)
    every = [bytes(r.payload) for r in read_records(str(src))]
    for k in range(3):
        share = Share(k, 3, 4)
        got = [bytes(r.payload) for r in read_records(str(src), borrow=True, share=share)]
        assert share.skips and share.count == len(every) == 67
        assert got == [p for i, p in enumerate(every) if i // 4 % 3 == k]
    share = Share(1, 3, 4)  # pcapng: several points, every record goes to the caller
    assert len(list(read_records(str(pcapng), share=share))) == 67 and not share.skips
