"""What start's closing line and `ip xfrm monitor` must agree on (tests/lab/sa_counts_run.py
prints both accounts; the host test and the lab test check them here)."""

from __future__ import annotations

from pathlib import Path

RUNNER = Path(__file__).parent.parent / "lab" / "sa_counts_run.py"


def check(d: dict, usable: int, never_keyed: int) -> None:
    keeper, monitor = d["keeper"], d["monitor"]
    assert d["rc"] == 0
    assert monitor["usable"] == usable == keeper["rekeys_seen"], (d["line"], d["monitor_text"])
    assert d["never_keyed"] == never_keyed == keeper["getspi_never_keyed"], d["line"]
    assert keeper["sas_written"] == usable  # the table holds the usable SAs, no keyless rows
    assert f"({usable} new during the capture" in d["line"]
    assert f"{never_keyed} reserved SPIs (GETSPI) never got keys" in d["line"], d["line"]
