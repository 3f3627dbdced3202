"""The JSON report: the analysis dict as it is (schema "ipsec-capture-report" version 1; fields are
only ever added), several captures and their peer joins in one document."""

from __future__ import annotations

import json
from typing import Any

from .analysis import SCHEMA, SCHEMA_VERSION


def document(reports: list[dict[str, Any]], peers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schema": SCHEMA, "version": SCHEMA_VERSION, "reports": reports, "peers": peers}


def render(reports: list[dict[str, Any]], peers: list[dict[str, Any]]) -> str:
    return json.dumps(document(reports, peers), indent=2, sort_keys=True) + "\n"
