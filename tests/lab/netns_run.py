"""Two namespaces that both drop packets, each captured by its own `start` (kprobe events), in the
lab VM; tests/lab/test_lab_netns.py reports each bundle on the host.

    python tests/lab/netns_run.py OUT_DIR

One gcm lab; each side's inbound SA is deleted, then each side sends UDP to the other: the
packets die on arrival (XfrmInNoStates in the receiver's namespace), the sender's leave fine.
Writes OUT_DIR/netns.json (the lab state, the captures' summaries) and the two bundles.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from capture_run import Capture, cli, say

PREFIX = "twons"
COUNT = 5


def send(netns: str, src: str, dst: str) -> None:
    code = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.bind(({src!r}, 0))\n"
            f"for i in range({COUNT}):\n    s.sendto(b'x' * 64, ({dst!r}, 9))\n")
    subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code], check=True, timeout=60)


def main() -> int:
    out = Path(sys.argv[1])
    cli("lab", "down", "--prefix", PREFIX)
    up = cli("lab", "up", "--scenario", "gcm", "--prefix", PREFIX)
    if up["rc"]:
        print(json.dumps({"up": up}))
        return 1
    state = json.loads(cli("lab", "status", "--json", "--prefix", PREFIX)["stdout"])
    result: dict = {"state": state}
    try:
        caps = {side: Capture(out / f"{side}.pcapng", state[side], kernel_events="kprobe", ready_timeout=600)
                for side in ("left", "right")}
        say("both captures ready")
        for side, spi, src, dst in (("left", state["r2l"]["spi"], state["right_addr"], state["left_addr"]),
                                    ("right", state["l2r"]["spi"], state["left_addr"], state["right_addr"])):
            subprocess.run(["ip", "-n", state[side], "xfrm", "state", "delete", "src", src, "dst", dst,
                            "proto", "esp", "spi", hex(spi)], check=True, timeout=60)
        send(state["left"], state["left_host"], state["right_host"])
        send(state["right"], state["right_host"], state["left_host"])
        time.sleep(1.5)  # an xfrm_stat poll after the drops
        result["captures"] = {side: cap.stop() for side, cap in caps.items()}
        result["inodes"] = {side: os.stat(f"/run/netns/{state[side]}").st_ino for side in ("left", "right")}
    finally:
        result["down"] = cli("lab", "down", "--prefix", PREFIX)
        (out / "netns.json").write_text(json.dumps(result))
    say("done")
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    raise SystemExit(main())
