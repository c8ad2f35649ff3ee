"""An emulated GPU health fault takes that GPU out of placement; priority models on it fail over."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import WAIT_S, MakeNode, load_requests, pinned_on_gpu, write_config

from gpu_router.config import load_config
from gpu_router.daemon import Daemon
from gpu_router.emulator import EmulatedNode
from gpu_router.planner import Verdict
from gpu_router.systemd import Notifier

LLAMA32 = "llama3.2:latest"
EMBED = "nomic-embed-text:latest"


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def make(nodes: list[EmulatedNode], priority: list[Any], **settings: Any) -> Daemon:
        path = write_config(tmp_path / "config.yaml", nodes, priority, tmp_path / "state", **settings)
        d = Daemon(load_config(path), notifier=Notifier(environ={}))
        daemons.append(d)
        return d

    yield make
    for d in daemons:
        d.executor.stop(0)
        d.observer.close()


def settle(daemon: Daemon) -> None:
    daemon.reconcile()
    assert daemon.executor.wait_idle(WAIT_S)
    daemon.collect_results()


def test_an_xid_error_fails_the_model_over_and_the_gpu_gets_nothing_new(
    make_node: MakeNode, make_daemon: Callable[..., Daemon]
) -> None:
    a = make_node("gpu-a", (8192,), (LLAMA32, EMBED))
    b = make_node("gpu-b", (8192,), (LLAMA32, EMBED))
    daemon = make_daemon([a, b], [LLAMA32])
    settle(daemon)
    assert pinned_on_gpu(a, LLAMA32)
    # dcgm-exporter reports XID 79 (fallen off the bus) on gpu-a's only GPU from now on: new since
    # the last scrape, so the GPU is unhealthy.
    loads_on_a = len(load_requests(a))
    a.raise_xid(0, 79)
    settle(daemon)
    state = daemon.telemetry.snapshot.state
    assert state is not None
    (gpu,) = state.node("gpu-a").gpu.gpus  # type: ignore[union-attr]
    assert gpu.healthy is False
    assert "79" in gpu.health_reason
    assert pinned_on_gpu(b, LLAMA32), "the priority model did not fail over off the sick GPU"
    p = daemon.telemetry.snapshot.every_model
    assert p is not None
    fits = {f.node: f for f in p.model(LLAMA32).fits}  # type: ignore[union-attr]
    assert fits["gpu-a"].verdict is Verdict.GPU_UNHEALTHY
    assert "XID" in fits["gpu-a"].reason or "79" in fits["gpu-a"].reason
    # Nothing new goes to the sick GPU either: every other model is judged unplaceable there.
    embed = {f.node: f.verdict for f in p.model(EMBED).fits}  # type: ignore[union-attr]
    assert embed == {"gpu-a": Verdict.GPU_UNHEALTHY, "gpu-b": Verdict.FITS}
    assert len(load_requests(a)) == loads_on_a, "a load was sent to the node with the sick GPU"
