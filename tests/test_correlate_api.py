"""The notebook API: load a bundle by its capture name, iterate joined packets, get tables."""

from __future__ import annotations

import pytest

from ipsec_capture.correlate.api import load
from ipsec_capture.errors import UserError
from tests.support.bundles import KEY, SPI, A, B, no_state_host, write_bundle
from tests.support.synthetic import gcm_sa


def test_load_iterate_and_tables(tmp_path):
    cap = write_bundle(tmp_path / "out", no_state_host(), sas=[gcm_sa(SPI, A, B, KEY)])
    b = load(cap)
    assert b.missing == []
    packets = list(b.packets())
    assert [p.seq for p in packets] == list(range(1, 9))
    assert [p.verdict for p in packets] == ["ok"] * 5 + ["failed"] * 3
    assert list(b.packets())[7].cause == "no-state"  # a second pass reads the files again
    sa = b.table("sa", frame=False)
    assert sa[0]["spi"] == "0xc0ffee01" and sa[0]["packets"] == 8
    drops = b.table("drops", frame=False)
    assert drops[0]["cause"] == "no-state"
    rows = b.table("packets", frame=False)
    assert len(rows) == 8 and rows[5]["counter"] == "XfrmInNoStates"
    try:
        import pandas
    except ImportError:
        assert b.table("sa") == sa  # without pandas: the same list of dicts
    else:
        assert isinstance(b.table("sa"), pandas.DataFrame)
    with pytest.raises(UserError, match="unknown table"):
        b.table("bogus")
