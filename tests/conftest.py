"""Shared fixtures: root checks and test hosts in network namespaces."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.netlab import NetnsPair

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`long` tests run only when asked for by name (-m long): `-m "not lab"` must stay fast."""
    if "long" in (config.getoption("markexpr") or ""):
        return
    keep = [item for item in items if item.get_closest_marker("long") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("long")])
        items[:] = keep

requires_root = pytest.mark.skipif(
    not IS_ROOT, reason="needs root for network namespaces and netfilter (CI runs as root)"
)


def require_tool(name: str) -> str:
    """Path of a system tool the test needs; a missing one fails loudly (dev.sh installs them)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run ./dev.sh setup")
    return path


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    """Two namespaces joined by a veth pair, removed after the test whatever happens."""
    if not IS_ROOT:
        pytest.skip("needs root to create network namespaces")
    pair = NetnsPair.create()
    try:
        yield pair
    finally:
        pair.destroy()
