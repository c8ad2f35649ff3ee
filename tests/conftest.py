"""Fixtures shared by the daemon tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from daemon_helpers import MakeNode

from gpu_router.emulator import EmulatedNode


@pytest.fixture
def make_node() -> Iterator[MakeNode]:
    """Start emulated nodes (with a dcgm-exporter endpoint) and stop them all at the end."""
    nodes: list[EmulatedNode] = []

    def make(
        name: str, gpus_mib: tuple[int, ...] = (8192,), models: tuple[str, ...] = (), **kw: Any
    ) -> EmulatedNode:
        node = EmulatedNode(name, gpus_mib, models, metrics=bool(gpus_mib), **kw)
        nodes.append(node)
        node.start()
        return node

    yield make
    for n in nodes:
        n.stop()
