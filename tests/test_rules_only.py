"""--host/--spi in the rules: the rule text holds the match (nft and iptables), the kernel takes
it, and with real traffic the filtered packets never reach the NFLOG socket.

The oracle is the user-space filter (capture/filters.py), which stays for --no-rules and files:
one unfiltered rule set (group 41) and one filtered (group 42) sit side by side on host `a`;
each group is read with our NflogReader; what the filtered group received must be exactly what
PacketFilter keeps of the unfiltered group, packet for packet, at every point. The traffic mixes
ESP with the SPI and with another one, NAT-T ESP (both directions of port 4500), a NAT-T
keepalive (one byte, the SPI check must not read past it), IKE with the non-ESP marker, other
hosts, IPv4 and IPv6.
"""

from __future__ import annotations

import ipaddress
import json
import select
import sys
import time
from collections import Counter

import pytest

from ipsec_capture.capture.filters import build_filter
from ipsec_capture.capture.nflog import NflogReader
from ipsec_capture.rules import iptables, nft
from ipsec_capture.rules.manager import build, install, remove
from ipsec_capture.rules.only import Only
from ipsec_capture.rules.points import POINTS as POINTS_ALL
from tests.conftest import IS_ROOT, require_tool
from tests.netlab import NetnsPair, sh, single_netns

SPI = 0xB1A40001
OTHER_SPI = 0xB1A40002
POINTS = ["raw-pre-esp", "raw-pre-ike", "raw-out-esp", "raw-out-ike"]

# Runs in a namespace: argv[1] = JSON [(kind, family, dst, port, payload_hex, count), ...].
SENDER = r"""
import json, socket, sys
for kind, fam, dst, port, hexdata, count in json.loads(sys.argv[1]):
    af = socket.AF_INET6 if fam == 6 else socket.AF_INET
    data = bytes.fromhex(hexdata)
    if kind == "esp":
        s = socket.socket(af, socket.SOCK_RAW, 50)
        for _ in range(count):
            s.sendto(data, (dst, 0))
    else:  # udp from `port` to `port` (NAT-T both ways, IKE), or from 40000 to `port`
        s = socket.socket(af, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::" if fam == 6 else "0.0.0.0", port if kind == "udp" else 40000))
        for _ in range(count):
            s.sendto(data, (dst, port))
    s.close()
"""


def esp(spi: int) -> str:
    return (spi.to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\xa5" * 40).hex()


def traffic(dst4: str, dst6: str) -> list[tuple]:
    items: list[tuple] = []
    for fam, dst in ((4, dst4), (6, dst6)):
        items += [("esp", fam, dst, 0, esp(SPI), 3), ("esp", fam, dst, 0, esp(OTHER_SPI), 2),
                  ("udp", fam, dst, 4500, esp(SPI), 2), ("udp", fam, dst, 4500, esp(OTHER_SPI), 1),
                  ("udp-hi", fam, dst, 4500, esp(SPI), 2),  # from a high port to 4500
                  ("udp", fam, dst, 4500, "ff", 1),  # NAT-T keepalive
                  ("udp", fam, dst, 4500, "00000000" + "49" * 20, 1),  # IKE behind the non-ESP marker
                  ("udp", fam, dst, 500, (SPI.to_bytes(4, "big") * 4).hex(), 1)]  # IKE port 500
    return items


# --- the rule text holds the match (no root needed) -------------------------------------------

def test_nft_text_guards_every_base_chain_with_the_match() -> None:
    only = Only(ipaddress.ip_address("192.0.2.1"), SPI)
    text = build(5, None, "nft", only=only).text()
    chains = {c.split(" {")[0]: c for c in text.split("\tchain ")[1:]}
    bases = {nft.chain_name(p) for p in POINTS_ALL}
    assert set(chains) == bases | {f"{c}{nft.ONLY_SUFFIX}" for c in bases}
    for base in bases:
        lines = [line.strip() for line in chains[base].splitlines()[2:] if line.strip() != "}"]
        assert lines == [f"ip {way} 192.0.2.1 {m} goto {base}_only" for way in ("saddr", "daddr") for m in (
            "meta l4proto esp esp spi 0xb1a40001",
            "udp dport 4500 udp length >= 16 @th,64,32 0xb1a40001",
            "udp sport 4500 udp length >= 16 @th,64,32 0xb1a40001")]
        assert " log prefix " in chains[f"{base}_only"] and "hook" not in chains[f"{base}_only"]
    assert "goto" not in build(5, None, "nft").text()  # no selection: the log rules in the base chains
    assert "ip6 saddr 2001:db8::1 goto raw_prerouting_only" in build(
        5, ["raw-pre-esp"], "nft", only=Only(ipaddress.ip_address("2001:db8::1"))).text()


def test_iptables_text_puts_the_match_in_the_jumps() -> None:
    only = Only(ipaddress.ip_address("2001:db8::1"), SPI)
    rs = build(5, ["raw-pre-esp"], "iptables-legacy", only=only)
    v4, v6 = (text for _, text in rs.scripts())
    assert " -j IPSECCAP_G5_PREROUTING" not in v4  # an IPv6 host: no IPv4 packet enters our chain
    jumps = [line for line in v6.splitlines() if line.startswith("-I PREROUTING")]
    assert len(jumps) == 4
    for line in jumps:
        assert ("1 -s 2001:db8::1 " in line) != ("1 -d 2001:db8::1 ! -s 2001:db8::1 " in line)
        assert ("-p esp -m esp --espspi 0xb1a40001" in line) != (
            '-p udp -m multiport --ports 4500 -m u32 --u32 "44>>16=16:0xffff&&48=0xb1a40001"' in line)
    spi_only = build(5, ["raw-pre-esp"], "iptables-nft", only=Only(None, SPI)).scripts()[0][1]
    assert '--u32 "0>>22&0x3C@4>>16=16:0xffff&&0>>22&0x3C@8=0xb1a40001"' in spi_only
    assert len([line for line in spi_only.splitlines() if line.startswith("-I PREROUTING")]) == 2


def test_iptables_removal_reads_filtered_jumps_back() -> None:
    """Our jumps with matches still parse as ours from *-save output, and removal deletes them."""
    save = ("*raw\n:PREROUTING ACCEPT [0:0]\n:IPSECCAP_G5_PREROUTING - [0:0]\n"
            '[1:50] -A PREROUTING -p esp -m esp --espspi 2980315137 -m comment --comment '
            '"ipsec-capture g=5 pid=1 t=2" -j IPSECCAP_G5_PREROUTING\n'
            '[0:0] -A PREROUTING -p udp -m multiport --ports 4500 -m u32 '
            '--u32 "0x0>>0x16&0x3c@0x8=0xb1a40001" '
            '-m comment --comment "ipsec-capture g=5 pid=1 t=2" -j IPSECCAP_G5_PREROUTING\nCOMMIT\n')
    script = iptables.removal(iptables.parse_save(save), {5})
    assert script.count("-D PREROUTING") == 2 and "--espspi 2980315137" in script


# --- the kernel takes the text, and filters real traffic ---------------------------------------

@pytest.fixture(scope="module")
def check_ns():
    if not IS_ROOT:
        pytest.skip("needs root to create a network namespace for check mode")
    with single_netns("onl") as name:
        yield name


ONLY = [Only(ipaddress.ip_address("192.0.2.1"), None), Only(ipaddress.ip_address("2001:db8::2"), SPI),
        Only(None, SPI)]


@pytest.mark.parametrize("only", ONLY, ids=["host4", "host6+spi", "spi"])
def test_kernel_accepts_the_text(check_ns: str, only: Only) -> None:
    require_tool("nft")
    nft.check(build(11, None, "nft", only=only).text(), check_ns)
    for flavour in iptables.FLAVOURS:
        for argv, text in build(11, None, f"iptables-{flavour}", only=only).scripts():
            require_tool(argv[0])
            sh(argv[0], "--test", "--noflush", netns=check_ns, input=text.encode())


def _drain(readers: dict[int, NflogReader], quiet_s: float = 0.4) -> dict[int, list]:
    """Everything each group received until no message came for quiet_s (past the 10 ms batch)."""
    got: dict[int, list] = {g: [] for g in readers}
    poller = select.poll()
    for r in readers.values():
        poller.register(r.fileno(), select.POLLIN)
    last = time.monotonic()
    while time.monotonic() - last < quiet_s:
        poller.poll(50)
        for g, r in readers.items():
            batch = r.read_batch()
            if batch:
                last = time.monotonic()
                got[g] += [(rec.point, bytes(rec.payload)) for rec in batch]
    return got


@pytest.mark.parametrize("backend", ["nft", "iptables-legacy", "iptables-nft"])
@pytest.mark.parametrize(("host", "spi"), [(None, SPI), ("192.0.2.2", None), ("2001:db8::2", SPI)],
                         ids=["spi", "host4", "host6+spi"])
def test_filtered_traffic_never_reaches_the_socket(netns_pair: NetnsPair, backend: str,
                                                   host: str | None, spi: int | None) -> None:
    require_tool("nft" if backend == "nft" else f"{backend}-restore")
    only = Only(None if host is None else ipaddress.ip_address(host), spi)
    keep = build_filter(host, spi)
    assert keep is not None
    plain = build(41, POINTS, backend, netns_pair.a)
    picky = build(42, POINTS, backend, netns_pair.a, only=only)
    with NflogReader(41, netns=netns_pair.a) as r41, NflogReader(42, netns=netns_pair.a) as r42:
        install(plain)
        try:
            install(picky)
            try:
                for src, dst4, dst6 in (("b", netns_pair.a4, netns_pair.a6),
                                        ("a", netns_pair.b4, netns_pair.b6)):
                    netns_pair.run(src, sys.executable, "-c", SENDER, json.dumps(traffic(dst4, dst6)))
                got = _drain({41: r41, 42: r42})
            finally:
                remove(picky)
        finally:
            remove(plain)
    assert r41.stats.lost == r42.stats.lost == 0
    everything, selected = got[41], got[42]
    sent = 2 * sum(item[-1] for item in traffic("", ""))  # both directions, each logged once on a
    assert len(everything) == sent  # the whole mix went through the unfiltered rules
    expected = Counter(p for p in everything if keep(p[1]))
    assert 0 < sum(expected.values()) < len(everything)
    assert Counter(selected) == expected
    assert r42.stats.received == len(selected)  # nothing else came to the socket
