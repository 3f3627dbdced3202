"""Benchmark: our `ipsec-capture decrypt` against tshark decrypting the same file, in one run.

    python -m bench.decrypt [--packets 200000] [--size 1400] [--rounds 3] [--keep DIR] [--out-dir DIR]

For each suite (AES-GCM-128 with a 16-byte ICV; AES-CBC-128 with HMAC-SHA-256-128) it writes a
pcap (LINKTYPE_RAW) of ESP tunnel packets of --size bytes, an esp_sa table for them
(xfrm/esp_sa.py), then times, as whole processes:
  - `ipsec-capture decrypt IN --keys esp_sa -w OUT.pcapng` (read, decrypt, write pcapng), and
  - `tshark -r IN -o <the esp_sa table> -T fields -e udp.dstport` (Wireshark's own decryption;
    the UDP field forces the inner packet to be dissected, and counts what tshark decrypted),
and the decoder alone in this process. Our decrypt runs twice: as a user gets it (one process
per core, up to 4, for a file this size) and in one process (-j 1), writing its pcapng to
tmpfs by default (tshark writes nothing; on this machine's virtual disk the page cache writes
alone vary from 1 to 5 us a packet between runs). The three processes take turns for
--rounds rounds (a machine whose speed drifts affects all alike); it prints each one's median
packets/s, the ratio of the medians to tshark's (target >= 10x, issue 16) and the range of the ratios
within a round. The package is byte-compiled first, as an installed package is (an editable
install compiles our modules at every start where PYTHONDONTWRITEBYTECODE is set).
Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import compileall
import hmac
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ipsec_capture.decrypt.decoder import EspDecoder
from ipsec_capture.decrypt.parallel import auto_jobs
from ipsec_capture.xfrm.esp_sa import tshark_args, write_esp_sa
from ipsec_capture.xfrm.sa import SA, Algorithm

SRC, DST = "192.0.2.1", "192.0.2.2"
LINKTYPE_RAW = 101  # pcap-linktype(7): raw IPv4/IPv6
_PCAP_HEADER = struct.Struct("<IHHiIII")  # magic, version 2.4, thiszone, sigfigs, snaplen, linktype
_PCAP_RECORD = struct.Struct("<IIII")  # ts_sec, ts_usec, incl_len, orig_len
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_ESP = struct.Struct("!II")


def _ip4(proto: int, payload_len: int, src: bytes, dst: bytes) -> bytes:
    """An IPv4 header with a correct checksum (tshark and our decoder both look at it)."""
    head = _IP4.pack(0x45, 0, 20 + payload_len, 0, 0x4000, 64, proto, 0, src, dst)
    words = struct.unpack("!10H", head)
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return head[:10] + struct.pack("!H", ~total & 0xFFFF) + head[12:]


def _inner(size: int) -> bytes:
    """An inner IPv4/UDP packet sized so the outer ESP packet is about `size` bytes."""
    data = os.urandom(max(size - 20 - 8 - 16 - 20 - 8 - 16 - 2, 8))
    udp = _UDP.pack(40000, 9, 8 + len(data), 0) + data
    return _ip4(17, len(udp), bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])) + udp


def _sealer(suite: str, key: bytes, auth_key: bytes):
    """Per-packet ESP sealer (independent of the decoder: fresh contexts, plain HMAC)."""
    if suite == "gcm":
        aead, salt = AESGCM(key[:-4]), key[-4:]

        def seal(spi: int, seq: int, plain: bytes) -> bytes:
            header, iv = _ESP.pack(spi, seq), seq.to_bytes(8, "big")
            return header + iv + aead.encrypt(salt + iv, plain, header)

        return seal, 4

    def seal_cbc(spi: int, seq: int, plain: bytes) -> bytes:
        header, iv = _ESP.pack(spi, seq), os.urandom(16)
        enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        body = header + iv + enc.update(plain) + enc.finalize()
        return body + hmac.digest(auth_key, body, "sha256")[:16]

    return seal_cbc, 16


def build(path: Path, suite: str, packets: int, size: int) -> SA:
    """Write the pcap; return the SA that decrypts it."""
    spi = 0x1000 + (suite == "cbc")
    if suite == "gcm":
        key, auth_key = os.urandom(20), b""
        sa = SA(src=SRC, dst=DST, spi=spi, mode="tunnel", family=2,
                aead=Algorithm("rfc4106(gcm(aes))", key, icv_bits=128))
    else:
        key, auth_key = os.urandom(16), os.urandom(32)
        sa = SA(src=SRC, dst=DST, spi=spi, mode="tunnel", family=2, enc=Algorithm("cbc(aes)", key),
                auth=Algorithm("hmac(sha256)", auth_key, trunc_bits=128))
    seal, align = _sealer(suite, key, auth_key)
    inner = _inner(size)
    pad = (-(len(inner) + 2)) % align
    plain = inner + bytes(range(1, pad + 1)) + bytes([pad, 4])
    src, dst = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
    with open(path, "wb") as fh:
        fh.write(_PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_RAW))
        for seq in range(1, packets + 1):
            esp = seal(spi, seq, plain)
            pkt = _ip4(50, len(esp), src, dst) + esp
            fh.write(_PCAP_RECORD.pack(1_700_000_000 + seq // 1000, seq % 1000 * 1000, len(pkt), len(pkt)))
            fh.write(pkt)
    return sa


def _timed(argv: list[str]) -> tuple[float, float, subprocess.CompletedProcess[bytes]]:
    """Wall-clock and CPU (user + system) seconds of one process. The ratio is on wall clock, as a
    user waits; CPU shows how much of it was the process's own work on a loaded machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, proc


def decoder_only(path: Path, sa: SA) -> float:
    """Packets/s of EspDecoder.decrypt alone over the file's packets (read into memory first)."""
    data = path.read_bytes()
    pos, pkts = 24, []
    while pos < len(data):
        incl = _PCAP_RECORD.unpack_from(data, pos)[2]
        pkts.append(data[pos + 16:pos + 16 + incl])
        pos += 16 + incl
    dec = EspDecoder([sa])
    start = time.perf_counter()
    ok = sum(dec.decrypt(p).status == "ok" for p in pkts)
    elapsed = time.perf_counter() - start
    if ok != len(pkts):
        raise SystemExit(f"decoder decrypted only {ok} of {len(pkts)}")
    return len(pkts) / elapsed


def _byte_compile() -> None:
    """Compile the package's modules to .pyc where they are (pip does so for a regular install)."""
    import ipsec_capture
    import ipsec_capture.capture
    import ipsec_capture.xfrm

    for package in (ipsec_capture, ipsec_capture.capture, ipsec_capture.xfrm):
        root = Path(package.__file__).parent
        compileall.compile_dir(str(root), quiet=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.decrypt", description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=1400, help="outer packet size in bytes")
    ap.add_argument("--suite", choices=["gcm", "cbc", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=3, help="turns each process takes (medians are printed)")
    ap.add_argument("--keep", metavar="DIR", help="keep the files in DIR")
    ap.add_argument("--out-dir", metavar="DIR", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where our decrypt writes its pcapng (default /dev/shm: tshark writes nothing, "
                         "so the disk's speed is kept out of the comparison; give a disk directory to "
                         "see it)")
    args = ap.parse_args(argv)
    tshark = shutil.which("tshark")
    if tshark is None:
        print("tshark is not installed: run ./dev.sh setup", file=sys.stderr)
        return 1
    _byte_compile()
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="bench-decrypt-"))
    workdir.mkdir(parents=True, exist_ok=True)
    suites = ["gcm", "cbc"] if args.suite == "both" else [args.suite]
    try:
        for suite in suites:
            pcap, keys = workdir / f"{suite}.pcap", workdir / f"{suite}.esp_sa"
            out = Path(args.out_dir or workdir) / f"bench-decrypt-{os.getpid()}-{suite}.out.pcapng"
            sa = build(pcap, suite, args.packets, args.size)
            keys.write_text(write_esp_sa([sa], 8))
            n = args.packets
            ours = {f"decrypt ({auto_jobs(pcap)} proc)": [], "decrypt -j 1": ["-j", "1"]}
            walls: dict[str, list[float]] = {label: [] for label in [*ours, "tshark"]}
            cpus: dict[str, list[float]] = {label: [] for label in walls}
            decrypted = 0
            for _ in range(args.rounds):
                for label, extra in ours.items():
                    # every run starts with nothing waiting to be written back (the input just
                    # built, the previous run's output): each is timed with only its own I/O
                    out.unlink(missing_ok=True)
                    os.sync()
                    t, cpu, proc = _timed([sys.executable, "-m", "ipsec_capture", "decrypt", str(pcap),
                                           "--keys", str(keys), "-w", str(out), "--json", "-q", *extra])
                    if proc.returncode != 0:
                        print(f"{suite}: our {label} failed: {proc.stderr.decode(errors='replace').strip()}",
                              file=sys.stderr)
                        return 1
                    walls[label].append(t)
                    cpus[label].append(cpu)
                out.unlink(missing_ok=True)
                os.sync()
                t, cpu, shark = _timed([tshark, "-n", "-r", str(pcap), *tshark_args([sa], 8),
                                        "-T", "fields", "-e", "udp.dstport"])
                walls["tshark"].append(t)
                cpus["tshark"].append(cpu)
                decrypted = sum(1 for line in shark.stdout.splitlines() if line.strip() == b"9")
            dec_rate = decoder_only(pcap, sa)
            shark_rate = n / statistics.median(walls["tshark"])
            print(f"{suite}: {n} packets of {args.size} B, {args.rounds} rounds, medians (our output in "
                  f"{out.parent})")
            print(f"  tshark decrypt              {shark_rate:>10,.0f} pkt/s  "
                  f"({statistics.median(walls['tshark']):.1f} s, "
                  f"CPU {statistics.median(cpus['tshark']):.1f} s, decrypted {decrypted})")
            for label in ours:
                t = statistics.median(walls[label])
                per_round = [shark / mine for shark, mine in zip(walls["tshark"], walls[label], strict=True)]
                print(f"  ipsec-capture {label:<13} {n / t:>10,.0f} pkt/s  ({t:.2f} s, CPU "
                      f"{statistics.median(cpus[label]):.2f} s)  ratio {n / t / shark_rate:.1f}x tshark "
                      f"(rounds {min(per_round):.1f}-{max(per_round):.1f}x; target >= 10x)")
            print(f"  EspDecoder alone            {dec_rate:>10,.0f} pkt/s  "
                  f"ratio {dec_rate / shark_rate:.1f}x tshark")
            out.unlink(missing_ok=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
