"""Plots as inline SVG text, made in Python: the HTML report must open offline, with no JS library
and no network. Two shapes cover the report: step lines over time (rate per SA, errors per cause)
and horizontal bars over time (SA lifetimes).
"""

from __future__ import annotations

from html import escape

from .diagnosis import fmt_time

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
          "#7f7f7f", "#bcbd22")
W, H = 900, 260
LEFT, RIGHT, TOP, BOTTOM = 60, 190, 28, 36


def _frame(title: str, height: int) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{W}" height="{height}" '
            f'viewBox="0 0 {W} {height}" role="img" aria-label="{escape(title)}">',
            f'<rect width="{W}" height="{height}" fill="#fff"/>',
            f'<text x="{LEFT}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>']


def _x_axis(parts: list[str], t0: int, t1: int, y: int) -> None:
    span = max(t1 - t0, 1)
    parts.append(f'<line x1="{LEFT}" y1="{y}" x2="{W - RIGHT}" y2="{y}" stroke="#444"/>')
    for i in range(5):
        x = LEFT + (W - LEFT - RIGHT) * i / 4
        label = fmt_time(t0 + span * i // 4)[:12]
        parts.append(f'<text x="{x:.1f}" y="{y + 16}" font-size="10" text-anchor="middle">{label}</text>')


def lines(title: str, series: dict[str, list[tuple[int, int]]], bucket_ns: int, unit: str) -> str:
    """Step lines: x = bucket start (wall-clock ns), y = count per bucket."""
    if not any(series.values()):
        return "".join(_frame(title, 60)) + f'<text x="{LEFT}" y="44" font-size="12">none</text></svg>'
    t0 = min(b for s in series.values() for b, _ in s) * bucket_ns
    t1 = (max(b for s in series.values() for b, _ in s) + 1) * bucket_ns
    ymax = max(v for s in series.values() for _, v in s)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    parts = _frame(title, H)
    parts.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + ph}" stroke="#444"/>')
    parts.append(f'<text x="{LEFT - 6}" y="{TOP + 8}" font-size="10" text-anchor="end">{ymax}</text>')
    parts.append(f'<text x="{LEFT - 6}" y="{TOP + ph}" font-size="10" text-anchor="end">0</text>')
    parts.append(f'<text x="12" y="{TOP + ph / 2:.0f}" font-size="10" '
                 f'transform="rotate(-90 12 {TOP + ph / 2:.0f})">{escape(unit)}</text>')
    _x_axis(parts, t0, t1, TOP + ph)

    def sx(t: int) -> float:
        return LEFT + pw * (t - t0) / max(t1 - t0, 1)

    def sy(v: int) -> float:
        return TOP + ph - ph * v / max(ymax, 1)

    for i, (label, pts) in enumerate(sorted(series.items())):
        color = COLORS[i % len(COLORS)]
        counts = dict(pts)
        first, last = min(counts), max(counts)
        path = []
        for b in range(first, last + 1):  # gaps are zero: a silent second is a real 0
            v = counts.get(b, 0)
            path.append(f"{sx(b * bucket_ns):.1f},{sy(v):.1f} {sx((b + 1) * bucket_ns):.1f},{sy(v):.1f}")
            if b - first > 4000:
                break
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(path)}"/>')
        y = TOP + 14 * i + 8
        parts.append(f'<rect x="{W - RIGHT + 10}" y="{y - 8}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{W - RIGHT + 24}" y="{y + 1}" font-size="11">{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bars(title: str, spans: list[tuple[str, int, int, str]], t0: int, t1: int) -> str:
    """Horizontal bars (label, start, end, note) between t0 and t1: SA lifetimes."""
    if not spans:
        return "".join(_frame(title, 60)) + f'<text x="{LEFT}" y="44" font-size="12">none</text></svg>'
    t1 = max(t1, t0 + 1)
    row = 30  # the label on its own line above the bar: an IPv6 SA's label is wider than any margin
    height = TOP + row * len(spans) + BOTTOM
    pw = W - LEFT - RIGHT
    parts = _frame(title, height)

    def sx(t: int) -> float:
        return LEFT + pw * (min(max(t, t0), t1) - t0) / (t1 - t0)

    for i, (label, start, end, note) in enumerate(spans):
        y = TOP + row * i
        color = COLORS[i % len(COLORS)]
        x0, x1 = sx(start), sx(end)
        parts.append(f'<text x="{LEFT}" y="{y + 10}" font-size="11">{escape(label)}</text>')
        parts.append(f'<rect x="{x0:.1f}" y="{y + 14}" width="{max(x1 - x0, 2):.1f}" height="12" '
                     f'fill="{color}" opacity="0.8"><title>{escape(label)} {escape(note)}</title></rect>')
    _x_axis(parts, t0, t1, TOP + row * len(spans) + 4)
    parts.append("</svg>")
    return "".join(parts)
