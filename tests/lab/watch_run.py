"""The kernel half of the `watch` lab tests, run once inside the VM:

    python tests/lab/watch_run.py OUT_DIR

1. the DaemonSet's own command and arguments (deploy/daemonset.yaml; the image's entry point is
   this checkout's CLI here) in the VM's root namespace, as a node agent: ready, /metrics with
   `ipsec_capture_ready 1`, promtool clean, SIGTERM clean;
2. `lab up` (gcm), `watch --netns <right> --ring ...` scraped by a real Prometheus (its tsdb in the
   guest's own /tmp: mmap fails on the 9p share), traffic, then `lab fault delete-sa`: the
   incident line, Prometheus' answer for the failed-packets series of the deleted SPI, SIGHUP,
   SIGTERM, and what is left (rules, tracefs instances).
The flight recorder's bundle goes to OUT_DIR/bundles; tests/lab/test_lab_watch.py checks it on
the host with `report`. Writes OUT_DIR/watch.json; exits non-zero if a step failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.support.prometheus import free_port, prometheus, promtool_check  # noqa: E402

CLI = [sys.executable, "-m", "ipsec_capture"]


def say(msg: str) -> None:
    print(f"[watch_run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Proc:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, i=into: [i.append(x) for x in s], daemon=True).start()

    def wait_for(self, lines: list[str], text: str, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(lines):
                if text in line:
                    return line
            if self.proc.poll() is not None:
                time.sleep(0.3)
                return next((x for x in lines if text in x), None)
            time.sleep(0.2)
        return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


def cli(*args: str, timeout: float = 300) -> dict:
    p = subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return {"argv": list(args), "rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def instances() -> list[str]:
    base = "/sys/kernel/tracing/instances"
    if not os.path.isdir(base):
        base = "/sys/kernel/debug/tracing/instances"
    if not os.path.isdir(base):
        return []
    return sorted(n for n in os.listdir(base) if n.startswith("ipsec_capture_"))


def daemonset_case(res: dict) -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "daemonset.yaml").read_text()))
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    c = ds["spec"]["template"]["spec"]["containers"][0]
    for m in c["volumeMounts"]:  # the pod's mounts: the paths the command expects exist
        os.makedirs(m["mountPath"], exist_ok=True)
    argv = [*CLI, *c["args"]]
    res["daemonset_argv"] = c["args"]
    say(f"daemonset command: {' '.join(c['command'] + c['args'])}")
    t0 = time.monotonic()
    w = Proc(argv)
    ready = w.wait_for(w.err, "ready", 300)
    res["daemonset_ready"] = ready
    res["daemonset_ready_s"] = round(time.monotonic() - t0, 1)
    if ready:
        text = scrape(9477)
        res["daemonset_metrics_ready"] = "ipsec_capture_ready 1.0" in text
        lint = promtool_check(text)
        res["daemonset_promtool"] = {"rc": lint.returncode, "out": lint.stdout + lint.stderr}
        res["daemonset_instances_running"] = instances()
    t_stop = time.monotonic()
    res["daemonset_rc"] = w.stop(timeout=300)  # bcc detaches every probe first: slow under TCG
    res["daemonset_stop_s"] = round(time.monotonic() - t_stop, 1)
    res["daemonset_stderr"] = "".join(w.err)[-3000:]
    res["daemonset_instances_after"] = instances()
    res["daemonset_rules_after"] = subprocess.run(["nft", "list", "ruleset"], capture_output=True,
                                                  text=True).stdout


def fault_case(res: dict, out: Path) -> None:
    res["up"] = cli("lab", "up", "--scenario", "gcm")
    state = json.loads(cli("lab", "status", "--json")["stdout"])
    right, spi = state["right"], state["l2r"]["spi"]
    res["right"], res["spi"] = right, f"0x{spi:08x}"
    port = free_port()
    bundles = out / "bundles"
    argv = [*CLI, "watch", "--netns", right, "--listen", f"127.0.0.1:{port}", "--interval", "1",
            "--kernel-events", "tracefs", "--ring", "8", "--before", "6", "--after", "3",
            "--dir", str(bundles)]
    res["watch_argv"] = argv[3:]
    w = Proc(argv)
    ready = w.wait_for(w.err, "ready", 300)
    res["ready"] = ready
    if not ready:
        res["stderr"] = "".join(w.err)
        w.stop()
        return
    with prometheus([f"127.0.0.1:{port}"], tsdb_parent="/tmp") as prom:
        res["traffic"] = cli("lab", "traffic", "--count", "3", "--proto", "udp")
        time.sleep(2.5)  # one SA dump (--interval 1) and a scrape after the traffic
        res["fault"] = cli("lab", "fault", "delete-sa", "--json")
        say(f"fault: {res['fault']['stdout'].strip()}")
        line = w.wait_for(w.out, '"no-state"', 60)
        res["incident"] = json.loads(line) if line else None
        sel = f'netns="{right}",spi="0x{spi:08x}",cause="no-state"'
        q = f"ipsec_capture_sa_failed_packets_total{{{sel}}}"
        res["prom_query"] = q
        res["prom_failed"] = prom.wait_for(q, lambda r: bool(r) and float(r[0]["value"][1]) >= 1, 60)
        res["prom_accepted"] = prom.query(f'ipsec_capture_sa_packets_total{{netns="{right}",direction="in"}}')
        # the counter's last delta may land a scrape after the failed series: wait for it too
        res["prom_counter"] = prom.wait_for(f'ipsec_capture_xfrm_stat_total{{netns="{right}",'
                                            'counter="XfrmInNoStates"}',
                                            lambda r: bool(r) and float(r[0]["value"][1]) >= 3, 30)
        res["prom_lifecycle"] = prom.query(f'ipsec_capture_sa_lifecycle_total{{netns="{right}"}}')
        res["prom_targets"] = prom.targets()
        text = scrape(port)
        lint = promtool_check(text)
        res["promtool"] = {"rc": lint.returncode, "out": lint.stdout + lint.stderr}
        res["metrics"] = text
        w.proc.send_signal(signal.SIGHUP)
        res["reloaded"] = w.wait_for(w.err, "reloaded", 30)
        bundle = (res["incident"] or {}).get("bundle")
        deadline = time.monotonic() + 30
        keys = Path(bundle[: -len(".pcapng")] + ".esp_sa") if bundle else None
        while keys is not None and not keys.exists() and time.monotonic() < deadline:
            time.sleep(0.3)
        res["bundle"] = bundle
        res["alive_after_hup"] = w.proc.poll() is None
        res["instances_running"] = instances()
    res["rc"] = w.stop()
    res["stdout"] = "".join(w.out)
    res["stderr"] = "".join(w.err)[-4000:]
    res["instances_after"] = instances()
    res["rules_after"] = subprocess.run(["ip", "netns", "exec", right, "nft", "list", "ruleset"],
                                        capture_output=True, text=True).stdout
    res["down"] = cli("lab", "down")


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    ok = True
    for name, step in (("daemonset", lambda: daemonset_case(res)), ("fault", lambda: fault_case(res, out))):
        try:
            step()
        except Exception as err:  # record and go on: the host-side test names what failed
            import traceback

            res[f"{name}_error"] = traceback.format_exc()
            say(f"{name} failed: {err}")
            ok = False
        (out / "watch.json").write_text(json.dumps(res, indent=1, default=str))
    say("done")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
