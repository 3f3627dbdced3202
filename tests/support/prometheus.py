"""A real Prometheus server for tests: Debian's `prometheus` on loopback, a generated scrape
config, a temporary tsdb; queried through its HTTP API. `promtool check metrics` as the linter."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log

    def get(self, path: str, **params: str) -> Any:
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{q}", timeout=10) as r:
            return json.loads(r.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        d = self.get("/api/v1/query", query=expr)
        assert d["status"] == "success", d
        return d["data"]["result"]

    def wait_for(self, expr: str, ok: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Query until `ok(result)` holds; the last result either way."""
        deadline = time.monotonic() + timeout
        res = self.query(expr)
        while not ok(res) and time.monotonic() < deadline:
            time.sleep(0.5)
            res = self.query(expr)
        return res

    def targets(self) -> list[dict[str, Any]]:
        return self.get("/api/v1/targets")["data"]["activeTargets"]


@contextmanager
def prometheus(targets: list[str], tsdb_parent: str | None = None,
               binary: str = "prometheus") -> Iterator[Prometheus]:
    """Prometheus scraping `targets` (host:port) every second, on a free loopback port."""
    work = Path(tempfile.mkdtemp(prefix="ict-prom-", dir=tsdb_parent))
    port = free_port()
    config = work / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: watch\n    static_configs:\n"
        f"      - targets: [{', '.join(repr(t) for t in targets)}]\n")
    log = work / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=out)
    server = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def promtool_check(text: str, binary: str = "promtool") -> subprocess.CompletedProcess[str]:
    """`promtool check metrics` on an exposition (returns the completed process)."""
    return subprocess.run([binary, "check", "metrics"], input=text, capture_output=True, text=True)
