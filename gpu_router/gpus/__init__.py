"""Where each node's GPU memory figures come from: NVML, a Prometheus exporter, the config, or nowhere.

Every source's :meth:`GpuSource.read` returns a :class:`~gpu_router.state.GpuReading` and never raises for an
I/O or driver problem; a failed read is ``GpuReading(VramSource.UNKNOWN, (), error=...)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol
from urllib.parse import urlsplit

from gpu_router.config import NodeConfig
from gpu_router.gpus.exporter import ExporterSource
from gpu_router.gpus.nvml import NvmlSource
from gpu_router.gpus.static import NoGpuSource, StaticSource, UnknownSource
from gpu_router.hostinfo import is_local_host
from gpu_router.state import GpuReading, VramSource

__all__ = [
    "REMOTE_AUTO_ERROR",
    "ExporterSource",
    "GpuSource",
    "NoGpuSource",
    "NvmlSource",
    "StaticSource",
    "UnknownSource",
    "make_gpu_source",
]

log = logging.getLogger(__name__)

REMOTE_AUTO_ERROR = "no GPU source configured for remote node; set gpu: {exporter: URL} or {vram_mb: [...]}"


class GpuSource(Protocol):
    """Something that can tell a node's GPU memory."""

    @property
    def kind(self) -> VramSource:
        """What a successful reading's ``source`` will be."""
        ...

    def read(self) -> GpuReading:
        """One reading; never raises for an I/O or driver problem (the reading carries ``error``)."""
        ...

    def close(self) -> None:
        """Release sessions and libraries."""
        ...


def make_gpu_source(
    node: NodeConfig,
    timeout_s: float,
    *,
    nvml_factory: Callable[[], GpuSource] = NvmlSource,
    is_local: Callable[[str], bool] = is_local_host,
) -> GpuSource:
    """The GPU source a node's ``gpu:`` setting asks for.

    ``auto`` uses NVML when the node's URL points at this machine and otherwise gives an
    :class:`UnknownSource` that says how to configure one: an unknown node is not a node without GPUs.
    """
    spec = node.gpu
    if spec.kind == "nvml":
        return nvml_factory()
    if spec.kind == "exporter":
        if not spec.exporter_url:
            return UnknownSource("gpu kind is exporter but no exporter URL is configured")
        return ExporterSource(spec.exporter_url, timeout_s)
    if spec.kind == "static":
        return StaticSource(spec.vram_bytes)
    if spec.kind == "none":
        return NoGpuSource()
    # auto
    try:
        host = urlsplit(node.url).hostname
    except ValueError:
        host = None
    if not host:
        return UnknownSource(f"cannot tell the host of node url {node.url!r}; set gpu: explicitly")
    if is_local(host):
        log.debug("node %s is on this machine: reading its GPUs through NVML", node.name)
        return nvml_factory()
    return UnknownSource(REMOTE_AUTO_ERROR)
