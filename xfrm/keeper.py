"""Keep OUT.esp_sa current while a live capture runs.

IKE daemons rekey every hour or so, and MOBIKE moves SAs: a table dumped once at start misses
the SAs that carry the end of the capture. The keeper subscribes to the XFRM monitor *before*
dumping (so nothing slips between dump and subscription), writes the table, and rewrites it
atomically (0600) whenever an SA appears or changes. Deleted SAs stay in the table: packets
captured before the delete still need their keys. Every row comes with its `# ipsec-capture-sa`
line (esp_sa.py), so the table keeps what `ipsec-capture decrypt` needs of every SA, also where
Wireshark has no name for the algorithm. SAs sharing a destination and SPI but not a mark
(Cilium's per-pair inbound states) are kept apart.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any

from .esp_sa import columns_for, warnings_for, write_esp_sa, write_private
from .monitor import XfrmMonitor
from .netlink import dump_states
from .sa import SA


def state_id(sa: SA) -> tuple:
    """An SA's identity in the kernel: (daddr, SPI, proto) and its mark (xfrm_state_lookup)."""
    return (*sa.key_id, sa.mark)


def usable(sa: SA) -> bool:
    """An SA that can carry packets: it has its algorithms and keys. IKE daemons (pluto, charon)
    reserve an inbound SPI first (XFRM_MSG_ALLOCSPI, a larval state without keys, announced to
    nobody) and fill it in with an update once the exchange is done."""
    return sa.aead is not None or sa.enc is not None or sa.auth is not None or sa.comp is not None


class _Counts:
    """SAs that became usable during the capture, each counted once however it got there (a new
    SA, or the update that gave a reserved SPI its keys), and reserved SPIs never given keys."""

    def __init__(self) -> None:
        self.present: set[tuple] = set()  # usable at the start or counted since
        self.reserved: set[tuple] = set()  # seen without keys
        self.new = 0

    def at_start(self, sas: list[SA]) -> None:
        for sa in sas:
            (self.present if usable(sa) else self.reserved).add(state_id(sa))

    def seen(self, sa: SA, kind: str) -> None:
        key = state_id(sa)
        if not usable(sa):
            self.reserved.add(key)
        elif kind in ("sa-new", "sa-update") and key not in self.present:
            self.present.add(key)
            self.new += 1

    def never_keyed(self) -> int:
        return len(self.reserved - self.present)


class KeyFileKeeper:
    """Companion for `start`: `start()` dumps and writes, then follows; `stop()` summarises."""

    name = "keys"

    def __init__(self, path: str | os.PathLike[str], netns: str | None = None,
                 columns: int | str | None = None) -> None:
        self.path = os.fspath(path)
        self.netns = netns
        self.columns = columns_for(columns)
        self._sas: dict[tuple, SA] = {}
        self._lock = threading.Lock()
        self._monitor: XfrmMonitor | None = None
        self._thread: threading.Thread | None = None
        self.rekeys = 0
        self.updates = 0
        self.deletes = 0
        self.writes = 0
        self._warned: set[str] = set()
        self._counts = _Counts()

    def start(self) -> None:
        self._monitor = XfrmMonitor(self.netns)  # subscribe first: no gap before the dump
        for sa in dump_states(self.netns):
            self._sas[state_id(sa)] = sa
        self._counts.at_start(list(self._sas.values()))
        self._write()
        self._thread = threading.Thread(target=self._follow, name="ipsec-capture-keys", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        assert self._monitor is not None
        for note in self._monitor.notifications():
            sa, kind = note.sa, note.event.kind
            if sa is None or kind not in ("sa-new", "sa-update", "sa-delete", "expire"):
                continue
            self._counts.seen(sa, kind)  # (this thread's own: read after join, in stop)
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
        sas = [sa for sa in self._sas.values() if usable(sa)]  # a reserved SPI has no keys to write
        write_private(self.path, write_esp_sa(sas, self.columns))
        self.writes += 1
        for line in warnings_for(sas, self.columns):
            if line not in self._warned:
                self._warned.add(line)
                print(f"ipsec-capture: warning: {line}", file=sys.stderr)

    def retarget(self, path: str | os.PathLike[str]) -> None:
        """Write the table (every SA known so far) to `path` from now on: the next part of a
        rotated capture (capture/rotate.py) gets its own key file."""
        with self._lock:
            self.path = os.fspath(path)
            self._write()

    def stop(self) -> dict[str, Any]:
        if self._monitor is not None:
            self._monitor.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        # reserved SPIs still without keys now: the monitor never announces a reservation (a
        # summary without this count beats no summary, whatever the dump says)
        with contextlib.suppress(Exception):
            self._counts.at_start([sa for sa in dump_states(self.netns) if not usable(sa)])
        with self._lock:
            esp = [sa for sa in self._sas.values() if sa.proto == 50 and usable(sa)]
            return {"path": self.path, "sas_written": len(esp), "rekeys_seen": self._counts.new,
                    "getspi_never_keyed": self._counts.never_keyed(),
                    "updates_seen": self.updates, "deletes_seen": self.deletes, "writes": self.writes,
                    "columns": self.columns}
