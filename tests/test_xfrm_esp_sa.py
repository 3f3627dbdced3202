"""esp_sa writer/reader: names both ways, warnings where Wireshark cannot decrypt, the CLI file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ipsec_capture.errors import UserError
from ipsec_capture.xfrm.esp_sa import read_esp_sa, warnings_for, wireshark_columns, write_esp_sa
from ipsec_capture.xfrm.sa import SA, Algorithm, Replay

DATA = Path(__file__).parent / "data"


def sa(spi: int, **kw) -> SA:
    return SA("192.0.2.1", "192.0.2.2", spi, family=2, **kw)


ROUND_TRIP = [
    sa(1, aead=Algorithm("rfc4106(gcm(aes))", bytes(20), icv_bits=64)),
    sa(2, aead=Algorithm("rfc4106(gcm(aes))", bytes(36), icv_bits=128)),
    sa(3, enc=Algorithm("cbc(aes)", bytes(16)), auth=Algorithm("hmac(sha256)", bytes(32), trunc_bits=96)),
    sa(4, enc=Algorithm("rfc3686(ctr(aes))", bytes(20)),
       auth=Algorithm("hmac(sha512)", bytes(64), trunc_bits=256)),
    sa(5, enc=Algorithm("cbc(des3_ede)", bytes(24)), auth=Algorithm("hmac(md5)", bytes(16), trunc_bits=96)),
    sa(6, enc=Algorithm("ecb(cipher_null)"), auth=Algorithm("hmac(sha384)", bytes(48), trunc_bits=192)),
]


def test_names_round_trip_to_linux_names():
    back = read_esp_sa(write_esp_sa(ROUND_TRIP, 8))
    for a, b in zip(ROUND_TRIP, back, strict=True):
        assert (b.spi, b.aead, b.enc, b.auth) == (a.spi, a.aead, a.enc, a.auth)


def test_plain_auth_gets_the_kernel_default_truncation():
    plain = sa(7, enc=Algorithm("cbc(aes)", bytes(16)), auth=Algorithm("hmac(sha256)", bytes(32)))
    text = write_esp_sa([plain])
    assert "HMAC-SHA-256-96 [draft-ietf-ipsec-ciph-sha-256-00]" in text


@pytest.mark.parametrize(("alg", "needle"), [
    (Algorithm("rfc4309(ccm(aes))", bytes(19), icv_bits=128), "ccm"),
    (Algorithm("rfc4543(gcm(aes))", bytes(20), icv_bits=128), "rfc4543"),
    (Algorithm("rfc7539esp(chacha20,poly1305)", bytes(36), icv_bits=128), "Wireshark 4.0"),
])
def test_undecryptable_aead_warns_and_stays_loadable(alg, needle):
    sas = [sa(8, aead=alg)]
    (warning,) = warnings_for(sas, 8)
    assert needle in warning and "0x00000008" in warning
    text = write_esp_sa(sas, 8)
    row = text.splitlines()[-1]
    assert '"NULL",""' in row and "ANY 128 bit authentication [no checking]" in row
    assert alg.key.hex() not in row  # no key for a row Wireshark cannot use
    (back,) = read_esp_sa(text)  # ... but our own line before it keeps the whole SA
    assert (back.aead, back.spi) == (alg, 8)


def test_ten_columns_carry_esn():
    s = sa(9, aead=Algorithm("rfc4106(gcm(aes))", bytes(20), icv_bits=128), flags=["esn"],
           replay=Replay(seq_hi=3, esn=True))
    text = write_esp_sa([s], 10)
    assert text.strip().splitlines()[-1].endswith('"64-bit","3"')
    (back,) = read_esp_sa(text)
    assert back.esn and back.replay.seq_hi == 3
    assert any("uses ESN (high bits 3)" in w for w in warnings_for([s], 8))
    fresh = sa(10, aead=Algorithm("rfc4106(gcm(aes))", bytes(20), icv_bits=128), flags=["esn"],
               replay=Replay(esn=True))  # high bits still 0: the ICV covers them all the same
    assert any("uses ESN (high bits 0)" in w for w in warnings_for([fresh], 8))
    assert warnings_for([fresh], 10) == []


def test_reader_rejects_wrong_columns_and_names():
    with pytest.raises(UserError, match="line 1: 3 columns"):
        read_esp_sa('"IPv4","*","*"\n')
    with pytest.raises(UserError, match="unknown Wireshark encryption"):
        read_esp_sa('"IPv4","*","*","0x1","ROT13","","NULL",""\n')


def test_wireshark_columns_matches_installed_tshark():
    """Wireshark 4.2 added the SN and ESN High Bits columns: 10 from 4.2 on, 8 before."""
    first = subprocess.run(["tshark", "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"(\d+)\.(\d+)\.\d+", first.splitlines()[0])
    assert found, first.splitlines()[0]
    expected = 10 if (int(found[1]), int(found[2])) >= (4, 2) else 8
    assert wireshark_columns() == expected


def test_keys_command_writes_0600_and_hides_nothing_it_should_not(tmp_path):
    out = tmp_path / "k.esp_sa"
    proc = subprocess.run([sys.executable, "-m", "ipsec_capture", "keys", "--from-text",
                           str(DATA / "state_strongswan_natt_iproute2-6.1.txt"), "-w", str(out),
                           "--wireshark-format", "8"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    rows = [r for r in out.read_text().splitlines() if not r.startswith("#")]
    assert len(rows) == 2 and all(r.startswith('"IPv4","*","*"') for r in rows)  # NAT-T: wildcards
    assert "6ad2a89a" not in proc.stdout + proc.stderr
    shown = subprocess.run([sys.executable, "-m", "ipsec_capture", "sa", "--from-text",
                            str(DATA / "state_strongswan_natt_iproute2-6.1.txt")], capture_output=True,
                           text=True, timeout=60)
    assert "0xb9e564dc" in shown.stdout and "6ad2a89a" not in shown.stdout
