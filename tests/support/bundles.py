"""Bundles, pcaps and traffic for tests: what the real writers (PcapngWriter, EventLogWriter,
esp_sa) make of a synthetic host, a mixed ESP capture with its key table, UDP from a namespace."""

from __future__ import annotations

import struct
from pathlib import Path

from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from ipsec_capture.bpf.eventlog import EventLogWriter, make_header
from ipsec_capture.capture.pcapng import PcapngWriter
from ipsec_capture.xfrm.esp_sa import write_esp_sa
from tests.support.esp_build import SUITES, Keys, make_sa, outer, seal
from tests.support.synthetic import Host, esp4, udp4

A, B = "192.0.2.1", "192.0.2.2"
IA, IB = "10.1.0.1", "10.2.0.1"
MS = 1_000_000
T0 = 1_700_000_000 * 1_000_000_000
SPI, SPI_BACK = 0xC0FFEE01, 0xC0FFEE02
KEY = bytes(range(20))


def write_bundle(stem: Path, host: Host, sas=(), header_sources=None) -> Path:
    records, events = host.sorted()
    cap = stem.with_suffix(".pcapng")
    with PcapngWriter(cap, ifname=lambda i: f"if{i}") as w:
        for r in records:
            w.write(r)
    with EventLogWriter(f"{stem}.events.jsonl", make_header(sources=header_sources or [])) as ev:
        for e in events:
            ev.write(e)
    if sas:
        Path(f"{stem}.esp_sa").write_text(write_esp_sa(list(sas)))
    return cap


def no_state_host() -> Host:
    """Receiver B: 5 packets decapsulated, SA deleted, 3 more dropped, XfrmInNoStates +3."""
    h = Host()
    h.sa_snapshot(T0 - 1000, SPI, A, B)
    for seq in range(1, 9):
        t = T0 + seq * 100 * MS
        inner = udp4(IA, IB, seq, b"x" * 40)
        h.esp_in(t, esp4(A, B, SPI, seq, inner, KEY, ident=seq))
        if seq <= 5:
            h.clear(t + 20_000, "mangle-pre-in", inner)
    h.sa_change(T0 + 550 * MS, "sa-delete", SPI, A, B)
    h.counter(T0 + 1000 * MS, "XfrmInNoStates", 3, 3)
    return h



LINKTYPE_RAW = 101
A4, B4, A6, B6 = "192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2"


def write_pcap(path: Path, packets: list[bytes]) -> None:
    """Classic pcap, raw IP link type: what `tcpdump -i any`-less tools and other people send us."""
    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_RAW))
        for i, p in enumerate(packets):
            fh.write(struct.pack("<IIII", 1_700_000_000, i, len(p), len(p)) + p)


def scenario(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A capture mixing a GCM tunnel (v4), a CBC+SHA256 transport SA (v6), NAT-T, a plain
    packet, a tampered packet and an SPI without keys; the esp_sa table for it."""
    gcm, cbc, natt = Keys.random(SUITES[0]), Keys.random(SUITES[12]), Keys.random(SUITES[1])
    icmp = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(id=7, seq=1) / Raw(b"ping"))
    udp6 = IPv6(src=A6, dst=B6) / UDP(sport=4000, dport=5000) / Raw(b"six")
    udp6_l4 = bytes(udp6)[40:]
    natt_inner = bytes(IP(src="10.9.0.1", dst="10.9.0.2") / UDP(sport=53, dport=53) / Raw(b"dns"))
    tampered = bytearray(outer(seal(gcm, 0x101, 3, icmp, 4), A4, B4))
    tampered[-3] ^= 1
    packets = [
        outer(seal(gcm, 0x101, 1, icmp, 4), A4, B4),
        bytes(IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / Raw(b"clear")),
        outer(seal(cbc, 0x202, 1, udp6_l4, 17), A6, B6),
        outer(seal(natt, 0x303, 9, natt_inner, 4), "198.51.100.7", B4, natt=True),
        bytes(tampered),
        outer(seal(gcm, 0x404, 1, icmp, 4), A4, B4),
    ]
    pcap, keys = tmp_path / "in.pcap", tmp_path / "in.esp_sa"
    write_pcap(pcap, packets)
    sas = [make_sa(gcm, 0x101, A4, B4, mode="tunnel"), make_sa(cbc, 0x202, A6, B6),
           make_sa(natt, 0x303, A4, B4, mode="tunnel", natt=True)]
    keys.write_text(write_esp_sa(sas, 8))
    return pcap, keys, ["ok", "not-esp", "ok", "ok", "icv-fail", "no-sa"]



def send_udp(pair, host: str, dst: str, count: int) -> None:
    """`count` UDP datagrams from `host`; send errors (EPERM from a block policy) are expected."""
    code = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"for _ in range({count}):\n"
            f"    try: s.sendto(b'x', ('{dst}', 9))\n"
            "    except OSError: pass\n")
    pair.run(host, "python3", "-c", code)
