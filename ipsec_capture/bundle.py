"""One capture, one stem: out.pcapng, out.events.jsonl, out.esp_sa.

`report` and `decrypt` find a capture's companions from its name, so the bundle can be copied to
any machine and analysed there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CAPTURE_SUFFIXES = (".pcapng", ".pcap", ".cap")


@dataclass(frozen=True, slots=True)
class Bundle:
    capture: Path
    events: Path
    keys: Path

    @classmethod
    def for_capture(cls, capture: str | Path) -> Bundle:
        p = Path(capture)
        stem = p.with_suffix("") if p.suffix in CAPTURE_SUFFIXES else p
        return cls(capture=p, events=Path(f"{stem}.events.jsonl"), keys=Path(f"{stem}.esp_sa"))
