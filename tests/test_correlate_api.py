"""The notebook API: load a bundle by its capture name, iterate joined packets, get tables."""

from __future__ import annotations

import pytest

from ipsec_capture.correlate.api import load
from ipsec_capture.correlate.scapy_view import scapy_pair
from ipsec_capture.errors import UserError
from tests.support.bundles import IB, KEY, SPI, A, B, no_state_host, write_bundle
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


def test_packet_scapy_gives_outer_and_decrypted_inner(tmp_path):
    """`p.scapy(bundle)`: the ESP packet as captured and the inner UDP packet our decoder opened
    with the bundle's key; without keys there is no inner packet, and a cleartext point's packet
    has no ESP at all."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.ipsec import ESP

    cap = write_bundle(tmp_path / "out", no_state_host(), sas=[gcm_sa(SPI, A, B, KEY)])
    b = load(cap)
    first = next(iter(b.packets()))
    view = first.scapy(b)
    assert view.status == "ok"
    assert view.outer[IP].dst == B and view.outer[ESP].spi == SPI and view.outer[ESP].seq == 1
    assert view.inner[IP].dst == IB and view.inner[UDP].dport == 9
    assert bytes(view.inner[UDP].payload) == b"x" * 40
    bare = first.scapy()
    assert bare.inner is None and bare.status is None and bare.outer[ESP].spi == SPI
    clear = scapy_pair(bytes(view.inner), b)
    assert clear.status is None and clear.inner is None and clear.outer[UDP].dport == 9
