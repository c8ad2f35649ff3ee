"""``gpu-router explain MODEL``: how much VRAM a model needs on each node, and why. Pure.

Built from one observation and its plan: per node, the context Ollama will use and the reason,
the parts of the need (weights, KV cache, graph, projector, reserve, buffer), what ``/api/ps``
will show, Ollama's own pre-load check (v0.30+), the total against usable and free VRAM, the
engine era and version, and where the figure came from (observed, learned, estimated, file).
"""

from __future__ import annotations

from typing import Any

from gpu_router.memory import preload_check_passes
from gpu_router.planner import ModelPlan, Plan
from gpu_router.records import record
from gpu_router.state import ClusterState


@record
class NodeExplanation:
    """One node's answer for one model."""

    node: str
    status: str
    version: str | None
    era: str | None
    engine: str | None
    source: str  # observed / learned / estimated / file / given / cloud / unknown
    source_detail: str
    context_length: int | None  # what the memory is sized for (per slot)
    ps_context_length: int | None  # what /api/ps will show (older versions show the requested num_ctx)
    context_reason: str
    num_parallel: int | None
    parallel_reason: str
    kv_cache_type: str | None
    flash_attention: bool | None
    weights_bytes: int | None
    kv_bytes: int | None
    graph_bytes: int | None
    projector_bytes: int | None
    reserve_bytes: int | None
    buffer_bytes: int | None
    need_bytes: int | None
    ps_size_bytes: int | None
    preload_bytes: int | None
    preload_passes: bool | None  # None: no such check in this era, or nothing to check against
    usable_bytes: int | None
    free_bytes: int | None
    actual_free_bytes: int | None  # total minus used, as Ollama's own check sees it
    verdict: str
    reason: str
    notes: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return dict(self.__dict__)


def explain(state: ClusterState, plan: Plan, model: str, node: str | None = None) -> list[NodeExplanation]:
    """One explanation per node (or only ``node``), in config order; empty when the model is unknown."""
    mp = plan.model(model)
    if mp is None:
        return []
    caps = {c.node: c for c in plan.nodes}
    fits = {f.node: f for f in mp.fits}
    out = []
    for n in state.nodes:
        if node is not None and n.name != node:
            continue
        out.append(_one(n.name, n.status.value, n.version, mp, caps.get(n.name), fits.get(n.name)))
    return out


def _one(name: str, status: str, version: str | None, mp: ModelPlan, cap: Any, fit: Any) -> NodeExplanation:
    need = mp.need_on(name)
    m = need.memory
    usable = cap.usable_bytes if cap is not None and cap.known else None
    free = cap.free_bytes if cap is not None and cap.known else None
    actual = None
    if cap is not None and cap.known and cap.gpus:
        actual = max((g.total_bytes - g.used_bytes for g in cap.gpus if g.healthy), default=None)
    preload = m.preload_bytes if m is not None else None
    passes = None
    if m is not None and preload is not None and actual is not None:
        passes = preload_check_passes(m, actual)
    return NodeExplanation(
        node=name,
        status=status,
        version=version,
        era=m.era.value if m is not None else need.era,
        engine=m.engine if m is not None else None,
        source=need.source.value,
        source_detail=need.detail,
        context_length=m.context_length if m is not None else need.context_length,
        ps_context_length=need.context_length,
        context_reason=m.context_reason if m is not None else "",
        num_parallel=m.num_parallel if m is not None else None,
        parallel_reason=m.parallel_reason if m is not None else "",
        kv_cache_type=m.kv_cache_type if m is not None else None,
        flash_attention=m.flash_attention if m is not None else None,
        weights_bytes=m.weights_bytes if m is not None else None,
        kv_bytes=m.kv_bytes if m is not None else None,
        graph_bytes=m.graph_bytes if m is not None else None,
        projector_bytes=m.projector_bytes if m is not None else None,
        reserve_bytes=m.reserve_bytes if m is not None else None,
        buffer_bytes=m.buffer_bytes if m is not None else None,
        need_bytes=need.need_bytes,
        ps_size_bytes=m.ps_size_bytes if m is not None else None,
        preload_bytes=preload,
        preload_passes=passes,
        usable_bytes=usable,
        free_bytes=free,
        actual_free_bytes=actual,
        verdict=fit.verdict.value if fit is not None else "",
        reason=fit.reason if fit is not None else "",
        notes=m.notes if m is not None else (),
    )
