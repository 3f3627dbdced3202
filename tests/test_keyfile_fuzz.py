"""Hypothesis: the key file readers (Wireshark/strongSwan esp_sa with our lines, `ip xfrm state`
text, tcpdump secrets) take any text and either return SAs or raise our UserError, nothing else;
and whatever they accept, the decoder and the esp_sa writer take too. Inputs are valid files of
each format cut, spliced and sprinkled with random text, so the mutations start deep inside each
parser. Bounded: a fixed number of examples per reader."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipsec_capture.decrypt.decoder import EspDecoder
from ipsec_capture.errors import UserError
from ipsec_capture.xfrm.esp_sa import read_esp_sa, sa_json, write_esp_sa
from ipsec_capture.xfrm.keyfile import parse_keys
from ipsec_capture.xfrm.tcpdump import parse_tcpdump
from ipsec_capture.xfrm.text import parse_states
from tests.support.esp_build import SUITES, Keys, make_sa
from tests.support.xfrm_cmd import scapy_refs, state_text

_SAS = [make_sa(Keys.random(s), 0x100 + i, "192.0.2.1", "192.0.2.2", mode="tunnel", esn=i % 2 == 0)
        for i, s in enumerate(SUITES)]
SEEDS = {
    "esp_sa": write_esp_sa(_SAS, 8) + write_esp_sa(_SAS[:5], 10),
    "strongswan": '"IPv4","192.0.2.1","192.0.2.2","0xc0000001","AES-GCM [RFC4106]","0x' + "11" * 20
                  + '","ANY 64 bit authentication [no checking]","0x"\n'
                  '"IPv4","192.0.2.2","192.0.2.1","0xc0000002","TripleDes-CBC [RFC2451]","0x' + "22" * 24
                  + '","HMAC-SHA-1-96 [RFC2404]","0x' + "33" * 20 + '"\n',
    "text": "".join(state_text(r["cmd"]) for r in scapy_refs()),
    "tcpdump": "# keys\n0x12345678@192.1.2.45 3des-cbc-hmac96:0x" + "43" * 24 + ",0x1@2001:db8::1 aes-cbc:0x"
               + "00" * 16 + "\ndes-cbc:0x0102030405060708\nikev2 I 0x1 0x2 a b\n",
}
READERS = {"esp_sa": read_esp_sa, "strongswan": read_esp_sa, "text": parse_states, "tcpdump": parse_tcpdump}
_PIECES = st.sampled_from(['"', ",", "#", " ", "\t", "\n", "0x", "*", "@", ":", "{", "}", "[", "]", "\\",
                           "ipsec-capture-sa ", '{"spi":', "-1", "99999999999", "nan", "ANY 64 bit",
                           "aead ", "auth-trunc ", "enc ", "  0", "esn", "seq-hi 0x", "file ", "-hmac96",
                           "\x00", "é", "\r"])


@st.composite
def mutated(draw: st.DrawFn, seed: str) -> str:
    """`seed` with a few cuts, duplications, deletions and insertions."""
    text = seed
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 80)))
        op = draw(st.sampled_from(["cut", "dup", "del", "ins", "text"]))
        if op == "cut":
            text = text[:i]
        elif op == "dup":
            text = text[:j] + text[i:j] + text[j:]
        elif op == "del":
            text = text[:i] + text[j:]
        elif op == "ins":
            text = text[:i] + draw(_PIECES) + text[i:]
        else:
            text = text[:i] + draw(st.text(max_size=20)) + text[j:]
    return text


def _accepts(reader, text: str) -> None:
    try:
        sas = reader(text)
    except UserError:
        return
    # what a reader accepts, the decoder builds and the writer writes (and reads back)
    EspDecoder(sas)
    for columns in (8, 10):
        written = write_esp_sa(sas, columns)
        read_esp_sa(written)
    for sa in sas:
        sa_json(sa)


def test_seeds_are_valid() -> None:
    for name, text in SEEDS.items():
        assert READERS[name](text), name


# IPSEC_CAPTURE_FUZZ_EXAMPLES=3000 for a long hunt (a developer's, not CI's)
_FUZZ = settings(max_examples=int(os.environ.get("IPSEC_CAPTURE_FUZZ_EXAMPLES", "120")), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.data())
def test_esp_sa_reader(data: st.DataObject) -> None:
    _accepts(read_esp_sa, data.draw(mutated(SEEDS["esp_sa"])))


@_FUZZ
@given(st.data())
def test_strongswan_esp_sa(data: st.DataObject) -> None:
    _accepts(read_esp_sa, data.draw(mutated(SEEDS["strongswan"])))


@_FUZZ
@given(st.data())
def test_ip_xfrm_state_text(data: st.DataObject) -> None:
    _accepts(parse_states, data.draw(mutated(SEEDS["text"])))


@_FUZZ
@given(st.data())
def test_tcpdump_secrets(data: st.DataObject) -> None:
    _accepts(parse_tcpdump, data.draw(mutated(SEEDS["tcpdump"])))


@_FUZZ
@given(st.text(max_size=300))
def test_any_text_through_the_detector(text: str) -> None:
    _accepts(parse_keys, text)
