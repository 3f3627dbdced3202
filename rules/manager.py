"""Build, install, list, remove and clean up our NFLOG rule sets, whichever backend holds them.

State lives only in the rules themselves (owner tags in rule comments, see owner.py): there is
no file to go stale, and `list`/`cleanup` see exactly what the kernel has.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ipsec_capture.errors import UserError, require_root

from . import iptables, nft
from .command import have, run
from .only import EVERYTHING, Only
from .owner import Tag, pid_alive
from .points import POINTS, parse_points

BACKENDS = ("auto", "nft", "iptables", "iptables-legacy", "iptables-nft")
GROUP_MAX = 65535  # NFLOG group is a u16 (struct nfulnl_msg_config / nf_loginfo.u.ulog.group)


@dataclass(slots=True)
class RuleSet:
    """One group's rules for one backend (always concrete: nft, iptables-legacy or iptables-nft)."""

    group: int
    points: tuple[str, ...]
    backend: str
    netns: str | None
    only: Only = EVERYTHING  # --host/--spi, matched by the rules themselves
    pid: int = field(default_factory=os.getpid)
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def tag(self) -> Tag:
        return Tag(self.group, self.pid, self.started)

    @property
    def flavour(self) -> str:
        return self.backend.removeprefix("iptables-")

    def scripts(self) -> list[tuple[list[str], str]]:
        """(argv, stdin) pairs in the order install runs them: one for nft, v4 then v6 for iptables."""
        if self.backend == "nft":
            return [(["nft", "-f", "-"], nft.render(self.tag, self.points, self.only))]
        return [([iptables.tool(fam, self.flavour, "restore"), "--noflush"],
                 iptables.render(self.tag, self.points, fam, self.only)) for fam in iptables.FAMILIES]

    def text(self) -> str:
        """The exact nft script, or both iptables-restore inputs each under a comment naming its command."""
        if self.backend == "nft":
            return self.scripts()[0][1]
        return "".join(f"# {' '.join(argv)}   (IPv{fam})\n{text}"
                       for (argv, text), fam in zip(self.scripts(), iptables.FAMILIES, strict=True))


@dataclass(frozen=True, slots=True)
class InstalledSet:
    group: int
    backend: str
    points: tuple[str, ...]
    pid: int  # 0 when no rule carries an owner tag
    alive: bool
    started: int
    netns: str | None = None

    def owner(self) -> str:
        if not self.pid:
            return "no owner tag"
        return f"owner pid {self.pid} ({'running' if self.alive else 'gone'})"


def _nft_usable(netns: str | None) -> bool:
    if not have("nft"):
        return False
    if os.geteuid() != 0:  # cannot ask the kernel; `show` still prefers nft when it is installed
        return True
    return run(["nft", "list", "tables"], netns, check=False).returncode == 0


def resolve_backend(backend: str, netns: str | None = None) -> str:
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}: choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        if _nft_usable(netns):
            return "nft"
        if not have("iptables-restore"):
            raise UserError("neither nft nor iptables-restore is installed: apt-get install nftables")
        backend = "iptables"
    if backend == "iptables":
        return f"iptables-{iptables.default_flavour()}"
    return backend


def build(group: int, points: Sequence[str] | None = None, backend: str = "auto",
          netns: str | None = None, only: Only = EVERYTHING) -> RuleSet:
    if not 0 <= group <= GROUP_MAX:
        raise UserError(f"NFLOG group {group} out of range: use 0..{GROUP_MAX}")
    if points is not None and not points:
        raise UserError(f"no capture points given: choose from {', '.join(POINTS)}")
    chosen = parse_points(None if points is None else ",".join(points))
    return RuleSet(group, chosen, resolve_backend(backend, netns), netns, only)


def _in(netns: str | None) -> str:
    return f" in netns {netns}" if netns else ""


def _remedy(netns: str | None) -> str:
    return "ipsec-capture rules cleanup" + (f" --netns {netns}" if netns else "")


def _busy_error(found: InstalledSet, group: int, netns: str | None) -> UserError:
    if found.alive:
        what = f"stop that capture, use another --group, or `{_remedy(netns)} --all`"
    else:
        what = f"remove the leftovers with `{_remedy(netns)}`"
    return UserError(f"NFLOG group {group}{_in(netns)} already has ipsec-capture rules "
                     f"({found.backend}, {found.owner()}): {what}")


def install(rs: RuleSet) -> None:
    """Install atomically: nft in one transaction; iptables v4 then v6, v4 rolled back if v6 fails."""
    require_root("installing NFLOG rules")
    for found in list_installed(rs.netns):
        if found.group == rs.group:
            raise _busy_error(found, rs.group, rs.netns)
    if rs.backend == "nft":
        try:
            nft.apply(rs.scripts()[0][1], rs.netns)
        except UserError as err:
            if "File exists" in str(err):  # lost a race: someone created the table since we looked
                raise UserError(f"NFLOG group {rs.group}{_in(rs.netns)} was just taken by another "
                                f"ipsec-capture: use another --group") from None
            raise
        return
    try:
        for argv, text in rs.scripts():
            run(argv, rs.netns, stdin=text)
    except BaseException:  # includes KeyboardInterrupt mid-install: never leave half a rule set
        remove(rs)
        raise


def remove(rs: RuleSet) -> None:
    """Remove this group's rules of rs.backend in rs.netns; nothing there is fine."""
    require_root("removing NFLOG rules")
    _remove(rs.group, rs.backend, rs.netns)


def _remove(group: int, backend: str, netns: str | None) -> None:
    if backend == "nft":
        nft.delete(group, netns)
        return
    flavour = backend.removeprefix("iptables-")
    for fam in iptables.FAMILIES:
        iptables.delete({group}, fam, flavour, netns)


def remove_group(group: int, netns: str | None = None) -> list[InstalledSet]:
    """Remove `group`'s rules from every backend that has them; returns what was removed."""
    require_root("removing NFLOG rules")
    gone = [s for s in list_installed(netns) if s.group == group]
    for s in gone:
        _remove(s.group, s.backend, netns)
    return gone


def _summarise(group: int, backend: str, tags: list[Tag], netns: str | None) -> InstalledSet:
    owner = next((t for t in tags if t.pid), None)
    seen = {t.point for t in tags if t.point}
    points = tuple(p for p in POINTS if p in seen)
    if owner is None:
        return InstalledSet(group, backend, points, 0, False, 0, netns)
    return InstalledSet(group, backend, points, owner.pid, pid_alive(owner.pid, owner.started),
                        owner.started, netns)


def list_installed(netns: str | None = None) -> list[InstalledSet]:
    """Every rule set of ours in the namespace, from nft and both iptables flavours."""
    require_root("listing NFLOG rules")
    sets = []
    if have("nft"):
        sets += [_summarise(g, "nft", nft.tags(g, netns), netns) for g in nft.our_groups(netns)]
    for flavour in iptables.FLAVOURS:
        found = [iptables.scan(fam, flavour, netns) for fam in iptables.FAMILIES]
        for g in sorted(set().union(*(f.groups() for f in found))):
            tags = [t for f in found for t in f.tags if t.group == g]
            sets.append(_summarise(g, f"iptables-{flavour}", tags, netns))
    return sets


def cleanup(netns: str | None = None, include_alive: bool = False) -> list[InstalledSet]:
    """Remove every set whose owner is gone (all of ours with include_alive); returns what it removed."""
    removed = [s for s in list_installed(netns) if include_alive or not s.alive]
    for s in removed:
        _remove(s.group, s.backend, netns)
    return removed


def counters(rs: RuleSet) -> dict[str, int]:
    """Packets counted per point so far (both families summed): for tests and status checks."""
    if rs.backend == "nft":
        return nft.counters(rs.group, rs.netns)
    counts: dict[str, int] = {}
    for fam in iptables.FAMILIES:
        for (g, point), n in iptables.scan(fam, rs.flavour, rs.netns).packets.items():
            if g == rs.group:
                counts[point] = counts.get(point, 0) + n
    return counts
