"""The JSON report: the analysis dict as it is (schema "ipsec-capture-report" version 1; fields are
only ever added), several captures and their peer joins in one document."""

from __future__ import annotations

import json
from typing import Any

from .analysis import SCHEMA, SCHEMA_VERSION


def document(reports: list[dict[str, Any]], peers: list[dict[str, Any]],
             fleet: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = {"schema": SCHEMA, "version": SCHEMA_VERSION, "reports": reports, "peers": peers}
    if fleet is not None:  # three bundles or more: the N-node join (correlate/peer.py join_fleet)
        doc["fleet"] = fleet
    return doc


def render(reports: list[dict[str, Any]], peers: list[dict[str, Any]],
           fleet: dict[str, Any] | None = None) -> str:
    return json.dumps(document(reports, peers, fleet), indent=2, sort_keys=True) + "\n"
