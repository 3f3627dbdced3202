"""The HTML report is one offline file with its SVG plots, and headless Chromium renders it to a
non-blank screenshot."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
import zlib

import pytest

from ipsec_capture.cli import main
from tests.conftest import require_tool
from tests.support.bundles import no_state_host, write_bundle


def png_pixels(data: bytes) -> tuple[int, int, set[bytes]]:
    """(width, height, distinct RGB(A) pixels of every 7th row): a tiny PNG decoder, enough to
    tell a rendered page from a blank one."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    height = bpp = 0
    while pos < len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if ctype == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6)
            bpp = 3 if color == 2 else 4
        elif ctype == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    colors: set[bytes] = set()
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):  # undo the PNG row filter
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        if y % 7 == 0:
            colors.update(bytes(line[i:i + 3]) for i in range(0, stride, bpp * 3))
        prev = line
    return width, height, colors


def test_html_is_self_contained_and_renders_plots(tmp_path, capsys):
    cap = write_bundle(tmp_path / "b", no_state_host())
    out = tmp_path / "report.html"
    assert main(["report", str(cap), "--format", "html", "-o", str(out)]) == 0
    html = out.read_text()
    assert html.count("<svg") == 3
    for title in ("Packets per SA (per 0.01 s)", "Failures by cause (per 0.01 s)", "SA lifetimes"):
        assert title in html
    assert "<polyline" in html and "no-state" in html and "XfrmInNoStates +3" in html
    assert "<script" not in html and not re.search(r"(src|href)=\"?https?:", html)

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        require_tool("chromium")
    shot = tmp_path / "shot.png"
    profile = tempfile.mkdtemp(prefix="ict-chromium-")
    try:
        proc = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             f"--screenshot={shot}", "--window-size=1200,1600", out.as_uri()],
            capture_output=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if not shot.exists():
        pytest.fail(f"chromium wrote no screenshot: {proc.stderr.decode(errors='replace')[-500:]}")
    width, height, colors = png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 1600)
    # text, table shading and the plots' line colours: far more than a blank page's one colour
    assert len(colors) > 20, len(colors)
    plot_blue = bytes((0x1F, 0x77, 0xB4))
    assert any(sum(abs(a - b) for a, b in zip(c, plot_blue, strict=True)) < 40 for c in colors)


def test_png_decoder_sees_a_blank_image_as_one_colour():
    width, height = 8, 8
    raw = b"".join(b"\x00" + b"\xff\xff\xff" * width for _ in range(height))

    def chunk(t: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + t + body + struct.pack(">I", zlib.crc32(t + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    assert png_pixels(png) == (8, 8, {b"\xff\xff\xff"})
