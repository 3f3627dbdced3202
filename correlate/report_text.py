"""The terminal report: the report dict (analysis.Analysis.to_dict) as aligned plain text."""

from __future__ import annotations

from typing import Any

from .diagnosis import fmt_time
from .summary import drop_spi_label


def _t(ns: int | None) -> str:
    return "-" if ns is None else fmt_time(ns)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip()] + [fmt.format(*r).rstrip() for r in rows]


def _failed(failed: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in failed.items()) or "-"


def render(d: dict[str, Any]) -> str:
    out: list[str] = []
    cap, tot = d["capture"], d["totals"]
    host = f"  (host {cap['host']}, kernel {cap['kernel']})" if cap.get("host") else ""
    out.append(f"== {cap['name']}{host}")
    out.append(f"   {_t(cap['first_ns'])} .. {_t(cap['last_ns'])} UTC")
    for note in cap["missing"]:
        out.append(f"   note: {note}")
    out.append(f"   {tot['packets']} packets: ok {tot['ok']}, failed {tot['failed']}, "
               f"unknown {tot['unknown']}"
               f"  ({tot['esp']} ESP, {tot['cleartext']} cleartext records, {tot['cleartext_matched']} "
               f"matched to their ESP; {tot['events']} kernel events, {tot['events_matched']} joined)")
    if tot["events_unmatched"]:
        out.append("   kernel events for packets not captured: "
                   + ", ".join(f"{k} {v}" for k, v in sorted(tot["events_unmatched"].items())))
    if tot.get("events_other_netns"):
        out.append(f"   {tot['events_other_netns']} kernel events of another network namespace ignored "
                   "(not evidence for this capture)")
    out.append("")
    out.append("SAs")
    rows = [[r["spi"] or "cleartext", r["direction"], f"{r['src']} -> {r['dst']}", str(r["packets"]),
             str(r["bytes"]), str(r["ok"]), _failed(r["failed"]), str(r["unknown"]), _t(r["first_ns"]),
             _t(r["last_ns"]), str(r["rekeys"]), r["algorithm"] or "-"] for r in d["sas"]]
    out += ["  " + line for line in _table(
        ["SPI", "dir", "addresses", "pkts", "bytes", "ok", "failed", "unknown", "first", "last", "rekeys",
         "algorithm"], rows)]
    out.append("")
    out.append("Drops and failures")
    if not d["drops"]:
        out.append("  none")
    for g in d["drops"]:
        spi = drop_spi_label(g)
        out.append(f"  {g['cause']:<14} {spi:<12} {g['direction']:<3} {g['packets']:>6} pkts  "
                   f"{_t(g['first_ns'])} .. {_t(g['last_ns'])}")
        out.append(f"      {g['evidence']}")
        if g["summary"]:
            out.append(f"      means: {g['summary']}; next: {g['hint']}")
    out.append("")
    out.append("Timeline")
    if not d["timeline"]:
        out.append("  (no SA changes or kernel failures recorded)")
    for item in d["timeline"]:
        out.append(f"  {_t(item['time_ns'])}  {item['text']}")
    out.append("")
    pk = d["packets"]
    out.append(f"Packets ({pk['listed']} of {pk['matched']} matching)")
    rows = [[_t(p["time_ns"]), p["point"], p["direction"], p["spi"] or "-", "-" if p["seq"] is None
             else str(p["seq"]), p["verdict"], p["cause"] or "-", "; ".join(p["evidence"])]
            for p in pk["rows"]]
    out += ["  " + line for line in _table(
        ["time", "point", "dir", "SPI", "seq", "verdict", "cause", "evidence"], rows)]
    if pk["matched"] > pk["listed"]:
        out.append(f"  ... {pk['matched'] - pk['listed']} more "
                   "(use --limit 0, or filter with --spi/--verdict)")
    return "\n".join(out) + "\n"


def render_peers(peer: dict[str, Any]) -> str:
    out = [f"== {peer['a']} <-> {peer['b']}: joined by (SPI, seq)"]
    rows = [[r["spi"], f"{r['from']} -> {r['to']}", str(r["sent"]), str(r["arrived"]), str(r["lost"]),
             str(r["ok"]), _failed(r["failed"]), str(r["unknown"]), str(r["unsent"])] for r in peer["sas"]]
    out += ["  " + line for line in _table(
        ["SPI", "path", "sent", "arrived", "lost", "ok at receiver", "failed at receiver", "unknown",
         "received, not seen sent"], rows)]
    return "\n".join(out) + "\n"


def render_fleet(fleet: dict[str, Any], limit: int = 50) -> str:
    """The N-node join (correlate/peer.py join_fleet): the node-pair matrix, then the paths of the
    packets that were lost or failed."""
    out = [f"== {len(fleet['nodes'])} nodes joined by (destination, SPI, seq): {', '.join(fleet['nodes'])}"]
    rows = [[f"{r['from']} -> {r['to']}", str(r["sent"]), str(r["arrived"]), str(r["lost"]), str(r["ok"]),
             _failed(r["failed"]), str(r["unknown"]), str(r["unsent"]), ",".join(r["spis"]) or "-"]
            for r in fleet["matrix"]]
    out += ["  " + line for line in _table(
        ["pair", "sent", "arrived", "lost", "ok at receiver", "failed at receiver", "unknown",
         "received, not seen sent", "SPIs"], rows)]
    paths = fleet["paths"]
    bad = [p for p in paths["listed"] if p["verdict"] != "ok"]
    out.append(f"  {paths['total']} packet paths: {paths['lost']} lost, {paths['failed']} failed")
    for p in bad[:limit]:
        why = f" ({p['cause']})" if p.get("cause") else ""
        out.append(f"    {p['spi']} seq {p['seq']} {p['src']} -> {p['dst']}: {p['from']} -> {p['to']}: "
                   f"{p['verdict']}{why}")
    if len(bad) > limit:
        out.append(f"    ... {len(bad) - limit} more in --format json")
    return "\n".join(out) + "\n"
