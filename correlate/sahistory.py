"""SA history: which SA held an SPI at a given moment, built from the SA snapshot taken at capture
start and the XFRM monitor events after it.

The join asks "was there an SA for SPI X at time T, and if not, was one deleted before, when?"
for every packet it cannot explain, so lookups are by (SPI) with a short list of lifetimes each.
Memory grows with the number of SAs, never with packets. Several SAs may hold one SPI at once
(Cilium: the same SPI for every node pair, inbound states `src 0.0.0.0` told apart by a mark):
a lookup given the packet's destination and, inbound, its mark picks the one the kernel would
(xfrm_state_lookup: mark, daddr, SPI).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ipsec_capture.models import Event

SA_KINDS = frozenset({"sa-new", "sa-update", "sa-delete", "expire"})


@dataclass(slots=True)
class SaLife:
    """One SA's life in the capture: from its snapshot or sa-new to its sa-delete (if seen)."""

    spi: int
    src: str
    dst: str
    netns: int | None = None
    mode: str = ""
    reqid: int = 0
    encap: bool = False
    algorithm: str = ""
    start_ns: int | None = None  # None: existed before the capture started (snapshot)
    end_ns: int | None = None  # None: still there at the end
    expired_ns: int | None = None  # hard expire seen
    soft_expired_ns: int | None = None
    from_snapshot: bool = False
    mark: tuple[int, int] | None = None  # (value, mask) the state matches skb->mark against

    def alive(self, t: int) -> bool:
        return (self.start_ns is None or self.start_ns <= t) and (self.end_ns is None or t < self.end_ns)

    def to_dict(self) -> dict[str, Any]:
        return {"spi": f"0x{self.spi:08x}", "src": self.src, "dst": self.dst, "netns": self.netns,
                "mode": self.mode, "reqid": self.reqid, "encap": self.encap, "algorithm": self.algorithm,
                "start_ns": self.start_ns, "end_ns": self.end_ns, "expired_ns": self.expired_ns,
                "from_snapshot": self.from_snapshot, "mark": None if self.mark is None else list(self.mark)}


def _mark(d: dict[str, Any]) -> tuple[int, int] | None:
    m = d.get("mark")
    return (int(m[0]), int(m[1])) if isinstance(m, list | tuple) and len(m) == 2 and m[1] else None


def _chosen(lives: list[SaLife], dst: str | None, mark: int | None) -> list[SaLife]:
    """The lives a packet to `dst` (with skb mark `mark`, inbound) can belong to: those of its
    destination when any has it (else all: NAT may have rewritten it), whose mark matches."""
    if dst is not None and any(life.dst == dst for life in lives):
        lives = [life for life in lives if life.dst == dst]
    if mark is not None:
        lives = [life for life in lives if life.mark is None or mark & life.mark[1] == life.mark[0]]
    return lives


def _sa_dict(ev: Event) -> dict[str, Any] | None:
    d = ev.detail.get("sa") if ev.detail else None
    if isinstance(d, dict):
        return d
    if ev.detail and "spi" in ev.detail and "dst" in ev.detail:
        return ev.detail
    return None


def _algorithm(d: dict[str, Any]) -> str:
    for name in ("aead", "enc"):
        alg = d.get(name)
        if isinstance(alg, dict) and alg.get("name"):
            auth = d.get("auth")
            if name == "enc" and isinstance(auth, dict) and auth.get("name"):
                return f"{alg['name']}+{auth['name']}"
            return str(alg["name"])
    return ""


@dataclass(slots=True)
class SaHistory:
    """SA lives by SPI, fed Events in time order (`add`), queried by SPI and time."""

    by_spi: dict[int, list[SaLife]] = field(default_factory=dict)

    def add(self, ev: Event) -> SaLife | None:
        """Take an SA event (snapshot or monitor); other events are ignored. Returns the life."""
        if ev.source == "sa_snapshot":
            return self._open(ev, snapshot=True)
        if ev.source != "xfrm_monitor" or ev.kind not in SA_KINDS:
            return None
        if ev.kind in ("sa-new", "sa-update"):
            life = self._current(ev)
            if life is not None and ev.kind == "sa-update":
                return life
            return self._open(ev, snapshot=False)
        life = self._current(ev)
        if life is None:  # deleted/expired an SA we never saw created: it predates the capture
            life = self._open(ev, snapshot=True)
            if life is None:
                return None
        if ev.kind == "sa-delete":
            life.end_ns = ev.time_ns
        elif ev.detail.get("hard", True):
            life.expired_ns = ev.time_ns
        else:
            life.soft_expired_ns = ev.time_ns
        return life

    def _spi_of(self, ev: Event) -> tuple[int | None, dict[str, Any] | None]:
        d = _sa_dict(ev)
        spi = ev.spi if ev.spi is not None else (d.get("spi") if d else None)
        return spi, d

    def _current(self, ev: Event) -> SaLife | None:
        spi, d = self._spi_of(ev)
        dst = (d or {}).get("dst") or (ev.tuple or {}).get("dst")
        mark = _mark(d or {})
        for life in reversed(self.by_spi.get(spi, ()) if spi is not None else ()):
            if life.end_ns is None and (dst is None or life.dst == dst) and \
                    (d is None or "mark" not in d or life.mark == mark) and \
                    (ev.netns is None or life.netns is None or life.netns == ev.netns):
                return life
        return None

    def _open(self, ev: Event, snapshot: bool) -> SaLife | None:
        spi, d = self._spi_of(ev)
        if spi is None:
            return None
        d = d or {}
        tup = ev.tuple or {}
        life = SaLife(spi=spi, src=str(d.get("src") or tup.get("src") or "?"),
                      dst=str(d.get("dst") or tup.get("dst") or "?"), netns=ev.netns,
                      mode=str(d.get("mode") or ""), reqid=int(d.get("reqid") or 0),
                      encap=bool(d.get("encap")), algorithm=_algorithm(d),
                      start_ns=None if snapshot else ev.time_ns, from_snapshot=snapshot, mark=_mark(d))
        self.by_spi.setdefault(spi, []).append(life)
        return life

    def at(self, spi: int, t: int, netns: int | None = None, dst: str | None = None,
           mark: int | None = None) -> SaLife | None:
        """The SA holding `spi` at `t` (for a packet to `dst`; inbound, with skb mark `mark`)."""
        for life in reversed(_chosen(self.by_spi.get(spi, []), dst, mark)):
            if life.alive(t) and (netns is None or life.netns is None or life.netns == netns):
                return life
        return None

    def of_packet(self, p: Any) -> SaLife | None:
        """`at` for a joined packet (correlate.packet.Packet). Its destination (a string to build)
        and mark are looked at only when the SAs sharing its SPI differ in them (Cilium: one SPI
        for every node pair): the join calls this for nearly every packet."""
        lives = self.by_spi.get(p.spi, ())
        if len(lives) > 1 and len({(life.dst, life.mark) for life in lives}) > 1:
            return self.at(p.spi, p.time_ns, p.netns, p.dst, p.state_mark)
        return self.at(p.spi, p.time_ns, p.netns)

    def deleted_before(self, spi: int, t: int, dst: str | None = None, mark: int | None = None
                       ) -> SaLife | None:
        """The latest SA with `spi` (to `dst`, matching `mark`) deleted at or before `t`."""
        best, best_end = None, 0  # best_end: best's end_ns, once there is a best
        for life in _chosen(self.by_spi.get(spi, []), dst, mark):
            if life.end_ns is not None and life.end_ns <= t and (best is None or life.end_ns > best_end):
                best, best_end = life, life.end_ns
        return best

    def known(self, spi: int) -> bool:
        return spi in self.by_spi

    def lives(self) -> list[SaLife]:
        return [life for lives in self.by_spi.values() for life in lives]

    def rekeys(self, life: SaLife) -> int:
        """How many other SAs the same tunnel (src, dst, reqid, mark) had in the capture."""
        if not life.reqid:
            return 0
        return sum(1 for other in self.lives()
                   if other is not life and other.reqid == life.reqid and other.src == life.src
                   and other.dst == life.dst and other.mark == life.mark)
