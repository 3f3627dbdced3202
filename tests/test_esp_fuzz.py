"""Hypothesis: the decoder never fails, whatever the bytes. `decrypt` has a last-resort catch
that turns a bug into `unsupported` + "decoder error", so the tests assert that this catch is
never reached: every packet gets a real verdict."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipsec_capture.decrypt.decoder import STATUSES, EspDecoder, esp_header
from tests.support.esp_build import SUITES, Keys, make_sa, outer, seal

SPI = 0x01020304
_KEYS = [Keys.random(s) for s in SUITES]
# One decoder holding every suite under its own SPI, in both modes and with ESN on some.
_DECODER = EspDecoder(
    make_sa(k, SPI + i, "192.0.2.1", "192.0.2.2", mode="tunnel" if i % 2 else "transport", esn=i % 3 == 0,
            natt=i % 4 == 0)
    for i, k in enumerate(_KEYS)
)
_PACKETS = [
    outer(seal(k, SPI + i, 5, b"\x45" + bytes(range(40)), 4, esn=i % 3 == 0),
          "192.0.2.1", "192.0.2.2", natt=i % 4 == 0)
    for i, k in enumerate(_KEYS)
]


def test_unmutated_packets_decrypt() -> None:
    """The seeds of the mutation test are valid, so mutations start from deep inside the path."""
    assert [_DECODER.decrypt(p).status for p in _PACKETS] == \
        ["ok" if k.suite.aead or k.suite.auth else "ok-unverified" for k in _KEYS]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    res = _DECODER.decrypt(data)
    assert res.status in STATUSES and not res.detail.startswith("decoder error"), res.detail
    esp_header(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=20, max_size=120), st.sampled_from([0x45, 0x46, 0x60]),
       st.sampled_from([50, 17, 0, 60]))
def test_ip_looking_bytes(rest: bytes, first: int, proto: int) -> None:
    """Bytes that pass the first checks (IP version, ESP/UDP/extension header) go deeper."""
    pkt = bytearray(bytes([first]) + rest)
    if first >> 4 == 4 and len(pkt) > 9:
        pkt[9] = proto
    elif len(pkt) > 6:
        pkt[6] = proto
    res = _DECODER.decrypt(bytes(pkt))
    assert res.status in STATUSES and not res.detail.startswith("decoder error"), res.detail


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(_PACKETS) - 1), st.data())
def test_mutated_packets(index: int, data: st.DataObject) -> None:
    pkt = bytearray(_PACKETS[index])
    ops = data.draw(st.lists(st.tuples(st.integers(0, len(pkt) - 1), st.integers(1, 255)), min_size=1,
                             max_size=4))
    for at, xor in ops:
        pkt[at] ^= xor
    cut = data.draw(st.integers(0, len(pkt)))
    res = _DECODER.decrypt(bytes(pkt[:cut]))
    assert res.status in STATUSES
    assert not res.detail.startswith("decoder error"), res.detail
