"""The test sealer (tests/support/esp_build.py) is right: where scapy's SecurityAssociation is
right (CBC, CTR, 3DES, NULL with HMAC), both produce the same bytes."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scapy.layers.inet import IP, UDP
from scapy.layers.ipsec import ESP
from scapy.packet import Raw

from tests.support.esp_build import SCAPY_NAMES, SUITES, Keys, scapy_sa, seal


@pytest.mark.parametrize("label", sorted(SCAPY_NAMES))
def test_sealer_matches_scapy(label: str) -> None:
    """Same key, IV and packet: our test sealer and scapy produce identical ESP bytes."""
    suite = next(s for s in SUITES if s.label == label)
    keys = Keys.random(suite)
    inner = IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=1000, dport=2000) / Raw(b"x" * 37)
    iv = os.urandom({"cbc(aes)": 16, "cbc(des3_ede)": 8}.get(suite.enc, 8)) if suite.key_len else None
    theirs = bytes(scapy_sa(keys, 0x1001).encrypt(inner, seq_num=5, iv=iv)[ESP])
    ours = seal(keys, 0x1001, 5, bytes(inner[UDP]), 17, iv=iv)
    assert ours == theirs


def test_sealer_gcm_short_icv_is_tag_prefix() -> None:
    """GCM with an 8-byte ICV is the 16-byte tag cut (NIST SP 800-38D 5.2.1.2), checked on the
    streaming API that takes a short tag."""
    keys = Keys.random(SUITES[2])
    esp = seal(keys, 1, 1, b"abc", 17, iv=b"\1" * 8)
    dec = Cipher(algorithms.AES(keys.key[:-4]),
                 modes.GCM(keys.key[-4:] + b"\1" * 8, esp[-8:], min_tag_length=8)).decryptor()
    dec.authenticate_additional_data(esp[:8])
    assert (dec.update(esp[16:-8]) + dec.finalize())[:3] == b"abc"
