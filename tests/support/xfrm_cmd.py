"""Third-party known answers (../shared/vectors) as test inputs: packets, their SAs' commands, and
the `ip xfrm state` text iproute2 prints for those SAs.

`state_text(cmd)` renders an `ip xfrm state add ...` command the way iproute2 6.1 prints the
state it makes (ip/ipxfrm.c: an empty key prints as nothing, `auth` comes back as `auth-trunc`
with the kernel's truncation, an ESN state gets the `anti-replay esn context` block); the lab
test checks the rendering against the real kernel's. Written here from the command, not with
the parser under test.
"""

from __future__ import annotations

import json
import shlex
import struct
from dataclasses import dataclass
from pathlib import Path

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "vectors"
SCAPY_REFS = VECTORS / "scapy_kernel_refs.json"
TCPDUMP_SECRETS = VECTORS / "tcpdump-esp-secrets.txt"
# tcpdump's TESTLIST esp1/esp3 give the 02 capture's key on the command line (the secrets file
# holds the keys of the 08 captures)
TCPDUMP_ESP1 = "0x12345678@192.1.2.45 3des-cbc-hmac96:0x4043434545464649494a4a4c4c4f4f515152525454575758"
TCPDUMP_CAPTURES = {
    "tcpdump-02-sunrise-sunset-esp.pcap": TCPDUMP_ESP1,
    "tcpdump-08-sunrise-sunset-aes.pcap": None,  # None: the secrets file
    "tcpdump-08-sunrise-sunset-esp2.pcap": None,
}
# the kernel's truncation for plain `auth NAME KEY` (net/xfrm/xfrm_algo.c icv_truncbits)
DEFAULT_TRUNC = {"digest_null": 0, "hmac(md5)": 96, "hmac(sha1)": 96, "hmac(sha256)": 96}


@dataclass
class Command:
    """The parts of `ip xfrm state add` the vectors use."""

    src: str
    dst: str
    spi: int
    reqid: int
    mode: str
    algs: list[tuple[str, str, str, int | None]]  # (kind, name, key hex without 0x, bits)
    flags: list[str]
    replay_window: int = 0
    seq_hi: int = 0
    oseq_hi: int = 0

    @property
    def esn(self) -> bool:
        return "esn" in self.flags


def parse_command(cmd: str) -> Command:
    words = shlex.split(cmd)
    assert words[:4] == ["ip", "xfrm", "state", "add"], cmd
    c = Command(src="", dst="", spi=0, reqid=0, mode="transport", algs=[], flags=[])
    i = 4
    while i < len(words):
        w = words[i]
        if w in ("src", "dst", "mode"):
            setattr(c, w, words[i + 1])
            i += 2
        elif w in ("spi", "reqid", "replay-window"):
            setattr(c, w.replace("-", "_"), int(words[i + 1], 0))
            i += 2
        elif w in ("replay-seq-hi", "replay-oseq-hi"):
            setattr(c, "seq_hi" if w == "replay-seq-hi" else "oseq_hi", int(words[i + 1], 0))
            i += 2
        elif w == "proto":
            assert words[i + 1] == "esp"
            i += 2
        elif w in ("enc", "auth"):
            key = words[i + 2]
            c.algs.append((w, words[i + 1], key[2:] if key.startswith("0x") else key.encode().hex(), None))
            i += 3
        elif w == "aead":
            c.algs.append((w, words[i + 1], words[i + 2][2:], int(words[i + 3])))
            i += 4
        elif w == "flag":
            i += 1
            while i < len(words) and words[i] in ("align4", "esn", "noecn", "decap-dscp"):
                c.flags.append(words[i])
                i += 1
        else:
            raise AssertionError(f"unexpected word {w!r} in {cmd}")
    return c


def state_text(cmd: str, keys: bool = True) -> str:
    """What `ip xfrm state` prints for the state `cmd` adds (`keys=False`: the AEAD keys left
    out, as a paste with the keys removed)."""
    c = parse_command(cmd)
    lines = [f"src {c.src} dst {c.dst}",
             f"\tproto esp spi 0x{c.spi:08x} reqid {c.reqid} mode {c.mode}",
             f"\treplay-window {0 if c.esn else c.replay_window} flag {' '.join(c.flags)}"]
    for kind, name, key, bits in c.algs:
        shown = f"0x{key}" if key and keys else ""
        if kind == "aead":
            lines.append(f"\taead {name} {shown} {bits}")
        elif kind == "auth":
            lines.append(f"\tauth-trunc {name} {shown} {DEFAULT_TRUNC[name]}")
        else:
            lines.append(f"\tenc {name} {shown}")
    if c.esn:
        lines += ["\tanti-replay esn context:",
                  f"\t seq-hi 0x{c.seq_hi:x}, seq 0x0, oseq-hi 0x{c.oseq_hi:x}, oseq 0x0",
                  f"\t replay_window {c.replay_window}, bitmap-length {max(1, c.replay_window // 32)}",
                  "\t " + " ".join(["00000000"] * max(1, c.replay_window // 32))]
    else:
        lines.append("\tanti-replay context: seq 0x0, oseq 0x0, bitmap 0x00000000")
    lines.append("\tsel src 0.0.0.0/0 dst 0.0.0.0/0")
    return "\n".join(lines) + "\n"


def scapy_refs() -> list[dict]:
    """The 11 kernel-made ESP packets with their commands (README in ../shared/vectors)."""
    return json.loads(SCAPY_REFS.read_text())


def ref_packet(ref: dict) -> bytes:
    """The outer IPv4 packet of a reference: the SA's addresses around SPI, seq and the data
    (IV, ciphertext, ICV as the kernel made them)."""
    c = parse_command(ref["cmd"])
    esp = struct.pack("!II", ref["spi"], ref["seq"]) + bytes.fromhex(ref["data"])
    total = 20 + len(esp)
    head = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 50, 0,
                                 bytes(map(int, c.src.split("."))), bytes(map(int, c.dst.split(".")))))
    s = sum(struct.unpack("!10H", head))
    s = (s & 0xFFFF) + (s >> 16)
    struct.pack_into("!H", head, 10, ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF)
    return bytes(head) + esp


def ref_id(ref: dict) -> str:
    """A test id: the algorithm, with -esn and the high bits' side."""
    c = parse_command(ref["cmd"])
    name = next(n for kind, n, _, _ in c.algs if kind in ("aead", "enc"))
    tag = name.replace("(", "-").replace(")", "").replace(",", "-").strip("-")
    if c.esn:
        tag += "-esn-" + ("seq-hi" if c.seq_hi else "oseq-hi")
    return tag
