"""Two namespaces of one tunnel both drop packets (each side's inbound SA deleted, traffic both
ways), each captured by its own `start --kernel-events kprobe` in the lab VM: each bundle's
report blames only its own namespace's drops, never the other's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ipsec_capture.correlate.analysis import analyse
from ipsec_capture.correlate.bundle import open_bundle
from ipsec_capture.lab.vm import LabVM

pytestmark = pytest.mark.lab
RUNNER = Path(__file__).parent / "netns_run.py"


def test_each_namespace_is_blamed_for_its_own_drops_only(lab_vm: LabVM) -> None:
    out = Path(lab_vm.rw[0])
    r = lab_vm.run([sys.executable, str(RUNNER), str(out)], timeout=1500)
    assert r.rc == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads((out / "netns.json").read_text())
    state = d["state"]
    for side, own_in_spi, own_out_spi in (("left", state["r2l"]["spi"], state["l2r"]["spi"]),
                                          ("right", state["l2r"]["spi"], state["r2l"]["spi"])):
        cap = d["captures"][side]
        assert cap["rc"] == 0, cap["stderr"]
        an = analyse(open_bundle(out / f"{side}.pcapng"))
        inode = d["inodes"][side]
        failed = [p for p in an.summary.packets if p.verdict == "failed"]
        # its own drops: the other side's datagrams arriving on the SA it no longer has
        assert len(failed) >= 5, (side, an.to_dict()["drops"])
        for p in failed:
            assert p.direction == "in" and p.spi == own_in_spi and p.cause == "no-state", (side, p.to_dict())
            assert all(e.netns in (None, inode) for e in p.events), (side, p.to_dict())
        # what it sent left fine, whatever happened to it in the other namespace
        sent = [p for p in an.summary.packets if p.direction == "out" and p.spi == own_out_spi]
        assert len(sent) >= 5 and all(p.verdict == "ok" for p in sent), (side, [p.to_dict() for p in sent])
