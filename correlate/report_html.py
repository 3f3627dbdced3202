"""The HTML report: one self-contained file (inline CSS and SVG, no script, no network) that a
browser opens offline - rate per SA, errors over time, SA lifetimes, then the tables."""

from __future__ import annotations

from html import escape
from typing import Any

from . import svgplot
from .diagnosis import fmt_time
from .summary import drop_spi_label

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#eee}.failed{background:#fde0e0}.ok{background:#e6f5e6}.unknown{background:#fff6d5}
.note{color:#8a5a00}.plot{display:block;margin:8px 0;border:1px solid #ddd}
code{font-size:12px}
"""


def _t(ns: int | None) -> str:
    return "-" if ns is None else fmt_time(ns)


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _section(d: dict[str, Any]) -> str:
    cap, tot, ser = d["capture"], d["totals"], d["series"]
    out = [f"<h1>{escape(cap['name'])}</h1>"]
    if cap.get("host"):
        out.append(f"<p>host {escape(str(cap['host']))}, kernel {escape(str(cap['kernel']))}</p>")
    out.append(f"<p>{_t(cap['first_ns'])} .. {_t(cap['last_ns'])} UTC &mdash; {tot['packets']} packets: "
               f"ok {tot['ok']}, failed {tot['failed']}, unknown {tot['unknown']}; {tot['events']} kernel "
               f"events, {tot['events_matched']} joined to packets</p>")
    out += [f'<p class="note">note: {escape(n)}</p>' for n in cap["missing"]]
    bucket = ser["bucket_ns"]
    out.append("<h2>Plots</h2>")
    width = f"{bucket / 1e9:g} s"
    out.append(svgplot.lines(f"Packets per SA (per {width})", ser["rate"], bucket, f"packets / {width}"))
    out.append(svgplot.lines(f"Failures by cause (per {width})", ser["errors"], bucket, f"failed / {width}"))
    t0 = cap["first_ns"] or 0
    t1 = cap["last_ns"] or t0
    spans = []
    for life in d["sa_history"]:
        start = life["start_ns"] if life["start_ns"] is not None else t0
        end = life["end_ns"] if life["end_ns"] is not None else t1
        t0, t1 = min(t0, start), max(t1, end)
        spans.append((f"{life['spi']} {life['src']} -> {life['dst']}", start, end,
                      "deleted" if life["end_ns"] is not None else "alive at end"))
    out.append(svgplot.bars("SA lifetimes", spans, t0, t1))
    out.append("<h2>SAs</h2>")
    out.append(_table(["SPI", "dir", "addresses", "packets", "bytes", "ok", "failed", "unknown", "first",
                       "last", "rekeys", "algorithm"],
                      [[r["spi"] or "cleartext", r["direction"], f"{r['src']} -> {r['dst']}",
                        str(r["packets"]), str(r["bytes"]), str(r["ok"]),
                        ", ".join(f"{k} {v}" for k, v in r["failed"].items()) or "-", str(r["unknown"]),
                        _t(r["first_ns"]), _t(r["last_ns"]), str(r["rekeys"]), r["algorithm"] or "-"]
                       for r in d["sas"]]))
    out.append("<h2>Drops and failures</h2>")
    out.append(_table(["cause", "SPI", "dir", "packets", "first", "last", "evidence", "meaning / next step"],
                      [[g["cause"], drop_spi_label(g), g["direction"], str(g["packets"]),
                        _t(g["first_ns"]), _t(g["last_ns"]), g["evidence"], f"{g['summary']} - {g['hint']}"]
                       for g in d["drops"]], ["failed"] * len(d["drops"])) if d["drops"] else "<p>none</p>")
    out.append("<h2>Timeline</h2>")
    out.append(_table(["time", "event"], [[_t(i["time_ns"]), i["text"]] for i in d["timeline"]])
               if d["timeline"] else "<p>no SA changes or kernel failures recorded</p>")
    pk = d["packets"]
    out.append(f"<h2>Packets ({pk['listed']} of {pk['matched']} matching)</h2>")
    out.append(_table(["time", "point", "dir", "SPI", "seq", "verdict", "cause", "evidence"],
                      [[_t(p["time_ns"]), p["point"], p["direction"], p["spi"] or "-",
                        "-" if p["seq"] is None else str(p["seq"]), p["verdict"], p["cause"] or "-",
                        "; ".join(p["evidence"])] for p in pk["rows"]],
                      [p["verdict"] for p in pk["rows"]]))
    return "\n".join(out)


def _peers(peer: dict[str, Any]) -> str:
    return (f"<h1>{escape(peer['a'])} &harr; {escape(peer['b'])} (joined by SPI, seq)</h1>" +
            _table(["SPI", "path", "sent", "arrived", "lost", "ok at receiver", "failed at receiver",
                    "unknown", "received, not seen sent"],
                   [[r["spi"], f"{r['from']} -> {r['to']}", str(r["sent"]), str(r["arrived"]), str(r["lost"]),
                     str(r["ok"]), ", ".join(f"{k} {v}" for k, v in r["failed"].items()) or "-",
                     str(r["unknown"]), str(r["unsent"])] for r in peer["sas"]]))


def render(reports: list[dict[str, Any]], peers: list[dict[str, Any]]) -> str:
    title = ", ".join(r["capture"]["name"] for r in reports)
    body = "\n".join([_section(r) for r in reports] + [_peers(p) for p in peers])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>ipsec-capture report: {escape(title)}</title><style>{CSS}</style></head>"
            f"<body>\n{body}\n</body></html>\n")
