"""`start --host` / `--spi` as rule matches, so the kernel never copies a packet we would not write.

The same selection as capture/filters.py (which stays for --no-rules and for files): --host
keeps packets whose source or destination is the address; --spi keeps ESP packets with that SPI,
directly after IP or UDP-encapsulated (RFC 3948: UDP from or to port 4500 whose first payload
word is the SPI, at least 8 bytes of it, as filters.py reads it); both together keep packets that
pass both. Packets without an ESP header never pass --spi, also at the cleartext points.

nft: the base chain of ours holds only `goto` rules, one per alternative of the match, into a
regular chain with the log rules (a goto never comes back, so a packet that fits two
alternatives is still logged once; a packet that fits none meets the base chain's policy, accept:
no verdict changes). Positive matches only: nft 1.0.6 merges adjacent `!=` payload matches into
one compare of both fields (`udp sport != 4500 udp dport != 4500` becomes "not both 4500").
iptables: the jumps from the built-in chains into ours carry the match (one jump per alternative,
the alternatives exclusive, so a packet enters our chain at most once); the NAT-T SPI is read
with `-m u32` (IPv6: at the fixed header's end, so a NAT-T packet behind IPv6 extension headers is
not seen by iptables; nft finds the UDP header wherever it is).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ipsec_capture.wire import NATT_PORT

NAT_T_MIN_UDP_LEN = 16  # UDP header + 8 bytes: the SPI word and one more, as filters.esp_spi needs


@dataclass(frozen=True, slots=True)
class Only:
    """What a rule set lets through: None is "no selection" for each."""

    host: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    spi: int | None = None

    def __bool__(self) -> bool:
        return self.host is not None or self.spi is not None

    def nft_matches(self) -> list[str] | None:
        """The match of each `goto` into our regular chain (alternatives); None: no selection."""
        if not self:
            return None
        hosts = [""]
        if self.host is not None:
            ip = "ip" if self.host.version == 4 else "ip6"
            hosts = [f"{ip} saddr {self.host}", f"{ip} daddr {self.host}"]
        spis = [""]
        if self.spi is not None:
            spi = f"0x{self.spi:08x}"
            natt = f"udp length >= {NAT_T_MIN_UDP_LEN} @th,64,32 {spi}"
            spis = [f"meta l4proto esp esp spi {spi}", f"udp dport {NATT_PORT} {natt}",
                    f"udp sport {NATT_PORT} {natt}"]
        return [" ".join(m for m in (h, s) if m) for h in hosts for s in spis]

    def iptables_jumps(self, family: int) -> list[str] | None:
        """The match of each jump into our chain (exclusive alternatives); None: no selection
        (one plain jump); [] : nothing of this family passes (no jump at all)."""
        if not self:
            return None
        hosts = [""]
        if self.host is not None:
            if self.host.version != family:
                return []
            h = self.host.compressed
            hosts = [f"-s {h}", f"-d {h} ! -s {h}"]
        spis = [""]
        if self.spi is not None:
            spi = f"0x{self.spi:08x}"
            # u32: A starts at the IP header. IPv4: 0>>22&0x3C is the header length in bytes,
            # @ moves to the UDP header; its length field is the top half of word 4, the SPI word 8.
            at = "0>>22&0x3C@" if family == 4 else ""
            udp = 0 if family == 4 else 40
            u32 = (f"{at}{udp + 4}>>16={NAT_T_MIN_UDP_LEN}:0xffff&&{at}{udp + 8}={spi}")
            spis = [f"-p esp -m esp --espspi {spi}",
                    f'-p udp -m multiport --ports {NATT_PORT} -m u32 --u32 "{u32}"']
        return [" ".join(m for m in (h, s) if m) for h in hosts for s in spis]


EVERYTHING = Only()  # no --host/--spi: the default of every rule builder
