"""The kernel half of the Cilium-layout tests, run inside the VM.

    python -m tests.lab.cilium_run OUT_DIR

`lab up --scenario cilium` (three nodes, one SPI for every pair, per-pair keys, inbound states
`src 0.0.0.0` told apart by marks), `ip netns exec <node 1> ipsec-capture start ... -w
cilium.pcapng`, traffic between all pairs, the rotation race (node 1's inbound state for node 2
replaced by a new SPI while node 2 still sends the old one; node 3 sends too), SIGINT, node 1's
`ip -s xfrm state` and `keys --netns`; then the default-block fault on the same lab. Leaves
OUT_DIR/cilium.json and cilium.* files; tests/lab/test_lab_cilium.py checks them on the host.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.lab.capture_run import cli, say
from tests.lab.daemon_run import NetnsCapture, xfrm_state

PREFIX = "cl"
COUNT = 3


def run(out: Path) -> dict:
    case: dict = {}
    cli("lab", "down", "--prefix", PREFIX)
    case["up"] = cli("lab", "up", "--scenario", "cilium", "--prefix", PREFIX)
    if case["up"]["rc"]:
        return case
    node1 = f"{PREFIX}-n1"
    try:
        case["xfrm_state_before"] = xfrm_state(node1)
        cap = NetnsCapture(node1, out / "cilium.pcapng")
        say(f"cilium: start ready in {cap.ready_s} s")
        case["traffic"] = cli("lab", "traffic", "--count", str(COUNT), "--prefix", PREFIX)
        case["rotation"] = cli("lab", "fault", "rotation-race", "--json", "--prefix", PREFIX)
        case["xfrm_state"] = xfrm_state(node1)
        case["keys"] = cli("keys", "--netns", node1, "-w", str(out / "cilium.kernel.esp_sa"))
        case["capture"] = cap.stop()
        case["block"] = cli("lab", "fault", "block-policy", "--json", "--prefix", PREFIX)
        say(f"cilium: traffic rc {case['traffic']['rc']}, rotation rc {case['rotation']['rc']}, "
            f"block rc {case['block']['rc']}")
    finally:
        case["down"] = cli("lab", "down", "--prefix", PREFIX)
    return case


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        case = run(out)
    except Exception as err:
        case = {"error": repr(err)}
    case["seconds"] = round(time.monotonic() - t0, 1)
    (out / "cilium.json").write_text(json.dumps(case, indent=1))
    say(f"cilium: done in {case['seconds']} s" + (f" ERROR {case['error']}" if "error" in case else ""))
    return 1 if "error" in case else 0


if __name__ == "__main__":
    sys.exit(main())
