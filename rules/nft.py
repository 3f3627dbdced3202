"""The nftables backend: one `table inet ipsec_capture_gN` per NFLOG group, loaded with `nft -f -`.

One table of our own per group means install is one transaction (`create table` first, so a
race with another capture on the same group aborts the whole script), removal is one
`delete table`, and nothing we do can reorder or disturb anybody else's tables. An `inet` table
sees IPv4 and IPv6 alike.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from .command import run
from .only import EVERYTHING, Only
from .owner import Tag, parse_tag
from .points import POINTS

FAMILY = "inet"
TABLE_PREFIX = "ipsec_capture_g"
_TABLE_RE = re.compile(rf"{TABLE_PREFIX}(\d+)")

ONLY_SUFFIX = "_only"  # the regular chain behind a base chain's --host/--spi gotos
# iptables table -> nft base chain priority (NF_IP_PRI_RAW / _MANGLE / _FILTER, <linux/netfilter_ipv4.h>)
PRIORITY = {"raw": -300, "mangle": -150, "filter": 0}

_IKE_PORTS = "{ 500, 4500 }"
# Per point: the match expressions of its rules (one rule per entry). IKE needs two rules so a
# packet from or to 500/4500 is logged once; AH over IPv6 needs its own rule because
# `meta l4proto` skips IPv6 extension headers, AH among them.
_MATCHES: dict[str, tuple[str, ...]] = {
    "esp": ("meta l4proto { esp, ah }", "ip6 nexthdr ah"),
    "ike": (f"udp dport {_IKE_PORTS}", f"udp sport {_IKE_PORTS} udp dport != {_IKE_PORTS}"),
    "in": ("meta ipsec exists",),  # skb has a secpath: it was decapsulated
    "out": ("rt ipsec exists",),  # the route is an xfrm bundle: it will be encrypted
}


def matches(point: str) -> tuple[str, ...]:
    if point.endswith("-esp"):
        return _MATCHES["esp"]
    if point.endswith("-ike"):
        return _MATCHES["ike"]
    return _MATCHES["out" if point.endswith("-out") else "in"]


def table_name(group: int) -> str:
    return f"{TABLE_PREFIX}{group}"


def chain_name(point: str) -> str:
    p = POINTS[point]
    return f"{p.table}_{p.chain.lower()}"


def render(tag: Tag, points: Sequence[str], only: Only = EVERYTHING) -> str:
    """The nft script: exactly what `nft -f -` gets. With `only` (--host/--spi) each base chain
    holds its `goto` rules and the log rules go in a regular chain (`<chain>_only`) behind them."""
    group, table = tag.group, table_name(tag.group)
    chains: dict[str, list[str]] = {}
    for name in points:
        rules = chains.setdefault(chain_name(name), [])
        comment = tag.for_point(name).text()
        rules += [f'{m} counter log prefix "{name}" group {group} comment "{comment}"' for m in matches(name)]
    lines = [
        f"# ipsec-capture NFLOG rules for group {group}; remove with: nft delete table {FAMILY} {table}",
        f"create table {FAMILY} {table}",
        f"table {FAMILY} {table} {{",
        f'\tcomment "{tag.text()}"',
    ]
    entries = only.nft_matches()
    for chain, rules in chains.items():
        tbl, hook = chain.split("_", 1)
        if entries is not None:
            lines += [f"\tchain {chain}{ONLY_SUFFIX} {{", *(f"\t\t{r}" for r in rules), "\t}"]
            rules = [f"{m} goto {chain}{ONLY_SUFFIX}" for m in entries]
        lines += [f"\tchain {chain} {{",
                  f"\t\ttype filter hook {hook} priority {PRIORITY[tbl]}; policy accept;"]
        lines += [f"\t\t{r}" for r in rules]
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def check(script: str, netns: str | None) -> None:
    """`nft -c -f -`: parse and validate against the kernel without committing."""
    run(["nft", "-c", "-f", "-"], netns, stdin=script)


def apply(script: str, netns: str | None) -> None:
    run(["nft", "-f", "-"], netns, stdin=script)


def our_groups(netns: str | None) -> list[int]:
    """Groups that have a table of ours; none when nf_tables is unusable (then none can exist)."""
    proc = run(["nft", "-j", "list", "tables", FAMILY], netns, check=False)
    if proc.returncode != 0:
        return []
    groups = []
    for item in json.loads(proc.stdout or '{"nftables": []}')["nftables"]:
        table = item.get("table")
        if table and (m := _TABLE_RE.fullmatch(table["name"])):
            groups.append(int(m[1]))
    return sorted(groups)


def tags(group: int, netns: str | None) -> list[Tag]:
    """The owner tags of the rules in our table for `group` (in rule order)."""
    proc = run(["nft", "-j", "list", "table", FAMILY, table_name(group)], netns, check=False)
    if proc.returncode != 0:
        return []
    found = []
    for item in json.loads(proc.stdout)["nftables"]:
        rule = item.get("rule")
        if rule and (tag := parse_tag(rule.get("comment", ""))):
            found.append(tag)
    return found


def counters(group: int, netns: str | None) -> dict[str, int]:
    """Packets counted per point in our table (rules of one point are summed)."""
    out = run(["nft", "-j", "list", "table", FAMILY, table_name(group)], netns).stdout
    counts: dict[str, int] = {}
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if not rule or not (tag := parse_tag(rule.get("comment", ""))) or not tag.point:
            continue
        for expr in rule["expr"]:
            if "counter" in expr:
                counts[tag.point] = counts.get(tag.point, 0) + expr["counter"]["packets"]
    return counts


def delete(group: int, netns: str | None) -> bool:
    """Delete our table for `group`; False if it was not there."""
    if group not in our_groups(netns):
        return False
    proc = run(["nft", "delete", "table", FAMILY, table_name(group)], netns, check=False)
    if proc.returncode != 0 and group in our_groups(netns):
        run(["nft", "delete", "table", FAMILY, table_name(group)], netns)
    return True
