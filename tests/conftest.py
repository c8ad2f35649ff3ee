"""Fixtures shared by the tests: emulated nodes, daemons, raw HTTP servers and transport clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import MakeDaemon, MakeNode, write_config
from rawserver import RawServer, Serve, closed_after

from gpu_router.config import load_config
from gpu_router.daemon import Daemon
from gpu_router.emulator import EmulatedNode
from gpu_router.systemd import Notifier
from gpu_router.transport import HttpClient, ProxyConfig


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


@pytest.fixture
def make_daemon(make_node: MakeNode, tmp_path: Path) -> Iterator[MakeDaemon]:
    """Write a config for the given nodes and build a Daemon on it; closed at the end, before the nodes."""
    daemons: list[Daemon] = []

    def make(
        nodes: list[EmulatedNode],
        priority: list[Any],
        *,
        dry_run: bool = False,
        clock: Callable[[], float] | None = None,
        notifier: Notifier | None = None,
        **settings: Any,
    ) -> Daemon:
        path = write_config(tmp_path / "config.yaml", nodes, priority, tmp_path / "state", **settings)
        kwargs: dict[str, Any] = {"notifier": notifier or Notifier(environ={}), "dry_run": dry_run}
        if clock is not None:
            kwargs["clock"] = clock
        daemon = Daemon(load_config(path), **kwargs)
        daemons.append(daemon)
        return daemon

    yield make
    for d in daemons:
        d.pulls.stop(2.0)
        d.executor.stop(0)
        d.observer.close()


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start raw HTTP servers (``RawServer``) with a connection handler; all closed at the end."""
    yield from closed_after(RawServer)


@pytest.fixture
def clients() -> Iterator[Callable[..., HttpClient]]:
    """Make HttpClients (never with the developer's own proxy settings); all closed at the end."""

    def build(url: str, **kw: Any) -> HttpClient:
        kw.setdefault("proxies", ProxyConfig())
        return HttpClient(url, **kw)

    yield from closed_after(build)
