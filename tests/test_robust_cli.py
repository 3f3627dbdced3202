"""`decrypt` and `report` on input nobody vouches for: tcpdump's 830 test captures (many of them
files fuzzers found crashing some dissector), and a demo bundle damaged at random (byte flips,
cuts, absurd block lengths, a damaged events log or key file).

Each command runs in this process (830 interpreter starts would cost minutes): it must end with
exit 0 or one `ipsec-capture: error:` line and exit 2, never a traceback, never a hang (an alarm
per run). A link type we cannot read is refused in a line that says so.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipsec_capture.cli import main
from ipsec_capture.xfrm.esp_sa import write_esp_sa
from tests.support.bundles import KEY, SPI, A, B, no_state_host, write_bundle
from tests.support.fuzzing import FUZZ, mutate, mutations
from tests.support.synthetic import gcm_sa

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "tcpdump-tests"
HANG_S = 20  # no single file may take this long (the slowest takes well under a second)


class Hang(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: int) -> Iterator[None]:
    def ring(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_cli(argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of one command in this process; a traceback or a hang fails the test
    with the command and the traceback."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with alarm(HANG_S), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(argv)
    except BaseException as exc:  # whatever escapes main is the failure we look for
        pytest.fail(f"ipsec-capture {' '.join(argv)}: {''.join(traceback.format_exception(exc))}")
    text = err.getvalue()
    assert "Traceback" not in text, text
    if rc != 0:
        lines = [line for line in text.splitlines() if line.startswith("ipsec-capture: error:")]
        assert rc == 2 and len(lines) == 1, f"{argv}: exit {rc}, stderr {text!r}"
        return rc, lines[0]
    return rc, text


def keys_file(tmp: Path) -> Path:
    path = tmp / "k.esp_sa"
    path.write_text(write_esp_sa([gcm_sa(SPI, A, B, KEY)], 8))
    return path


def test_tcpdump_corpus_decrypt_and_report(tmp_path: Path) -> None:
    if not CORPUS.is_dir():
        pytest.fail(f"{CORPUS} is missing: the shared corpus of tcpdump's test captures (CI has it)")
    files = sorted(CORPUS.iterdir())
    assert len(files) > 800
    keys = keys_file(tmp_path)
    results: Counter[str] = Counter()
    for f in files:
        for argv in (["decrypt", str(f), "--keys", str(keys), "-w", str(tmp_path / "o.pcapng"), "-q",
                      "-j", "1", "--json"],
                     ["report", str(f), "--format", "json", "-o", str(tmp_path / "r.json")]):
            rc, line = run_cli(argv)
            if rc == 0:
                results["ok"] += 1
            elif "link type" in line:
                assert "is not one ipsec-capture reads" in line and str(f) in line, line
                results["link type refused"] += 1
            else:
                results["refused"] += 1
    # most of tcpdump's captures are Ethernet, cooked or raw IP: read; the rest named as such
    assert results["ok"] > len(files), results
    assert results["link type refused"] > 100, results


def demo_bundle(tmp: Path) -> dict[str, bytes]:
    """A capture of the no-state story with its events log and key file, as bytes by role."""
    cap = write_bundle(tmp / "seed", no_state_host(), sas=[gcm_sa(SPI, A, B, KEY)])
    return {"pcapng": cap.read_bytes(), "events.jsonl": Path(f"{tmp}/seed.events.jsonl").read_bytes(),
            "esp_sa": Path(f"{tmp}/seed.esp_sa").read_bytes()}


def test_demo_bundle_unharmed(tmp_path: Path) -> None:
    """The seed bundle reads clean, so the mutations below damage a working bundle."""
    seed = demo_bundle(tmp_path)
    for role, data in seed.items():
        (tmp_path / f"b.{role}").write_bytes(data)
    for argv in (["report", str(tmp_path / "b.pcapng"), "--format", "json", "-o", str(tmp_path / "r")],
                 ["decrypt", str(tmp_path / "b.pcapng"), "-w", str(tmp_path / "o.pcapng"), "-q"]):
        assert run_cli(argv)[0] == 0


_SEED: dict[str, bytes] = {}


def block_starts(pcapng: bytes) -> list[int]:
    """Offsets of the blocks of one of our (little-endian) pcapng files."""
    out, at = [], 0
    while at + 8 <= len(pcapng):
        out.append(at)
        at += int.from_bytes(pcapng[at + 4:at + 8], "little")
    return out


@FUZZ
@given(st.lists(st.sampled_from(["pcapng", "events.jsonl", "esp_sa"]), min_size=1, max_size=3, unique=True),
       st.sampled_from(["json", "html"]), st.data())
def test_damaged_demo_bundle(tmp_path: Path, roles: list[str], fmt: str, data: st.DataObject) -> None:
    if not _SEED:
        _SEED.update(demo_bundle(tmp_path))
    for role, seed in _SEED.items():
        damaged = mutate(seed, data.draw(mutations(len(seed), 5), label=role)) if role in roles else seed
        if role == "pcapng" and data.draw(st.booleans(), label="absurd block length"):
            at = data.draw(st.sampled_from(block_starts(seed))) + 4
            claim = data.draw(st.sampled_from([0, 8, 13, 0x4000000, 0x7FFFFFFC, 0xFFFFFFFC]))
            damaged = damaged[:at] + claim.to_bytes(4, "little") + damaged[at + 4:]
        (tmp_path / f"b.{role}").write_bytes(damaged)
    cap = str(tmp_path / "b.pcapng")
    run_cli(["report", cap, "--format", fmt, "-o", str(tmp_path / f"r.{fmt}")])
    run_cli(["decrypt", cap, "-w", str(tmp_path / "o.pcapng"), "-q", "-j", "1"])
    if os.path.exists(tmp_path / "o.pcapng"):  # what decrypt wrote, we read again
        run_cli(["report", str(tmp_path / "o.pcapng"), "--format", "json", "-o", str(tmp_path / "r2")])
