"""Gather a :class:`ClusterState` from every node at once.

Each node is polled in its own worker with its own timeouts, so one node that hangs delays the
result by at most one timeout and never stalls the others. Model metadata (``/api/show``) does
not change for a given digest, so it is asked once per digest and cached across cycles.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from types import MappingProxyType

from gpu_router.config import Config, NodeConfig
from gpu_router.gpus import GpuSource, make_gpu_source
from gpu_router.ollama import OllamaClient, OllamaError
from gpu_router.state import (
    ClusterState,
    GpuReading,
    LoadedModel,
    ModelInfo,
    NodeState,
    NodeStatus,
    VramSource,
)

log = logging.getLogger(__name__)

ClientFactory = Callable[[NodeConfig, float], OllamaClient]
GpuSourceFactory = Callable[[NodeConfig, float], GpuSource]


def _client(node: NodeConfig, timeout_s: float) -> OllamaClient:
    return OllamaClient(node.name, node.url, timeout_s=timeout_s, headers=node.headers)


class Observer:
    """Polls a fixed set of nodes; build a new one when the config changes."""

    def __init__(
        self,
        config: Config,
        *,
        client_factory: ClientFactory = _client,
        gpu_source_factory: GpuSourceFactory = make_gpu_source,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.config = config
        self._clock = clock
        timeout = config.request_timeout_s
        self.clients = {n.name: client_factory(n, timeout) for n in config.nodes}
        self.gpu_sources = {n.name: gpu_source_factory(n, timeout) for n in config.nodes}
        # Two tasks per node (Ollama, GPU source) so a slow exporter never delays /api/ps.
        self._pool = ThreadPoolExecutor(
            max_workers=min(128, 2 * len(config.nodes) + 2), thread_name_prefix="observe"
        )
        self._info: dict[tuple[str, str], ModelInfo] = {}
        self._info_lock = threading.Lock()
        self._last_status: dict[str, NodeStatus] = {}
        # Asked once per node and again only after the node was unreachable (it may have been
        # upgraded meanwhile): a third fewer requests in every idle cycle.
        self._versions: dict[str, str] = {}

    def close(self) -> None:
        """Stop the workers and close every connection."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        for c in self.clients.values():
            c.close()
        for g in self.gpu_sources.values():
            g.close()

    def observe(self) -> ClusterState:
        """Poll every node and GPU source concurrently; never raises for a node's failure."""
        ollama: dict[str, Future[NodeState]] = {
            n.name: self._pool.submit(self._poll_node, n) for n in self.config.nodes
        }
        gpus: dict[str, Future[GpuReading]] = {
            n.name: self._pool.submit(self._read_gpu, n.name) for n in self.config.nodes
        }
        nodes = [replace(ollama[n.name].result(), gpu=gpus[n.name].result()) for n in self.config.nodes]
        nodes = self._attach_info(nodes)
        for n in nodes:
            self._log_transition(n)
        return ClusterState(tuple(nodes), observed_at=self._clock())

    def watch(self) -> dict[str, tuple[LoadedModel, ...] | OllamaError]:
        """Only ``/api/ps`` of every node: the cheap check run between full reconciles."""
        futures = {name: self._pool.submit(c.ps) for name, c in self.clients.items()}
        out: dict[str, tuple[LoadedModel, ...] | OllamaError] = {}
        for name, fut in futures.items():
            try:
                out[name] = fut.result()
            except OllamaError as exc:
                out[name] = exc
        return out

    def _read_gpu(self, name: str) -> GpuReading:
        try:
            return self.gpu_sources[name].read()
        except Exception as exc:  # noqa: BLE001 - a source bug must not take the node down with it
            log.warning("node %s: GPU source failed: %s", name, exc)
            return GpuReading(VramSource.UNKNOWN, (), error=f"GPU source failed: {exc}")

    def _poll_node(self, node: NodeConfig) -> NodeState:
        client = self.clients[node.name]
        start = time.monotonic()
        try:
            # /api/ps first: if it fails the node is down or broken and the rest is not asked.
            loaded = client.ps()
            installed = client.tags()
            version = self._versions.get(node.name)
            if version is None:
                version = self._versions[node.name] = client.version()
        except OllamaError as exc:
            self._versions.pop(node.name, None)
            return NodeState(
                node.name,
                node.url,
                exc.status,
                error=exc.message,
                poll_s=time.monotonic() - start,
            )
        return NodeState(
            node.name,
            node.url,
            NodeStatus.UP,
            version=version,
            loaded=loaded,
            installed=installed,
            poll_s=time.monotonic() - start,
        )

    def _attach_info(self, nodes: list[NodeState]) -> list[NodeState]:
        """Ask ``/api/show`` once per model digest, from one node that has it, in parallel."""
        wanted: dict[tuple[str, str], str] = {}
        for n in nodes:
            if not n.up:
                continue
            for key in n.model_digests().items():
                if key not in self._info and key not in wanted:
                    wanted[key] = n.name
        futures = {key: self._pool.submit(self._show, node, key[0]) for key, node in wanted.items()}
        for key, fut in futures.items():
            shown = fut.result()
            if shown is not None:
                with self._info_lock:
                    self._info[key] = shown
        out = []
        for n in nodes:
            if not n.up:
                out.append(n)
                continue
            infos: dict[str, ModelInfo] = {}
            for key in n.model_digests().items():
                found = self._info.get(key)
                if found is not None:
                    infos[key[0]] = found
            out.append(replace(n, info=MappingProxyType(infos)))
        return out

    def _show(self, node: str, model: str) -> ModelInfo | None:
        try:
            return self.clients[node].show(model)
        except OllamaError as exc:
            # Sizing falls back to the file size; the next cycle asks again.
            log.warning("node %s: /api/show %s failed: %s", node, model, exc.message)
            return None

    def _log_transition(self, node: NodeState) -> None:
        before = self._last_status.get(node.name)
        self._last_status[node.name] = node.status
        if before == node.status:
            return
        if node.up:
            if before is not None:
                log.info("node %s is up again", node.name)
        else:
            log.warning("node %s is %s: %s", node.name, node.status.value, node.error)


def observe_once(config: Config, **kwargs: object) -> ClusterState:
    """Observe the cluster one time and release every resource."""
    observer = Observer(config, **kwargs)  # type: ignore[arg-type]
    try:
        return observer.observe()
    finally:
        observer.close()
