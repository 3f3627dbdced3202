"""The pcapng writer read back by tshark (the oracle) and by our reader; the reader on pcap in both
byte orders and resolutions, other link types, truncated and malformed files; a full disk."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP
from scapy.layers.l2 import CookedLinux, Dot1Q, Ether
from scapy.utils import wrpcap

from ipsec_capture.capture.pcapng import PcapngWriter
from ipsec_capture.capture.pcapread import read_records
from ipsec_capture.errors import UserError
from ipsec_capture.models import Record
from tests.conftest import IS_ROOT, require_tool

T0 = 1_700_000_000_123_456_789


def packets() -> list[Record]:
    esp4 = bytes(IP(src="192.0.2.1", dst="192.0.2.2") / ESP(spi=0x1001, seq=1) / (b"a" * 30))
    ike6 = bytes(IPv6(src="2001:db8::2", dst="2001:db8::1") / UDP(sport=500, dport=500) / (b"b" * 40))
    return [
        Record(T0, "raw-pre-esp", esp4, hook=0, indev=1, mark=0x5, seq=0),
        Record(T0 + 1000, "raw-out-ike", ike6, hook=3, outdev=1, seq=1),
        Record(T0 + 2000, "raw-pre-esp", esp4, hook=0, indev=1, mark=0x5, seq=2),
    ]


def write(path: Path, linktype: str = "nflog") -> list[Record]:
    recs = packets()
    with PcapngWriter(path, linktype=linktype, ifname=lambda i: f"dev{i}") as w:
        assert w.interface("raw-pre-esp", "raw PREROUTING: ESP arriving") == 0
        assert w.interface("raw-pre-esp") == 0
        for i, r in enumerate(recs):
            w.write(r, comment="extra" if i == 1 else None)
    return recs


def tshark(path: Path, *fields: str) -> list[list[str]]:
    argv = [require_tool("tshark"), "-r", str(path), "-T", "fields", "-E", "separator=|"]
    for f in fields:
        argv += ["-e", f]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    return [line.split("|") for line in out.splitlines()]


def test_tshark_reads_points_prefixes_comments_direction(tmp_path: Path) -> None:
    path = tmp_path / "out.pcapng"
    write(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    rows = tshark(path, "frame.interface_name", "nflog.prefix", "frame.comment",
                  "frame.packet_flags_direction", "nflog.hook", "frame.time_epoch")
    assert [r[:2] for r in rows] == [["raw-pre-esp"] * 2, ["raw-out-ike"] * 2, ["raw-pre-esp"] * 2]
    assert rows[0][2] == "raw-pre-esp in=dev1 mark=0x5"
    assert rows[1][2] == "extra; raw-out-ike out=dev1"
    assert [int(r[3], 16) for r in rows] == [1, 2, 1]  # inbound, outbound, inbound
    assert rows[0][5].startswith("1700000000.123456789")
    info = subprocess.run(["capinfos", str(path)], capture_output=True, text=True, timeout=60).stdout
    assert "ipsec-capture" in info and "raw PREROUTING: ESP arriving" in info and "hostname:" in info


def test_raw_linktype_read_by_tshark(tmp_path: Path) -> None:
    path = tmp_path / "raw.pcapng"
    write(path, "raw")
    rows = tshark(path, "frame.interface_name", "esp.spi", "udp.dstport", "ip.src", "ipv6.src")
    assert rows == [["raw-pre-esp", "0x00001001", "", "192.0.2.1", ""],
                    ["raw-out-ike", "", "500", "", "2001:db8::2"],
                    ["raw-pre-esp", "0x00001001", "", "192.0.2.1", ""]]


@pytest.mark.parametrize("linktype", ["nflog", "raw"])
def test_our_reader_round_trip(tmp_path: Path, linktype: str) -> None:
    path = tmp_path / "rt.pcapng"
    recs = write(path, linktype)
    back = list(read_records(str(path)))
    assert [(b.point, b.time_ns, bytes(b.payload)) for b in back] == [
        (r.point, r.time_ns, bytes(r.payload)) for r in recs]
    assert back[1].comment == "extra; raw-out-ike out=dev1"
    if linktype == "nflog":
        assert [(b.hook, b.indev, b.outdev, b.mark, b.seq) for b in back] == [
            (r.hook, r.indev, r.outdev, r.mark, r.seq) for r in recs]


def test_truncated_file_reads_to_last_whole_block(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "cut.pcapng"
    write(path)
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    assert len(list(read_records(str(path)))) == 2
    assert "cut short" in capsys.readouterr().err
    # tshark agrees on what a whole block is: it reads the same two packets
    proc = subprocess.run(["tshark", "-r", str(path)], capture_output=True, text=True, timeout=60)
    assert len(proc.stdout.splitlines()) == 2


def test_malformed_block_names_offset(tmp_path: Path) -> None:
    path = tmp_path / "bad.pcapng"
    write(path)
    data = bytearray(path.read_bytes())
    shb_len = struct.unpack_from("<I", data, 4)[0]
    struct.pack_into("<I", data, shb_len + 4, 13)  # the IDB's length: not a multiple of 4
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"offset {shb_len}"):
        list(read_records(str(path)))


def test_not_a_capture(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("hello world\n")
    with pytest.raises(UserError, match="not a pcap or pcapng"):
        list(read_records(str(path)))
    with pytest.raises(UserError, match="cannot read"):
        list(read_records(str(tmp_path / "missing.pcap")))


_SEED = None


def _seed() -> bytes:
    global _SEED
    if _SEED is None:
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "seed.pcapng"
            write(p)
            _SEED = p.read_bytes()
    return _SEED


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 2000))
def test_fuzz_mutated_files_only_user_errors(tmp_path_factory: pytest.TempPathFactory,
                                             muts: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(_seed())
    for pos, val in muts:
        data[pos % len(data)] = val
    path = tmp_path_factory.mktemp("fuzz") / "f.pcapng"
    path.write_bytes(bytes(data[: max(4, len(data) - cut % 64)]))
    try:
        for _ in read_records(str(path), warn=lambda m: None):
            pass
    except UserError:
        pass


def _pcap(path: Path, order: str, nsec: bool, linktype: int, frames: list[bytes]) -> None:
    magic = 0xA1B23C4D if nsec else 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    for i, f in enumerate(frames):
        out += struct.pack(order + "IIII", 1_700_000_000, 5 + i, len(f), len(f)) + f
    path.write_bytes(out)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("nsec", [False, True])
def test_pcap_byte_orders_and_resolutions(tmp_path: Path, order: str, nsec: bool) -> None:
    ip = bytes(IP(src="192.0.2.1", dst="192.0.2.2") / ESP(spi=9))
    path = tmp_path / "x.pcap"
    _pcap(path, order, nsec, 101, [ip, ip])
    back = list(read_records(str(path)))
    assert [bytes(b.payload) for b in back] == [ip, ip]
    assert back[1].time_ns == 1_700_000_000 * 10**9 + 6 * (1 if nsec else 1000)
    assert back[0].point == "if0"


def test_other_link_types(tmp_path: Path) -> None:
    ip = IP(src="192.0.2.1", dst="192.0.2.2") / ESP(spi=9)
    eth = tmp_path / "eth.pcap"
    wrpcap(str(eth), [Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / Dot1Q(vlan=7) / ip,
                      Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x0806) / b"arp" * 10])
    assert [bytes(r.payload) for r in read_records(str(eth))] == [bytes(ip)]
    sll = tmp_path / "sll.pcap"
    wrpcap(str(sll), [CookedLinux(proto=0x0800) / ip])
    assert [bytes(r.payload) for r in read_records(str(sll))] == [bytes(ip)]
    sll2 = tmp_path / "sll2.pcap"
    _pcap(sll2, "<", False, 276, [struct.pack("!HHIHBB8s", 0x0800, 0, 2, 1, 4, 6, b"\0" * 8) + bytes(ip)])
    assert [bytes(r.payload) for r in read_records(str(sll2))] == [bytes(ip)]


ENOSPC_SCRIPT = """
import sys
from ipsec_capture.capture.pcapng import PcapngWriter
from ipsec_capture.capture.pcapread import read_records
from ipsec_capture.models import Record
path = sys.argv[1]
w = PcapngWriter(path)
w.interface("p")
n = 0
try:
    while True:
        w.write(Record(n, "p", b"\\x45" + b"\\0" * 1000))
        n += 1
        if n % 10 == 0:
            w.flush()
except OSError as err:
    print("errno", err.errno, "committed", w.packets_committed)
w.close()
print("read", sum(1 for _ in read_records(path)))
"""


@pytest.mark.skipif(not IS_ROOT, reason="needs root to mount a tiny tmpfs in a private mount namespace")
def test_disk_full_leaves_whole_blocks(tmp_path: Path) -> None:
    """A 64 KiB tmpfs in a private mount namespace (nothing of the host's is touched)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(ENOSPC_SCRIPT)
    shell = (f"mount -t tmpfs -o size=64k none {mnt} && {sys.executable} {script} {mnt}/out.pcapng"
             f" && tshark -r {mnt}/out.pcapng | wc -l")
    proc = subprocess.run([shutil.which("unshare") or "unshare", "-m", "--propagation", "private",
                           "sh", "-c", shell], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    errno_line, read_line, tshark_count = lines[0].split(), lines[1].split(), int(lines[2])
    assert errno_line[1] == "28"  # ENOSPC
    committed = int(errno_line[3])
    assert committed > 0 and int(read_line[1]) == committed == tshark_count


def test_buffer_growth_long_comments_and_in_memory_blocks(tmp_path: Path) -> None:
    """Packets filled in place (reserve/commit) through several flushes, a comment longer than the
    room reserved for options, a packet cut to the snap length; an in-memory writer's take()
    gives the same blocks, growing past its first buffer, and reuses a buffer given back."""
    long_comment = ("ESP " + "x" * 5000).encode()
    big = bytes(IP(src="192.0.2.1", dst="192.0.2.2") / UDP() / (b"c" * 1400))
    recs = [Record(T0 + i, f"p{i % 3}", big, hook=i % 5) for i in range(3000)]
    path = tmp_path / "grow.pcapng"

    def fill(w: PcapngWriter) -> None:
        for i, r in enumerate(recs):
            comment = long_comment if i % 997 == 0 else (b"seq %d" % i if i % 2 else b"")
            w.write(r, comment.decode() or None)

    with PcapngWriter(path, linktype="raw", snaplen=1000) as w:
        fill(w)
    memory = PcapngWriter(None, linktype="raw", snaplen=1000)
    fill(memory)
    blocks = memory.take()
    assert len(blocks) > 2 * 1024 * 1024
    data = path.read_bytes()
    shb_len = struct.unpack_from("<I", data, 4)[0]
    assert bytes(blocks) == data[shb_len:]
    rows = tshark(path, "frame.cap_len", "frame.len", "frame.comment")
    assert len(rows) == len(recs) and {r[0] for r in rows} == {"1000"}
    assert rows[0][2] == long_comment.decode() + "; p0" and rows[3][2] == "seq 3; p0" and rows[2][2] == "p2"
    memory.give_back(blocks)
    recycled = blocks.obj
    memory.write(recs[0])
    assert memory.take().obj is not recycled  # in use: the one taken before
    assert memory.buf is recycled
