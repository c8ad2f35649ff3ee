"""How much VRAM a model needs to sit fully on one GPU. Pure functions.

Sources, best first: what ``/api/ps`` showed for the model fully on GPU (now, or learned before);
an estimate from ``/api/show`` metadata with Ollama's classic formula; the file size with a stated
overhead; unknown. Every figure carries its source so the report can show how sure it is.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from gpu_router.state import MIB, ClusterState, ModelInfo, Processor

# Ollama reserves this much per GPU before placing any layer (ml/device.go MinimumMemory, CUDA/ROCm).
GPU_MINIMUM_BYTES = 457 * MIB
# Without metadata, weights are the file; KV cache, graph and buffers are taken as 20% more.
FILE_OVERHEAD_RATIO = 1.2
# Ollama's default micro-batch; the graph scales with min(num_batch, num_ctx).
NUM_BATCH = 512


class SizeSource(str, enum.Enum):
    """How a size figure was obtained, most trustworthy first."""

    GIVEN = "given"  # fixed by the caller
    OBSERVED = "observed"
    ESTIMATED = "estimated"
    FILE = "file"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class SizeEstimate:
    """VRAM a model needs, where that figure came from, and how it was made up."""

    need_bytes: int | None
    source: SizeSource
    detail: str = ""
    context_length: int | None = None


@dataclass(frozen=True)
class Breakdown:
    """The parts of a formula estimate, in bytes."""

    weights_bytes: int
    kv_bytes: int
    graph_bytes: int
    minimum_bytes: int
    buffer_bytes: int
    context_length: int

    @property
    def total_bytes(self) -> int:
        """The sum that must fit on one GPU."""
        return self.weights_bytes + self.kv_bytes + self.graph_bytes + self.minimum_bytes + self.buffer_bytes


def effective_context(info: ModelInfo, default_num_ctx: int) -> int:
    """The context a model runs with: its own num_ctx, else the configured one, clamped to training."""
    ctx = info.num_ctx or default_num_ctx
    if info.context_length:
        ctx = min(ctx, info.context_length)
    return max(ctx, 1)


def breakdown(info: ModelInfo, file_size_bytes: int, default_num_ctx: int) -> Breakdown | None:
    """Ollama's classic (<= v0.12) full-offload estimate; None when metadata is missing.

    VRAM ~= W + KV(C) + graph(C) + 457 MiB + one layer of buffer (W/L + KV/L).
    """
    layers, embed, heads = info.block_count, info.embedding_length, info.head_count
    if not layers or not embed or not heads:
        return None
    kv_heads = info.head_count_kv or heads
    ctx = effective_context(info, default_num_ctx)
    head_dim = embed // heads
    key_len = info.key_length or head_dim
    value_len = info.value_length or head_dim
    kv = layers * ctx * (key_len + value_len) * kv_heads * 2  # f16: 2 bytes per element
    batch = min(NUM_BATCH, ctx)
    if info.architecture == "llama":
        graph = 4 * batch * (1 + 4 * embed + ctx * (1 + heads))
        if info.vocab_size:
            graph = max(graph, 4 * batch * (embed + info.vocab_size))
    else:
        # Ollama's fallback for architectures without their own GraphSize case.
        graph = (heads // max(kv_heads, 1)) * kv // 6
    return Breakdown(
        weights_bytes=file_size_bytes,
        kv_bytes=kv,
        graph_bytes=graph,
        minimum_bytes=GPU_MINIMUM_BYTES,
        buffer_bytes=file_size_bytes // layers + kv // layers,
        context_length=ctx,
    )


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB"


def estimate(info: ModelInfo | None, file_size_bytes: int | None, default_num_ctx: int) -> SizeEstimate:
    """Size from metadata, else from the file, else unknown."""
    if info is not None and file_size_bytes:
        b = breakdown(info, file_size_bytes, default_num_ctx)
        if b is not None:
            detail = (
                f"weights {_mib(b.weights_bytes)} + KV {_mib(b.kv_bytes)} + graph {_mib(b.graph_bytes)}"
                f" + minimum {_mib(b.minimum_bytes)} + buffer {_mib(b.buffer_bytes)}"
                f" at ctx {b.context_length}"
            )
            return SizeEstimate(b.total_bytes, SizeSource.ESTIMATED, detail, b.context_length)
    if file_size_bytes:
        need = int(file_size_bytes * FILE_OVERHEAD_RATIO) + GPU_MINIMUM_BYTES
        detail = f"file {_mib(file_size_bytes)} x {FILE_OVERHEAD_RATIO} + minimum {_mib(GPU_MINIMUM_BYTES)}"
        return SizeEstimate(need, SizeSource.FILE, detail)
    return SizeEstimate(None, SizeSource.UNKNOWN, "no size on any node")


class SizeIndex:
    """What one cluster observation says about every model's size, gathered in one pass."""

    def __init__(self, state: ClusterState, needs: Mapping[str, int] | None = None) -> None:
        self._needs = needs or {}
        self.observed: dict[str, tuple[int, str]] = {}  # largest size fully on GPU, and where
        self.file_bytes: dict[str, int] = {}
        self._state = state
        for node in state.nodes:
            if not node.up:
                continue
            for m in node.loaded:
                seen = self.observed.get(m.name)
                if m.processor is Processor.GPU and (seen is None or m.size_bytes > seen[0]):
                    self.observed[m.name] = (m.size_bytes, node.name)
            for inst in node.installed:
                if inst.size_bytes > self.file_bytes.get(inst.name, 0):
                    self.file_bytes[inst.name] = inst.size_bytes

    def need(self, model: str, default_num_ctx: int) -> SizeEstimate:
        """The VRAM ``model`` needs, from the best source available."""
        given = self._needs.get(model)
        if given is not None:
            return SizeEstimate(given, SizeSource.GIVEN, "given by the caller")
        seen = self.observed.get(model)
        if seen is not None:
            return SizeEstimate(seen[0], SizeSource.OBSERVED, f"/api/ps on {seen[1]}, fully on GPU")
        return estimate(self._state.model_info(model), self.file_bytes.get(model), default_num_ctx)


def model_need(state: ClusterState, model: str, default_num_ctx: int) -> SizeEstimate:
    """The VRAM ``model`` needs, from the best source available."""
    return SizeIndex(state).need(model, default_num_ctx)


def span_need(need_bytes: int, gpu_count: int) -> int:
    """VRAM a model needs when split over ``gpu_count`` GPUs: each GPU pays Ollama's minimum."""
    return need_bytes + (gpu_count - 1) * GPU_MINIMUM_BYTES
