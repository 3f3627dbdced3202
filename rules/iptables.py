"""The iptables backend: chains of our own, loaded with `iptables-restore --noflush`.

Works with both flavours of iptables (legacy x_tables and the nf_tables one) by calling the
flavour's own tools (`iptables-legacy-restore`, `ip6tables-nft-save`, ...). Per group and
built-in chain we add one chain `IPSECCAP_G<group>_<BUILTIN>` holding the NFLOG rules, and one
jump to it inserted first in the built-in chain (NFLOG does not terminate, so going first changes
no verdict and sees packets before anybody's DROP). Every rule carries the owner tag as a
comment; removal and cleanup read `*-save` output back and delete exactly those rules and chains.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ipsec_capture.errors import UserError

from .command import have, run
from .only import EVERYTHING, Only
from .owner import Tag, parse_tag
from .points import POINTS

FLAVOURS = ("legacy", "nft")
FAMILIES = (4, 6)
CHAIN_PREFIX = "IPSECCAP_G"
_CHAIN_RE = re.compile(rf"{CHAIN_PREFIX}(\d+)_[A-Z]+")
_COUNTS_RE = re.compile(r"^\[(\d+):(\d+)\] ")
TABLE_ORDER = ("raw", "mangle", "filter")

_IKE = "-p udp -m multiport --ports 500,4500"  # --ports: source or destination, one log per packet
_POLICY_IN = "-m policy --dir in --pol ipsec"
_POLICY_OUT = "-m policy --dir out --pol ipsec"
# IPv6: `-p` skips extension headers and AH is one of them, so AH needs the ah match.
_ESP = {4: ("-p esp", "-p ah"), 6: ("-p esp", "-m ah")}


def matches(point: str, family: int) -> tuple[str, ...]:
    if point.endswith("-esp"):
        return _ESP[family]
    if point.endswith("-ike"):
        return (_IKE,)
    return (_POLICY_OUT if point.endswith("-out") else _POLICY_IN,)


def tool(family: int, flavour: str, what: str) -> str:
    """e.g. tool(6, "legacy", "restore") -> "ip6tables-legacy-restore"."""
    return f"{'ip6tables' if family == 6 else 'iptables'}-{flavour}-{what}"


def default_flavour() -> str:
    """The flavour plain `iptables-restore` is on this machine (Debian alternatives)."""
    proc = run(["iptables-restore", "--version"], None)
    text = proc.stdout + proc.stderr
    if "legacy" in text:
        return "legacy"
    if "nf_tables" in text:
        return "nft"
    raise UserError(f"cannot tell the flavour of iptables-restore from {text.strip()!r}: "
                    "use --backend iptables-legacy or iptables-nft")


def chain_name(group: int, builtin: str) -> str:
    return f"{CHAIN_PREFIX}{group}_{builtin}"


def render(tag: Tag, points: Sequence[str], family: int, only: Only = EVERYTHING) -> str:
    """iptables-restore input for one family (use with --noflush). With `only` (--host/--spi)
    the jumps into our chains carry its match: a packet it drops never enters them."""
    group = tag.group
    by_table: dict[str, dict[str, list[str]]] = {}
    for name in points:
        p = POINTS[name]
        by_table.setdefault(p.table, {}).setdefault(p.chain, []).extend(
            f'-A {chain_name(group, p.chain)} {m} -m comment --comment "{tag.for_point(name).text()}" '
            f"-j NFLOG --nflog-group {group} --nflog-prefix {name}"
            for m in matches(name, family)
        )
    jumps = only.iptables_jumps(family)
    lines = []
    for table in TABLE_ORDER:
        chains = by_table.get(table)
        if not chains:
            continue
        lines.append(f"*{table}")
        lines += [f":{chain_name(group, builtin)} - [0:0]" for builtin in chains]
        for builtin, rules in chains.items():
            jump = chain_name(group, builtin)
            lines += [f'-I {builtin} 1 {m + " " if m else ""}-m comment --comment "{tag.text()}" -j {jump}'
                      for m in reversed(jumps if jumps is not None else [""])]
            lines += rules
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


@dataclass(slots=True)
class Found:
    """Our pieces in one family's `*-save` output."""

    chains: dict[str, list[str]] = field(default_factory=dict)  # table -> our chain names
    jumps: dict[str, list[str]] = field(default_factory=dict)  # table -> "-A BUILTIN spec" lines
    tags: list[Tag] = field(default_factory=list)
    packets: dict[tuple[int, str], int] = field(default_factory=dict)  # (group, point) -> packets

    def groups(self) -> set[int]:
        return {_group_of(c) for cs in self.chains.values() for c in cs}


def _group_of(chain: str) -> int:
    """The NFLOG group in one of our chain names (Found holds only names _CHAIN_RE matched)."""
    m = _CHAIN_RE.fullmatch(chain)
    assert m is not None, chain
    return int(m[1])


def parse_save(text: str) -> Found:
    found, table = Found(), ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":"):
            chain = line[1:].split()[0]
            if _CHAIN_RE.fullmatch(chain):
                found.chains.setdefault(table, []).append(chain)
        else:
            packets = 0
            if m := _COUNTS_RE.match(line):
                packets, line = int(m[1]), line[m.end():]
            if not line.startswith("-A "):
                continue
            chain = line.split()[1]
            if _CHAIN_RE.fullmatch(chain):
                if tag := parse_tag(line):
                    found.tags.append(tag)
                    if tag.point:
                        key = (tag.group, tag.point)
                        found.packets[key] = found.packets.get(key, 0) + packets
            elif re.search(rf"-j {CHAIN_PREFIX}\d+_[A-Z]+\b", line):
                found.jumps.setdefault(table, []).append(line)
    return found


def scan(family: int, flavour: str, netns: str | None) -> Found:
    save = tool(family, flavour, "save")
    if not have(save):
        return Found()
    proc = run([save, "-c"], netns, check=False)
    # A flavour whose save fails (kernel without nf_tables or x_tables) cannot hold rules of ours.
    return parse_save(proc.stdout) if proc.returncode == 0 else Found()


def removal(found: Found, groups: set[int]) -> str:
    """restore --noflush input that deletes our jumps and chains for `groups` ("" if none)."""
    lines = []
    for table in TABLE_ORDER + tuple(t for t in found.chains if t not in TABLE_ORDER):
        chains = [c for c in found.chains.get(table, []) if _group_of(c) in groups]
        jumps = [j for j in found.jumps.get(table, [])
                 if (m := re.search(rf"-j ({CHAIN_PREFIX}\d+_[A-Z]+)\b", j)) and m[1] in chains]
        if not chains:
            continue
        lines.append(f"*{table}")
        lines += ["-D" + j[2:] for j in jumps]
        lines += [f"-F {c}" for c in chains]
        lines += [f"-X {c}" for c in chains]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


def delete(groups: set[int], family: int, flavour: str, netns: str | None) -> bool:
    """Remove our rules for `groups` in one family; False if there were none."""
    script = removal(scan(family, flavour, netns), groups)
    if not script:
        return False
    run([tool(family, flavour, "restore"), "--noflush"], netns, stdin=script)
    return True
