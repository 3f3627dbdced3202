"""The kernel half of tests/lab/test_lab_vectors.py, run inside the lab VM:

    python tests/lab/vectors_run.py OUT_DIR

For each kernel-made packet of ../shared/vectors/scapy_kernel_refs.json, installs its SA with the
vector's own `ip xfrm state add` command in a namespace of its own, then saves what the kernel
gives back: `ip xfrm state` text (OUT_DIR/N.txt) and our XFRM netlink reader's tables
(`ipsec-capture keys --netns`, OUT_DIR/N.8.esp_sa and N.10.esp_sa). Writes OUT_DIR/result.json
with each step's exit code and stderr; exits non-zero if a step failed.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.xfrm_cmd import scapy_refs


def run(argv: list[str]) -> dict:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return {"argv": argv, "rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for n, ref in enumerate(scapy_refs()):
        ns = f"ict-vec{n}"
        steps = [run(["ip", "netns", "add", ns])]
        steps.append(run(["ip", "-n", ns, *shlex.split(ref["cmd"])[1:]]))
        text = run(["ip", "-n", ns, "xfrm", "state"])
        steps.append(text)
        (out / f"{n}.txt").write_text(text["stdout"])
        for columns in ("8", "10"):
            steps.append(run([sys.executable, "-m", "ipsec_capture", "keys", "--netns", ns, "-w",
                              str(out / f"{n}.{columns}.esp_sa"), "--wireshark-format", columns]))
        steps.append(run(["ip", "netns", "del", ns]))
        failed = [s for s in steps if s["rc"] != 0]
        results.append({"n": n, "cmd": ref["cmd"], "failed": failed})
        print(f"vector {n}: {'ok' if not failed else 'FAILED ' + failed[0]['stderr'].strip()}", flush=True)
    (out / "result.json").write_text(json.dumps(results, indent=1))
    return 1 if any(r["failed"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
