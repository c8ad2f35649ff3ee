"""Where each node's GPU figures come from: NVML, AMD sysfs, a Prometheus exporter, the config, or nowhere.

Every source's :meth:`GpuSource.read` returns a :class:`~gpu_router.state.GpuReading` and never raises for an
I/O or driver problem; a failed read is ``GpuReading(VramSource.UNKNOWN, (), error=...)``. The kinds a
config may ask for are the rows of :data:`~gpu_router.gpus.kinds.GPU_SOURCE_KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from gpu_router.enums import VramSource
from gpu_router.gpus.kinds import AUTO, GPU_SOURCE_KINDS, Builder, kind_named

if TYPE_CHECKING:
    from gpu_router.config import NodeConfig
    from gpu_router.gpus.amd_sysfs import AmdSysfsSource
    from gpu_router.gpus.exporter import ExporterSource
    from gpu_router.gpus.nvml import NvmlSource
    from gpu_router.gpus.static import NoGpuSource, StaticSource, UnknownSource
    from gpu_router.state import GpuReading

# The sources that need an HTTP client, NVML or sysfs are loaded on first use (PEP 562), so that
# importing this package (config validation does, through kinds) stays cheap.
# The static sources load the record classes: not needed to check a config either.
_LAZY = {
    "AmdSysfsSource": "gpu_router.gpus.amd_sysfs",
    "ExporterSource": "gpu_router.gpus.exporter",
    "NvmlSource": "gpu_router.gpus.nvml",
    "NoGpuSource": "gpu_router.gpus.static",
    "StaticSource": "gpu_router.gpus.static",
    "UnknownSource": "gpu_router.gpus.static",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "REMOTE_AUTO_ERROR",
    "AmdSysfsSource",
    "AutoSource",
    "ExporterSource",
    "GpuSource",
    "NoGpuSource",
    "NvmlSource",
    "StaticSource",
    "UnknownSource",
    "make_gpu_source",
]


def _log() -> Any:
    # logging (and threading) load when a source is built, not when config validation imports kinds.
    import logging

    return logging.getLogger(__name__)


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


class AutoSource:
    """``gpu: auto`` on this machine: the first local kind that finds a GPU, kept from then on.

    ``candidates`` are ``(kind name, source)`` in table order (NVML, then AMD sysfs). Until one of them
    reads a GPU every read asks each in turn (NVML throttles its own re-initialisation), so a driver
    loaded after the daemon started is still found; the failed reading says what each one answered.
    Once a kind has found GPUs it is used alone, and its later failures are its own to report.
    """

    def __init__(self, candidates: list[tuple[str, GpuSource]]) -> None:
        self._candidates = candidates
        self._chosen: GpuSource | None = None
        import threading

        self._lock = threading.Lock()

    @property
    def kind(self) -> VramSource:
        """The chosen kind's source; UNKNOWN until one found a GPU."""
        return self._chosen.kind if self._chosen is not None else VramSource.UNKNOWN

    def read(self) -> GpuReading:
        """The chosen source's reading, or the first candidate's that finds a GPU."""
        with self._lock:
            if self._chosen is not None:
                return self._chosen.read()
            errors: list[str] = []
            for name, source in self._candidates:
                reading = source.read()
                if reading.gpus:
                    self._choose(name, source)
                    return reading
                errors.append(reading.error or f"{name}: no GPU")
            from gpu_router.state import GpuReading

            return GpuReading(
                VramSource.UNKNOWN, (), error="no GPU found on this machine: " + "; ".join(errors)
            )

    def close(self) -> None:
        """Close every candidate."""
        with self._lock:
            for _, source in self._candidates:
                source.close()

    def _choose(self, name: str, source: GpuSource) -> None:
        _log().info("gpu: auto found GPUs through %s", name)
        self._chosen = source
        for _, other in self._candidates:
            if other is not source:
                other.close()
        self._candidates = [(name, source)]


def make_gpu_source(
    node: NodeConfig,
    timeout_s: float,
    *,
    builders: Mapping[str, Builder] | None = None,
    is_local: Callable[[str], bool] | None = None,
) -> GpuSource:
    """The GPU source a node's ``gpu:`` setting asks for.

    ``builders`` replaces the table's builder of the kinds it names (tests pass fakes). ``auto`` tries the
    table's local kinds when the node's URL points at this machine and otherwise gives an
    :class:`UnknownSource` that says how to configure one: an unknown node is not a node without GPUs.
    """
    from gpu_router.gpus.static import UnknownSource

    spec = node.gpu

    def build(name: str) -> GpuSource:
        kind = kind_named(name)
        if kind is None:
            return UnknownSource(f"unknown GPU source kind {name!r}")
        builder = (builders or {}).get(name, kind.build)
        return builder(spec, timeout_s)

    if spec.kind != AUTO:
        return build(spec.kind)
    try:
        host = urlsplit(node.url).hostname
    except ValueError:
        host = None
    if not host:
        return UnknownSource(f"cannot tell the host of node url {node.url!r}; set gpu: explicitly")
    if is_local is None:
        from gpu_router.hostinfo import is_local_host

        is_local = is_local_host
    if is_local(host):
        local = [k.name for k in GPU_SOURCE_KINDS if k.local]
        _log().debug(
            "node %s is on this machine: looking for its GPUs through %s", node.name, ", ".join(local)
        )
        return AutoSource([(name, build(name)) for name in local])
    return UnknownSource(REMOTE_AUTO_ERROR)
