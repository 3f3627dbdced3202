"""The notebook API: load a bundle, iterate its joined packets, get tables.

    from .api import load
    b = load("out.pcapng")                 # finds out.events.jsonl and out.esp_sa beside it
    for p in b.packets():                  # streamed: correlate.packet.Packet
        print(p.spi, p.seq, p.verdict, p.cause, p.evidence)
        p.scapy(b).inner.show()            # scapy objects, decrypted with the bundle's keys
    b.table("sa"); b.table("drops"); b.table("packets")

Tables are lists of dicts, or pandas DataFrames when pandas is installed (`frame=False` forces
lists); pandas is never required.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from ipsec_capture.decrypt.decoder import EspDecoder
from ipsec_capture.errors import UserError
from ipsec_capture.wire import SECOND

from .analysis import Analysis, analyse, joined
from .bundle import Inputs, open_bundle
from .packet import Packet
from .peer import join_peers
from .summary import ReportFilter

TABLES = ("sa", "packets", "drops", "incidents", "sa_history", "timeline")


class LoadedBundle:
    """One capture bundle; every method re-reads the files (nothing is held per packet)."""

    def __init__(self, inputs: Inputs, window_s: float = 3.0) -> None:
        self.inputs = inputs
        self.window_ns = int(window_s * SECOND)
        self._analysis: Analysis | None = None
        self._decoder: EspDecoder | None = None

    @property
    def decoder(self) -> EspDecoder:
        """Our ESP decoder with the bundle's keys (built once), for `Packet.scapy(bundle)`."""
        if self._decoder is None:
            self._decoder = EspDecoder(self.inputs.sas)
        return self._decoder

    @property
    def missing(self) -> list[str]:
        return list(self.inputs.missing)

    def packets(self) -> Iterator[Packet]:
        """Joined, diagnosed packets in capture order (one streaming pass per call)."""
        _joiner, it = joined(self.inputs, self.window_ns)
        return it

    def analysis(self) -> Analysis:
        """The full analysis (every packet listed), computed once."""
        if self._analysis is None:
            self._analysis = analyse(self.inputs, ReportFilter(), packet_limit=0, window_ns=self.window_ns)
        return self._analysis

    def report(self) -> dict[str, Any]:
        """The JSON report's dict for this bundle."""
        return self.analysis().to_dict()

    def table(self, name: str, frame: bool = True) -> Any:
        d = self.report()
        rows: list[dict[str, Any]]
        if name == "sa":
            rows = d["sas"]
        elif name == "packets":
            rows = d["packets"]["rows"]
        elif name in ("drops", "incidents", "sa_history", "timeline"):
            rows = d[name]
        else:
            raise UserError(f"unknown table {name!r}: choose from {', '.join(TABLES)}")
        if frame:
            try:
                import pandas
            except ImportError:
                return rows
            return pandas.DataFrame(rows)
        return rows

    def peer(self, other: LoadedBundle) -> dict[str, Any]:
        """Join with the bundle from the tunnel's other end by (SPI, seq)."""
        return join_peers(self.inputs.name, self.packets(), other.inputs.name, other.packets())


def load(capture: str | os.PathLike[str], events: str | os.PathLike[str] | None = None,
         keys: str | os.PathLike[str] | None = None, window_s: float = 3.0) -> LoadedBundle:
    return LoadedBundle(open_bundle(capture, events, keys), window_s)
