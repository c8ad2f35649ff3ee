"""Small builders for ClusterState in planner and report tests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import MappingProxyType

from gpu_router.config import Config, GpuSpec, NodeConfig, PriorityModel
from gpu_router.state import (
    GIB,
    ClusterState,
    Gpu,
    GpuReading,
    InstalledModel,
    LoadedModel,
    ModelInfo,
    NodeState,
    NodeStatus,
    VramSource,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
FOREVER = NOW + timedelta(days=365 * 292)


def gib(x: float) -> int:
    return int(x * GIB)


def loaded(
    name: str,
    size_gib: float,
    vram_gib: float | None = None,
    *,
    pinned: bool = False,
    expires_in_s: float = 300,
) -> LoadedModel:
    size = gib(size_gib)
    vram = size if vram_gib is None else gib(vram_gib)
    expires = FOREVER if pinned else NOW + timedelta(seconds=expires_in_s)
    return LoadedModel(name, size, vram, expires_at=expires)


def node(
    name: str,
    gpus_gib: tuple[float, ...] | None = (8,),
    *,
    installed: dict[str, float] | None = None,
    loaded_models: tuple[LoadedModel, ...] = (),
    used_gib: tuple[float, ...] | None = None,
    status: NodeStatus = NodeStatus.UP,
    source: VramSource | None = None,
    info: dict[str, ModelInfo] | None = None,
    error: str | None = None,
) -> NodeState:
    """A node; ``gpus_gib=None`` is CPU-only, ``()`` with source UNKNOWN is VRAM unknown.

    Used memory defaults to what the loaded models take, all on GPU 0 onwards.
    """
    if gpus_gib is None:
        reading = GpuReading(VramSource.NONE)
    elif source is VramSource.UNKNOWN:
        reading = GpuReading(VramSource.UNKNOWN, (), error="no GPU source configured")
    elif source is VramSource.STATIC:
        reading = GpuReading(
            VramSource.STATIC, tuple(Gpu(i, "static", gib(t)) for i, t in enumerate(gpus_gib))
        )
    else:
        resident = sum(m.vram_bytes for m in loaded_models)
        gpus = []
        for i, t in enumerate(gpus_gib):
            if used_gib is not None:
                used = gib(used_gib[i])
            else:
                used = min(resident, gib(t))
                resident -= used
            gpus.append(Gpu(i, f"GPU{i}", gib(t), used, gib(t) - used))
        reading = GpuReading(VramSource.NVML, tuple(gpus))
    inst = {m.name: m.size_bytes for m in loaded_models}
    inst.update({k: gib(v) for k, v in (installed or {}).items()})
    return NodeState(
        name,
        f"http://{name}:11434",
        status,
        error=error if status is not NodeStatus.UP else None,
        gpu=reading,
        loaded=loaded_models,
        installed=tuple(InstalledModel(k, v) for k, v in inst.items()),
        info=MappingProxyType(info or {}),
    )


def cluster(*nodes: NodeState) -> ClusterState:
    return ClusterState(tuple(nodes), observed_at=NOW)


def config(*priority: str | PriorityModel, nodes: tuple[str, ...] = (), **kw: object) -> Config:
    pms = tuple(p if isinstance(p, PriorityModel) else PriorityModel(p) for p in priority)
    return Config(
        nodes=tuple(NodeConfig(n, f"http://{n}:11434", GpuSpec()) for n in nodes),
        priority_models=pms,
        **kw,  # type: ignore[arg-type]
    )


def needs(**sizes_gib: float) -> dict[str, int]:
    """Fixed needs, so tests control a model's need exactly (names use __ for ':')."""
    return {k.replace("__", ":"): gib(v) for k, v in sizes_gib.items()}
