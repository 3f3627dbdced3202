"""Keep OUT.esp_sa current while a live capture runs.

IKE daemons rekey every hour or so, and MOBIKE moves SAs: a table dumped once at start misses
the SAs that carry the end of the capture. The keeper subscribes to the XFRM monitor *before*
dumping (so nothing slips between dump and subscription), writes the table, and rewrites it
atomically (0600) whenever an SA appears or changes. Deleted SAs stay in the table: packets
captured before the delete still need their keys. One row per kernel state: states are told
apart as the kernel tells them, by (destination, SPI, protocol, mark), so Cilium's inbound states
(one SPI for every peer, `src 0.0.0.0`, a mark per peer) each keep their own key.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from .esp_sa import columns_for, warnings_for, write_esp_sa, write_private
from .monitor import XfrmMonitor
from .netlink import dump_states
from .sa import SA


def state_id(sa: SA) -> tuple[str, int, int, tuple[int, int] | None]:
    """What the kernel looks a state up by (xfrm_state_lookup: mark, daddr, SPI, proto)."""
    return (*sa.key_id, sa.mark)


class KeyFileKeeper:
    """Companion for `start`: `start()` dumps and writes, then follows; `stop()` summarises."""

    name = "keys"

    def __init__(self, path: str | os.PathLike[str], netns: str | None = None,
                 columns: int | str | None = None) -> None:
        self.path = os.fspath(path)
        self.netns = netns
        self.columns = columns_for(columns)
        self._sas: dict[tuple[str, int, int, tuple[int, int] | None], SA] = {}
        self._lock = threading.Lock()
        self._monitor: XfrmMonitor | None = None
        self._thread: threading.Thread | None = None
        self.rekeys = 0
        self.updates = 0
        self.deletes = 0
        self.writes = 0
        self._warned: set[str] = set()

    def start(self) -> None:
        self._monitor = XfrmMonitor(self.netns)  # subscribe first: no gap before the dump
        for sa in dump_states(self.netns):
            self._sas[state_id(sa)] = sa
        self._write()
        self._thread = threading.Thread(target=self._follow, name="ipsec-capture-keys", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        assert self._monitor is not None
        for note in self._monitor.notifications():
            sa, kind = note.sa, note.event.kind
            if sa is None or kind not in ("sa-new", "sa-update", "sa-delete", "expire"):
                continue
            with self._lock:
                known = state_id(sa) in self._sas
                if kind == "sa-delete" or kind == "expire":
                    self.deletes += kind == "sa-delete"
                    if known:
                        continue  # keep the keys we have for packets already captured
                elif kind == "sa-new" and not known:
                    self.rekeys += 1
                else:
                    self.updates += 1
                self._sas[state_id(sa)] = sa
                self._write()

    def _write(self) -> None:
        sas = list(self._sas.values())
        write_private(self.path, write_esp_sa(sas, self.columns))
        self.writes += 1
        for line in warnings_for(sas, self.columns):
            if line not in self._warned:
                self._warned.add(line)
                print(f"ipsec-capture: warning: {line}", file=sys.stderr)

    def stop(self) -> dict[str, Any]:
        if self._monitor is not None:
            self._monitor.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            esp = [sa for sa in self._sas.values() if sa.proto == 50]
            return {"path": self.path, "sas_written": len(esp), "rekeys_seen": self.rekeys,
                    "updates_seen": self.updates, "deletes_seen": self.deletes, "writes": self.writes,
                    "columns": self.columns}
