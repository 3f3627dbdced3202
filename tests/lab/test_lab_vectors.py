"""The kernel as a key source for other people's known answers: each kernel-made packet of
../shared/vectors gets its SA from the vector's own `ip xfrm state add` command on the lab's real
kernel (Debian 6.1: DES, Blowfish, CAST5, GMAC, CCM and ESN included), read back the two ways a
user reads it (`ip xfrm state` text, and our XFRM netlink reader through `keys --netns`), and must
decrypt to its inner packet through `decrypt`. The real `ip xfrm state` text is also what
tests/support/xfrm_cmd.state_text renders for the host-only tests: checked here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ipsec_capture.lab.vm import LabVM
from ipsec_capture.xfrm.text import parse_states
from tests.support.bundles import write_pcap
from tests.support.xfrm_cmd import parse_command, ref_id, ref_packet, scapy_refs, state_text
from tests.test_vectors import assert_inner_icmp, decrypt

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]
RUNNER = Path(__file__).with_name("vectors_run.py")
REFS = scapy_refs()


@pytest.fixture(scope="module")
def kernel_keys(lab_vm: LabVM) -> Path:
    out = Path(lab_vm.rw[0]) / "vectors"
    r = lab_vm.run([sys.executable, str(RUNNER), str(out)], timeout=600)
    assert r.rc == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.mark.parametrize("n", range(len(REFS)), ids=[ref_id(r) for r in REFS])
def test_kernel_sa_decrypts_its_vector(kernel_keys: Path, n: int, tmp_path: Path) -> None:
    ref = REFS[n]
    cap = tmp_path / "v.pcap"
    write_pcap(cap, [ref_packet(ref)])
    expected = "ok" if parse_command(ref["cmd"]).algs[0][0] == "aead" else "ok-unverified"
    for keys in (kernel_keys / f"{n}.txt", kernel_keys / f"{n}.8.esp_sa", kernel_keys / f"{n}.10.esp_sa"):
        summary, [(pkt, _)] = decrypt(cap, keys, tmp_path)
        assert summary["totals"] == {expected: 1}, (keys.name, summary)
        assert_inner_icmp(pkt)
    # the kernel's own text and the host tests' rendering of the command say the same SA
    (real,) = parse_states((kernel_keys / f"{n}.txt").read_text())
    (rendered,) = parse_states(state_text(ref["cmd"]))
    for field in ("src", "dst", "spi", "mode", "aead", "enc", "auth", "esn"):
        assert getattr(real, field) == getattr(rendered, field), field
    assert (real.replay.seq_hi, real.replay.oseq_hi) == (rendered.replay.seq_hi, rendered.replay.oseq_hi)
    assert json.loads((kernel_keys / "result.json").read_text())[n]["failed"] == []
