"""Run `start` in a namespace of its own while SAs come and go the way IKE daemons make them, with
`ip xfrm monitor` watching; print both accounts as JSON (for tests/test_start_sa_counts.py on the
host and in the lab VM, where ESP states can be keyed).

    python tests/lab/sa_counts_run.py OUTDIR [--keyed]

Before `ready`, one SPI is reserved (XFRM_MSG_ALLOCSPI, `ip xfrm state allocspi`: a larval state
without keys). During the capture: three SPIs reserved and, with --keyed, each given its keys by
an update, as pluto and charon install inbound SAs; with --keyed two outbound SAs added outright;
last one more SPI reserved and never keyed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time

A, B = "192.0.2.1", "192.0.2.2"
KEY = "0x" + "11" * 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ip(ns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "ip", *argv], check=True, capture_output=True,
                          text=True).stdout


def reserve(ns: str, src: str, dst: str) -> int:
    out = ip(ns, "xfrm", "state", "allocspi", "src", src, "dst", dst, "proto", "esp", "mode", "tunnel",
             "min", "0x1000", "max", "0xffff")
    return int(re.search(r"spi (0x[0-9a-f]+)", out)[1], 16)


def keyed(ns: str, verb: str, src: str, dst: str, spi: int) -> None:
    ip(ns, "xfrm", "state", verb, "src", src, "dst", dst, "proto", "esp", "spi", hex(spi), "mode",
       "tunnel", "reqid", str(spi), "aead", "rfc4106(gcm(aes))", KEY, "128")


def monitor_account(text: str) -> dict[str, int]:
    """SAs the monitor showed with algorithms (usable), distinct by SPI; and its notifications."""
    blocks, cur = [], []
    for line in text.splitlines():
        if line and not line[0].isspace():
            cur = [line]
            blocks.append(cur)
        elif cur:
            cur.append(line)
    usable = set()
    for b in blocks:
        spi = next((m[1] for ln in b if (m := re.search(r"proto esp spi (0x[0-9a-f]+)", ln))), None)
        if spi and not b[0].startswith(("Deleted", "Expired")) and \
                any(ln.strip().startswith(("aead ", "enc ", "auth ")) for ln in b):
            usable.add(spi)
    return {"usable": len(usable), "notifications": len(blocks)}


def main() -> int:
    out, with_keys = sys.argv[1], "--keyed" in sys.argv
    ns = f"ict-sac-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    start = mon = None
    try:
        ip(ns, "link", "set", "lo", "up")
        reserved = [reserve(ns, B, A)]  # before the capture: present at start, never keyed
        start = subprocess.Popen([sys.executable, "-m", "ipsec_capture", "start", "--netns", ns, "--group",
                                  "77", "-w", os.path.join(out, "sac.pcapng"), "--json",
                                  "--kernel-events", "off"], cwd=ROOT, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = start.stderr.readline()
        while line and not line.startswith("ready"):
            line = start.stderr.readline()
        if not line:
            raise SystemExit(f"start did not get ready: {start.stderr.read()}")
        mon = subprocess.Popen(["ip", "netns", "exec", ns, "ip", "xfrm", "monitor"], text=True,
                               stdout=subprocess.PIPE)
        time.sleep(0.5)
        for _ in range(3):
            spi = reserve(ns, B, A)  # inbound: reserved, then keyed
            if with_keys:
                keyed(ns, "update", B, A, spi)
            else:
                reserved.append(spi)
        if with_keys:
            for spi in (0x7001, 0x7002):  # outbound: added with its keys at once
                keyed(ns, "add", A, B, spi)
        reserved.append(reserve(ns, B, A))  # never keyed
        time.sleep(0.5)
        start.send_signal(signal.SIGINT)
        summary_json, err = start.communicate(timeout=60)
        mon.send_signal(signal.SIGTERM)
        monitor_text = mon.communicate(timeout=10)[0]
        summary = json.loads(summary_json)
        keys_line = next((ln.strip() for ln in err.splitlines() if ln.strip().startswith("keys:")), "")
        print(json.dumps({"keeper": summary["companions"]["keys"], "line": keys_line,
                          "monitor": monitor_account(monitor_text), "never_keyed": len(reserved),
                          "rc": start.returncode, "monitor_text": monitor_text}))
    finally:
        for p in (start, mon):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
