"""Other people's known answers through `ipsec-capture decrypt`, with every key source that can
express each SA: the 11 ESP packets real Linux kernels made for scapy's tests (DES, 3DES,
AES-CBC, AES-CTR, Blowfish, CAST5 without integrity; AES-GCM, GCM+ESN, GMAC, GMAC+ESN, CCM), and
tcpdump's own ESP test captures (3DES and AES-256-CBC with an unchecked HMAC-96, ESP inside ESP).

An inner packet is the right one when it is a whole IPv4 packet whose header checksum and ICMP
checksum hold and whose length is what the header says: a wrong key cannot produce that. Where
tshark (Wireshark 4.0) can decrypt, it must find the same inner packet.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import subprocess
from pathlib import Path

import pytest

from ipsec_capture.capture.pcapread import read_records
from ipsec_capture.cli import main
from ipsec_capture.xfrm.esp_sa import TSHARK_PREFS
from tests.conftest import require_tool
from tests.support.bundles import write_pcap
from tests.support.xfrm_cmd import (
    TCPDUMP_CAPTURES,
    TCPDUMP_SECRETS,
    VECTORS,
    parse_command,
    ref_id,
    ref_packet,
    scapy_refs,
    state_text,
)

if not (VECTORS / "README.md").is_file():
    pytest.fail(f"the known-answer vectors are missing: {VECTORS} (CI copies shared/ beside the clone)",
                pytrace=False)
REFS = scapy_refs()
# Wireshark's names for the kernel ciphers it has (packet-ipsec.c); GMAC and CCM it has not
WIRESHARK_ENC = {"cbc(des)": "DES-CBC [RFC2405]", "cbc(des3_ede)": "TripleDES-CBC [RFC2451]",
                 "cbc(aes)": "AES-CBC [RFC3602]", "rfc3686(ctr(aes))": "AES-CTR [RFC3686]",
                 "cbc(blowfish)": "BLOWFISH-CBC [RFC2451]", "cbc(cast5)": "CAST5-CBC [RFC2144]",
                 "rfc4106(gcm(aes))": "AES-GCM with 16 octet ICV [RFC4106]"}


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def assert_inner_icmp(pkt: bytes) -> None:
    """A whole IPv4 packet with good header and ICMP checksums."""
    assert pkt[0] == 0x45, pkt[:20].hex()
    assert struct.unpack_from("!H", pkt, 2)[0] == len(pkt)
    assert _checksum(pkt[:20]) == 0xFFFF, "IPv4 header checksum"
    assert pkt[9] == 1 and _checksum(pkt[20:]) == 0xFFFF, "ICMP checksum"


def cli(*args: str) -> tuple[int, str, str]:
    """The CLI in this process (the same `main` the command runs): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def decrypt(capture: Path, keys: Path, tmp: Path) -> tuple[dict, list[tuple[bytes, str]]]:
    """`decrypt --json` of `capture` with `keys`: (summary, [(packet, comment)])."""
    out = tmp / f"{capture.stem}.{keys.name}.pcapng"
    rc, stdout, stderr = cli("decrypt", str(capture), "--keys", str(keys), "-w", str(out), "--json", "-q")
    assert rc == 0, stderr
    return json.loads(stdout), [(bytes(rec.payload), rec.comment or "") for rec in read_records(out)]


def _esp_sa_row(ref: dict) -> str | None:
    """A Wireshark esp_sa row for the reference's SA, written by hand from its command (None
    where Wireshark has no name for the algorithm)."""
    c = parse_command(ref["cmd"])
    (_kind, name, key, _bits), *_ = c.algs
    if name not in WIRESHARK_ENC:
        return None
    # no integrity (digest_null) or an AEAD, whose ICV is the encryption's: authentication NULL
    return f'"IPv4","{c.src}","{c.dst}","0x{c.spi:08x}","{WIRESHARK_ENC[name]}","0x{key}","NULL",""'


def _expected(ref: dict) -> str:
    c = parse_command(ref["cmd"])
    return "ok" if c.algs[0][0] == "aead" else "ok-unverified"  # digest_null: nothing checks them


@pytest.mark.parametrize("ref", REFS, ids=[ref_id(r) for r in REFS])
def test_kernel_packet_decrypts_from_ip_xfrm_state_text(ref: dict, tmp_path: Path) -> None:
    cap = tmp_path / "v.pcap"
    write_pcap(cap, [ref_packet(ref)])
    keys = tmp_path / "states.txt"
    keys.write_text(state_text(ref["cmd"]))
    summary, [(pkt, comment)] = decrypt(cap, keys, tmp_path)
    assert summary["totals"] == {_expected(ref): 1}, (summary, comment)
    assert_inner_icmp(pkt)
    assert f"seq {ref['seq'] | (1 << 32 if parse_command(ref['cmd']).esn else 0)}:" in comment


@pytest.mark.parametrize("ref", REFS, ids=[ref_id(r) for r in REFS])
def test_kernel_packet_decrypts_from_the_table_keys_writes(ref: dict, tmp_path: Path) -> None:
    """`keys --from-text` -> esp_sa (8 and 10 columns) -> `decrypt --keys`: every algorithm,
    CCM and GMAC too (the table's ipsec-capture lines keep what Wireshark has no name for)."""
    cap = tmp_path / "v.pcap"
    write_pcap(cap, [ref_packet(ref)])
    states = tmp_path / "states.txt"
    states.write_text(state_text(ref["cmd"]))
    for columns in ("8", "10"):
        table = tmp_path / f"k{columns}.esp_sa"
        rc, _, stderr = cli("keys", "--from-text", str(states), "-w", str(table),
                            "--wireshark-format", columns)
        assert rc == 0, stderr
        assert table.stat().st_mode & 0o777 == 0o600
        summary, [(pkt, _)] = decrypt(cap, table, tmp_path)
        assert summary["totals"] == {_expected(ref): 1}, (columns, summary)
        assert_inner_icmp(pkt)


@pytest.mark.parametrize("ref", [r for r in REFS if _esp_sa_row(r)], ids=lambda r: ref_id(r))
def test_kernel_packet_decrypts_from_a_wireshark_row_as_tshark_does(ref: dict, tmp_path: Path) -> None:
    """A row as a Wireshark user writes it (8 columns: no ESN column, so the decoder finds the
    high bits by the ICV), and tshark with the same row finds the same inner packet."""
    cap = tmp_path / "v.pcap"
    write_pcap(cap, [ref_packet(ref)])
    row = _esp_sa_row(ref)
    assert row is not None
    table = tmp_path / "w.esp_sa"
    table.write_text(row + "\n")
    summary, [(pkt, _)] = decrypt(cap, table, tmp_path)
    assert summary["totals"] == {_expected(ref): 1}, summary
    assert_inner_icmp(pkt)
    if parse_command(ref["cmd"]).esn:
        return  # Wireshark 4.0's 8 columns cannot say ESN: its GCM AAD is wrong, so no comparison
    tshark = require_tool("tshark")
    fields = ("ip.src", "ip.dst", "ip.id", "icmp.seq", "icmp.checksum")
    r = subprocess.run([tshark, "-r", str(cap), *TSHARK_PREFS, "-o", f"uat:esp_sa:{row}", "-T", "fields",
                        *(a for f in fields for a in ("-e", f))], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    src, dst, ident, seq, csum = r.stdout.strip().split("\t")
    inner = (src.split(",")[-1], dst.split(",")[-1], int(ident.split(",")[-1], 16), int(seq), int(csum, 16))
    mine = (".".join(map(str, pkt[12:16])), ".".join(map(str, pkt[16:20])),
            struct.unpack_from("!H", pkt, 4)[0], struct.unpack_from("!H", pkt, 26)[0],
            struct.unpack_from("!H", pkt, 22)[0])
    assert inner == mine


@pytest.mark.parametrize("ref", [r for r in REFS if "rfc4543" in r["cmd"]], ids=lambda r: ref_id(r))
def test_gmac_payload_is_readable_without_the_key(ref: dict, tmp_path: Path) -> None:
    """GMAC authenticates and does not encrypt: with the key removed the packet still opens,
    as ok-unverified; with the key it is ok."""
    cap = tmp_path / "v.pcap"
    write_pcap(cap, [ref_packet(ref)])
    keys = tmp_path / "nokey.txt"
    keys.write_text(state_text(ref["cmd"], keys=False))
    summary, [(pkt, comment)] = decrypt(cap, keys, tmp_path)
    assert summary["totals"] == {"ok-unverified": 1} and "ICV not checked" in comment
    assert_inner_icmp(pkt)


def _tcpdump_keys(name: str, tmp: Path) -> Path:
    line = TCPDUMP_CAPTURES[name]
    if line is None:
        return TCPDUMP_SECRETS
    path = tmp / "esp1.secrets"
    path.write_text(line + "\n")
    return path


@pytest.mark.parametrize("name", sorted(TCPDUMP_CAPTURES))
def test_tcpdump_capture_decrypts_with_its_secrets(name: str, tmp_path: Path) -> None:
    """tcpdump's own -E secrets as they are; ESP inside ESP (esp2) opens both layers, each
    layer counted and named; tcpdump itself prints the same inner ICMP sequence numbers."""
    cap = VECTORS / name
    summary, packets = decrypt(cap, _tcpdump_keys(name, tmp_path), tmp_path)
    nested = "esp2" in name
    assert summary["packets"] == 8
    assert summary["totals"] == {"ok-unverified": 16 if nested else 8}, summary
    assert len(summary["sas"]) == (2 if nested else 1)
    for pkt, comment in packets:
        assert_inner_icmp(pkt)
        assert comment.count("ok-unverified") == (2 if nested else 1)
    if nested:
        assert "SPI 0x12345678" in packets[0][1] and "SPI 0xabcdabcd" in packets[0][1]
    tcpdump = require_tool("tcpdump")
    secrets = [line for line in _tcpdump_keys(name, tmp_path).read_text().splitlines()
               if line.strip() and not line.startswith("#")]  # given inline: tcpdump may drop root
    r = subprocess.run([tcpdump, "-nr", str(cap), "-E", ",".join(secrets)], capture_output=True, text=True,
                       timeout=60)
    seqs = [int(line.split("seq ")[-1].split(",")[0]) for line in r.stdout.splitlines()
            if "ICMP echo" in line]
    assert seqs == [struct.unpack_from("!H", pkt, 26)[0] for pkt, _ in packets]


@pytest.mark.parametrize("name", sorted(TCPDUMP_CAPTURES))
def test_tcpdump_capture_decrypts_from_an_esp_sa_like_tshark(name: str, tmp_path: Path) -> None:
    """The same keys as Wireshark rows (`ANY 96 bit authentication [no checking]`, what Wireshark
    takes when only the encryption key is known): our decoder and tshark agree."""
    rows = []
    for line in (_tcpdump_keys(name, tmp_path).read_text().splitlines()):
        if not line.strip() or line.startswith("#"):
            continue
        target, secret = line.split()
        spi, dst = target.split("@")
        algo, key = secret.split(":")
        enc = "TripleDES-CBC [RFC2451]" if algo.startswith("3des") else "AES-CBC [RFC3602]"
        rows.append(f'"IPv4","*","{dst}","{spi}","{enc}","{key}",'
                    '"ANY 96 bit authentication [no checking]",""')
    table = tmp_path / "t.esp_sa"
    table.write_text("\n".join(rows) + "\n")
    summary, packets = decrypt(VECTORS / name, table, tmp_path)
    assert summary["totals"] == {"ok-unverified": 16 if "esp2" in name else 8}, summary
    tshark = require_tool("tshark")
    args = [a for row in rows for a in ("-o", f"uat:esp_sa:{row}")]
    r = subprocess.run([tshark, "-r", str(VECTORS / name), *TSHARK_PREFS, *args, "-T", "fields",
                        "-e", "icmp.seq", "-e", "icmp.checksum"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    theirs = [tuple(int(x, 0) for x in line.split("\t")) for line in r.stdout.split("\n") if line.strip()]
    mine = [(struct.unpack_from("!H", p, 26)[0], struct.unpack_from("!H", p, 22)[0]) for p, _ in packets]
    assert theirs == mine and len(mine) == 8


def test_report_reads_tcpdump_secrets_too(tmp_path: Path) -> None:
    """`report --keys` takes the same key files as `decrypt`: tcpdump's secrets open tcpdump's
    ESP-in-ESP capture and every packet names our decryption's result."""
    rc, stdout, stderr = cli("report", str(VECTORS / "tcpdump-08-sunrise-sunset-esp2.pcap"),
                             "--keys", str(TCPDUMP_SECRETS), "--format", "json")
    assert rc == 0, stderr
    rows = json.loads(stdout)["reports"][0]["packets"]["rows"]
    assert [r["decrypt"] for r in rows] == ["ok-unverified"] * 8
