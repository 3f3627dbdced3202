"""The verdict of one packet and its named cause, from the evidence the join collected.

Order of trust (DESIGN.md section 5): a matching cleartext after decapsulation (or before
encryption) proves the kernel accepted the packet; an audit anchor or a drop linked to the skb
names the cause directly; a counter delta attributed to the packet names it indirectly;
`xfrm_input` returning 0 means nothing by itself (its own drop path returns 0 too) and counts as
accepted only when the kernel-drop sources were running and saw nothing for that skb.
"""

from __future__ import annotations

from dataclasses import dataclass

from .causes import (
    ANCHOR_CAUSES,
    EINPROGRESS,
    cause_for_drop,
    cause_for_ret,
    drop_reason_named,
)
from .packet import CLEAR, FAILED, OK, UNKNOWN, Packet, settle
from .sahistory import SaHistory


@dataclass(slots=True)
class Context:
    """What the whole capture tells about a packet's chances of being explained."""

    history: SaHistory
    clear_points: set[str]  # cleartext points that captured anything so far
    drop_source: bool = False  # kfree_skb events were collected (kprobe or tracefs)
    kprobes: bool = False  # xfrm_input/xfrm_output probes were collected
    keys: bool = False


def fmt_time(ns: int) -> str:
    """Wall-clock ns as UTC time of day with microseconds: what the evidence lines show."""
    s, frac = divmod(ns, 1_000_000_000)
    h, rem = divmod(s % 86400, 3600)
    m, sec = divmod(rem, 60)
    return f"{h:02d}:{m:02d}:{sec:02d}.{frac // 1000:06d}"


def _sa_evidence(p: Packet, history: SaHistory) -> None:
    if p.spi is None:
        return
    if p.sa is None:
        gone = history.deleted_before(p.spi, p.time_ns, p.dst, p.state_mark)
        if gone is not None and gone.end_ns is not None:
            ago = (p.time_ns - gone.end_ns) / 1e9
            mark = "" if gone.mark is None else f" mark 0x{gone.mark[0]:x}/0x{gone.mark[1]:x}"
            p.evidence.append(f"SA spi 0x{p.spi:08x} ({gone.src} -> {gone.dst}{mark}) deleted at "
                              f"{fmt_time(gone.end_ns)}, {ago:.3f} s before this packet")
        elif history.by_spi:
            p.evidence.append(f"no SA with spi 0x{p.spi:08x} in the SA snapshot or monitor events")
    elif p.sa.expired_ns is not None and p.sa.expired_ns <= p.time_ns:
        p.evidence.append(f"SA spi 0x{p.spi:08x} hard-expired at {fmt_time(p.sa.expired_ns)}")


PROBE_ACCEPTED = "xfrm_input returned 0 and no drop or anchor for this skb"


def accepted_by_probe(p: Packet) -> bool:
    """The packet's own events say the kernel took it: an xfrm_input probe returned 0 (or more,
    -EINPROGRESS, nothing) and no anchor, drop or error return names it. A probe means the
    kernel-drop sources ran (the BPF program that probes also sees the drops), so a drop would
    show. A counter delta, which names no packet, never outweighs this."""
    probe = False
    for ev in p.events:
        source = ev.source
        if source == "kfree_skb" or (source == "kprobe" and ev.kind in ANCHOR_CAUSES) or \
                cause_for_ret(ev.kind, ev.ret) is not None:
            return False
        if ev.kind == "xfrm_input":
            probe = True
    return probe


def finish(p: Packet, ctx: Context) -> None:
    """A packet leaving the join's window: its lists settled (packet.settle) and its verdict,
    cause and evidence set.

    Nearly every inbound packet has only its xfrm_input probe, returning 0 (or more,
    -EINPROGRESS, or nothing), and no cause, cleartext, anchor or drop: with the kernel-drop
    sources running it was accepted. That lone accepting probe is decided here, in its one home,
    before `diagnose` (which would reach the same verdict through all its rules)."""
    history = ctx.history
    if history.by_spi and p.spi is not None and p.sa is None:
        p.sa = history.of_packet(p)
    events = p.events
    if len(events) == 1 and p.cause is None and not p.clear and p.direction != "out" and p.kind != CLEAR \
            and ctx.drop_source:
        ev = events[0]
        if ev.kind == "xfrm_input" and ev.source != "kfree_skb":
            ret = ev.ret
            if ret == 0 and type(ret) is int:  # (the text of 0, not of 0.0 or False)
                accepted = PROBE_ACCEPTED
            elif ret is None or ret > 0 or ret == -EINPROGRESS:
                accepted = f"xfrm_input returned {ret} and no drop or anchor for this skb"
            else:
                accepted = None
            if accepted is not None:  # settle(): no cause nor cleartext, so its lists are LATER
                p.verdict = OK
                p.clear, p.also, p.evidence = [], [], [accepted]
                return
    settle(p)
    diagnose(p, ctx)


def diagnose(p: Packet, ctx: Context) -> None:
    """Set p.verdict, p.cause and p.evidence (appending to what the join already noted)."""
    history = ctx.history
    if history.by_spi and p.spi is not None and p.sa is None:
        p.sa = history.of_packet(p)
    cause = None
    for ev in p.events:
        if ev.source == "kprobe" and ev.kind in ANCHOR_CAUSES:
            cause = ANCHOR_CAUSES[ev.kind]
            p.evidence.append(f"kernel anchor xfrm_audit_state_{ev.kind.replace('-', '_')} "
                              f"at {fmt_time(ev.time_ns)}")
            break
    if cause is None:
        for ev in p.events:
            if ev.source == "kfree_skb":
                loc = ev.detail.get("location", "?")
                p.evidence.append(f"kfree_skb reason {ev.reason or '?'} at {loc}")
                # A drop reason names its cause; a bare location (xfrm_input's one drop path serves
                # no-state, ICV and replay alike) says less than the counter the packet moved.
                named = drop_reason_named(ev.reason)
                cause = p.cause if not named and p.cause is not None else cause_for_drop(ev.reason, str(loc))
                break
    if cause is None:
        for ev in p.events:
            c = cause_for_ret(ev.kind, ev.ret)
            if c is not None:
                cause = c
                p.evidence.append(f"{ev.kind} returned {ev.ret}")
                break
    if cause is None and p.cause is not None:  # attributed from a counter delta by the join
        if accepted_by_probe(p):  # (its probe came after the attribution): a counter names no packet
            p.evidence.append(f"{p.counter} moved for another packet: this one's probe says accepted")
            p.cause = p.counter = None
        else:
            cause = p.cause
    if p.clear and cause is None:
        p.verdict = OK
        pts = ", ".join(dict.fromkeys(pt for pt, _ in p.clear))
        p.evidence.append(f"cleartext seen at {pts}")
        return
    if cause is not None:
        p.verdict, p.cause = FAILED, cause
        if cause in ("no-state", "expired"):
            _sa_evidence(p, ctx.history)
        return
    if p.kind == CLEAR:
        # a cleartext packet whose ciphertext was not captured: it passed the point that logged it
        p.verdict = OK if p.direction == "in" else UNKNOWN
        p.evidence.append("cleartext only: its ESP packet was not captured")
        return
    if p.direction == "out":
        # the kernel built and sent it: raw OUTPUT sees the ESP packet after xfrm_output
        p.verdict = OK
        p.evidence.append("ESP packet left the host (raw OUTPUT)")
        return
    probe = next((ev for ev in p.events if ev.kind == "xfrm_input"), None)
    if probe is not None and ctx.drop_source:
        p.verdict = OK
        p.evidence.append(f"xfrm_input returned {probe.ret} and no drop or anchor for this skb")
        return
    p.verdict = UNKNOWN
    if ctx.clear_points:
        p.evidence.append("no cleartext seen after it and no kernel event names a cause")
    else:
        p.evidence.append("no cleartext capture point and no kernel event for it")
    if p.decrypt is not None and p.decrypt != "ok":
        p.evidence.append(f"our decryption: {p.decrypt}")
    if p.spi is not None and p.sa is None and ctx.history.by_spi:
        _sa_evidence(p, ctx.history)
