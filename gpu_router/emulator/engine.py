"""The daemon's VRAM engine (``gpu_router.memory``) as the emulator's source of memory figures.

Both sides then use the same port of Ollama's formulas: the emulator reads its own ``/api/show``
body with the daemon's parser (``gpu_router.ollama.parse_show``) and asks the engine what this
node's Ollama needs, with the context and parallel slots the emulated scheduler chose. Pure; the
answers are cached per (model, node facts, context, slots).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from gpu_router.emulator.catalogue import ModelSpec, show_parameters
from gpu_router.memory import (
    ClassicInputs,
    EnvValueError,
    MemoryEstimate,
    NodeProfile,
    classic_inputs,
    estimate_memory,
    parse_ollama_env,
)
from gpu_router.memory.env import SIZING_KEYS
from gpu_router.ollama import BadResponse, parse_show
from gpu_router.records import record
from gpu_router.state import ModelInfo


@record
class NodeFacts:
    """What the engine needs to know about a node, hashable for the cache."""

    version: str
    gpu_total_bytes: tuple[int, ...]
    env: tuple[tuple[str, str], ...]  # the OLLAMA_* settings the engine reads

    @classmethod
    def of(cls, version: str, gpu_total_bytes: tuple[int, ...], env: Mapping[str, object]) -> NodeFacts:
        """Keep only the settings that size models; values as strings, sorted."""
        items = tuple(sorted((k, str(v).lower() if isinstance(v, bool) else str(v)) for k, v in env.items()))
        return cls(version, gpu_total_bytes, tuple((k, v) for k, v in items if k in SIZING_KEYS))


@record
class EngineView:
    """The engine's answer for one model on one node at one context and slot count."""

    estimate: MemoryEstimate
    classic: ClassicInputs | None  # estimateGPULayers' inputs, for the classic era's placements


def show_body(spec: ModelSpec) -> dict[str, object]:
    """The parts of the emulator's ``/api/show`` body that the daemon's parser reads."""
    body: dict[str, object] = {
        "model_info": spec.model_info(),
        "capabilities": list(spec.capabilities),
        "parameters": show_parameters(spec),
        "details": {"family": spec.family, "families": list(spec.families)},
        "tensors": [t.as_json() for t in spec.tensors],
    }
    projector = spec.projector_info()
    if projector:
        body["projector_info"] = projector
    if spec.is_cloud:
        body["remote_model"], body["remote_host"] = spec.remote_model, spec.remote_host
    return body


@functools.lru_cache(maxsize=256)
def model_info(spec: ModelSpec) -> ModelInfo | None:
    """The emulator's own model as the daemon reads it from ``/api/show``."""
    try:
        return parse_show(show_body(spec), spec.name, "emulator")
    except BadResponse:
        return None


@functools.lru_cache(maxsize=4096)
def engine_view(spec: ModelSpec, node: NodeFacts, num_ctx: int, num_parallel: int) -> EngineView | None:
    """The engine's estimate for ``spec``; None when it cannot size the model (thin metadata).

    ``num_parallel`` is passed as OLLAMA_NUM_PARALLEL so the engine sizes the slots the emulated
    scheduler chose (before v0.10.0 it tries several).
    """
    info = model_info(spec)
    if info is None:
        return None
    settings = {**dict(node.env), "OLLAMA_NUM_PARALLEL": str(num_parallel)}
    try:
        env = parse_ollama_env(settings)
    except EnvValueError:
        return None
    profile = NodeProfile(node.version, node.gpu_total_bytes, env)
    estimate = estimate_memory(info, spec.file_size_bytes, profile, num_ctx=num_ctx)
    if estimate is None:
        return None
    inputs = classic_inputs(info, spec.file_size_bytes, profile, num_ctx=num_ctx)
    return EngineView(estimate, inputs)
