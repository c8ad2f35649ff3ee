"""The VRAM-need engine: what one node's Ollama will need for one model. Pure: no I/O, no logging.

``estimate_memory`` picks the node's engine era from its version (version.py), the context and
slots the model will get (context.py), the KV cache type and flash attention as that version
applies them, and then sizes the model the way that era does:

- classic (< v0.11.11, and llama-engine models to v0.12.10): ``llm/memory.go`` estimateGPULayers,
  exactly (classic.py, graph.py);
- Ollama engine (v0.11.11 - v0.29): weights per layer as the backend assigns them, the cache as
  ``kvcache`` allocates it, and an approximation of the graph Ollama measures (cache.py);
- llama engine layouts (v0.12.11 - v0.29): ``llm/server.go@v0.20.0`` llamaServer.Load, exactly;
- llama-server (>= v0.30.0): llama.cpp's buffers, ``--fit``'s margin and Ollama's own pre-load
  check (``server/sched.go@v0.30.0`` load; ``llm/llama_server.go@v0.30.0`` PredictServerVRAM).

Every estimate keeps ``need_bytes == weights + kv + graph + projector + reserve + buffer``, so
``explain`` can show the sum, and says in ``notes`` what it had to assume.
"""

from __future__ import annotations

from gpu_router.memory import cache, classic
from gpu_router.memory.context import ContextChoice, resolve_context
from gpu_router.memory.env import KV_CACHE_TYPES_GO, OllamaEnv
from gpu_router.memory.ggml import KV_TYPE_BYTES
from gpu_router.memory.graph import classic_kv_bytes, graph_size, vision_graph_size, with_fallback
from gpu_router.memory.shapes import Shape, model_shape
from gpu_router.memory.version import (
    LAYOUT_SINCE,
    Era,
    Version,
    VersionFacts,
    facts,
    flash_attention_default,
    format_version,
    ollama_engine_runs,
)
from gpu_router.records import record, replace
from gpu_router.state import GIB, MIB, ModelInfo

NUM_BATCH = 512  # api.DefaultOptions NumBatch
# llama.cpp common_params fit_params_target: memory --fit leaves free on every device (1024 MiB).
FIT_MARGIN_BYTES = 1024 * MIB
# llm/llama_server.go@v0.30.0 limitedMMProjOffloadMemory: at or below, the projector stays on CPU.
MMPROJ_OFFLOAD_LIMIT_BYTES = 10 * GIB
DEFAULT_MODELS_PER_GPU = 3  # server/sched.go defaultModelsPerGPU


@record
class NodeProfile:
    """What decides a model's memory on one node: its Ollama version, its GPUs and its settings."""

    version: str | None  # /api/version of the node
    gpu_total_bytes: tuple[int, ...]  # one per GPU; () when unknown or CPU-only
    env: OllamaEnv
    library: str = "cuda"  # "cuda", "rocm" or "metal": the per-GPU minimum differs on Metal


@record
class MemoryEstimate:
    """One model on one node: the parts of its VRAM, the need, and what ``/api/ps`` will show."""

    era: Era
    version: str | None
    engine: str  # "llama" / "ollama" / "llama-server": what runs the model on that version
    context_length: int  # per-slot num_ctx the node will use (memory is sized with it)
    context_reason: str
    num_parallel: int
    kv_cache_type: str  # as actually applied: "f16" when flash attention is off/unsupported
    flash_attention: bool
    weights_bytes: int  # weights that go to the GPU
    kv_bytes: int
    graph_bytes: int  # the graph the fit is judged with
    projector_bytes: int  # vision projector weights + graph
    reserve_bytes: int  # per-GPU minimum + OLLAMA_GPU_OVERHEAD, or the --fit margin
    buffer_bytes: int  # the one-layer buffer (0 where unused)
    need_bytes: int  # free VRAM one GPU must have for a full offload (the fit judgement)
    ps_size_bytes: int  # what /api/ps `size` will show once fully loaded
    preload_bytes: int | None  # llama-server era: Ollama's own pre-load figure; None elsewhere
    notes: tuple[str, ...] = ()
    ps_context_length: int | None = None  # what /api/ps context_length will show
    parallel_reason: str = ""
    weights_source: str = "tensors"  # "tensors", "tensors scaled to the file" or "file size"
    span_base_bytes: int = 0  # the need on several GPUs before the per-extra-GPU cost
    extra_gpu_bytes: int = 0  # what each further GPU adds when the model is split

    def span_need_bytes(self, gpu_count: int) -> int:
        """Free VRAM summed over ``gpu_count`` GPUs for a full offload split across them.

        Every GPU used pays the era's per-GPU cost again: the minimum (or the --fit margin), the
        graph, and a layer (the buffer layer, or the slack of packing whole layers).
        """
        if gpu_count <= 1:
            return self.need_bytes
        return self.span_base_bytes + (gpu_count - 1) * self.extra_gpu_bytes


def max_loaded_models(env: OllamaEnv, gpu_count: int) -> int:
    """How many models the node keeps loaded: OLLAMA_MAX_LOADED_MODELS, else 3 per GPU (3 on CPU).

    ``server/sched.go@v0.30.0`` processPending: ``defaultModelsPerGPU * max(len(gpus), 1)``.
    """
    if env.max_loaded_models:
        return env.max_loaded_models
    return DEFAULT_MODELS_PER_GPU * max(gpu_count, 1)


def preload_check_passes(estimate: MemoryEstimate, free_bytes: int) -> bool:
    """Would Ollama load without first evicting other models (the pinned ones included)?

    ``server/sched.go@v0.30.0`` load: with other models loaded, a predicted size above 80% of the
    free memory of the chosen GPUs makes Ollama evict before it starts llama-server. Other eras
    have no such check (their fit test is the need itself): True.
    """
    if estimate.preload_bytes is None:
        return True
    return estimate.preload_bytes <= free_bytes * 80 // 100


def need_from_observed(ps_size_bytes: int, estimate: MemoryEstimate) -> int:
    """The fit need implied by a real ``/api/ps`` size of the same model, context, slots and era.

    ``size`` leaves out what the era keeps free beside the model (minimum, overhead, the larger
    graph, the --fit margin...); the estimate knows how much that is.
    """
    return ps_size_bytes + (estimate.need_bytes - estimate.ps_size_bytes)


def supports_flash_attention(info: ModelInfo, shape: Shape, v: Version) -> bool:
    """``fs/ggml/ggml.go@v0.20.0`` SupportsFlashAttention, with the exceptions as they arrived."""
    if info.pooling:
        return False
    arch = shape.arch
    if arch in ("qwen35", "qwen35moe", "qwen3next"):
        return True
    if arch == "grok" or (arch == "gemma2" and v >= (0, 11, 11)):
        return False
    dk, dv = shape.key_length, shape.value_length
    return dk != 0 and dv != 0 and dk == dv


def _go_flash(info: ModelInfo, shape: Shape, v: Version, env: OllamaEnv) -> bool:
    """Flash attention in the Go engines (llm/server.go NewLlamaServer; llm/memory.go).

    Before v0.11.8 only OLLAMA_FLASH_ATTENTION turns it on; v0.11.8 - v0.12.3 the model's default
    list also forces it on (85ccf7354); from v0.12.4 (fdb109469) the setting overrides the default.
    """
    default = flash_attention_default(shape.arch, v) if v >= (0, 11, 8) else False
    if v < (0, 12, 4):
        wanted = env.flash_attention is True or default
    else:
        wanted = env.flash_attention if env.flash_attention is not None else default
    return wanted and supports_flash_attention(info, shape, v)


def _go_kv_type(shape: Shape, v: Version, env: OllamaEnv, flash: bool) -> tuple[str, str | None]:
    """The cache type a Go engine applies, and a note when it ignores the setting."""
    requested = env.kv_cache_type
    if not requested or requested == "f16":
        return "f16", None
    if not flash:
        return "f16", f"OLLAMA_KV_CACHE_TYPE={requested} needs flash attention, which is off: f16"
    if requested not in KV_CACHE_TYPES_GO:
        return "f16", f"OLLAMA_KV_CACHE_TYPE={requested} is not supported before v0.30: f16"
    if shape.arch in ("gptoss", "gpt-oss") and (0, 11, 5) <= v < (0, 12, 4):
        return "f16", "gpt-oss took only an f16 cache from v0.11.5 to v0.12.3"
    return requested, None


@record
class _Parts:
    engine: str
    weights: int
    kv: int
    graph: int
    projector: int
    reserve: int
    buffer: int
    ps_size: int
    preload: int | None
    kv_type: str
    flash: bool
    span_base: int
    extra_gpu: int
    notes: tuple[str, ...] = ()


def _classic_parts(
    info: ModelInfo, shape: Shape, f: VersionFacts, node: NodeProfile, choice: ContextChoice
) -> tuple[classic.ClassicInputs, bool, str, str | None]:
    """The inputs of ``estimateGPULayers`` for this model on this node, and the cache it assumed."""
    v, env = f.version, node.env
    flash = _go_flash(info, shape, v, env)
    kv_type, kv_note = _go_kv_type(shape, v, env, flash)
    ctx = choice.context_length
    batch = min(ctx, NUM_BATCH)
    g = with_fallback(
        graph_size(shape, info, v, ctx, batch, choice.num_parallel, classic_kv_bytes(kv_type), flash), shape
    )
    # a separate projector file goes to the first GPU; without one, VisionGraphSize's weights and
    # graph go with the output layer (llm/memory.go@v0.12.10), or to the first GPU too before
    # v0.7.1 (d75557747 "Estimate projector memory correctly for Ollama engine")
    gzo = shape.projector_file_bytes
    vision_w, vision_g = (0, 0) if gzo else vision_graph_size(shape, info, v)
    if v < (0, 7, 1):
        gzo, vision_w, vision_g = gzo + vision_w + vision_g, 0, 0
    inputs = classic.ClassicInputs(
        block_bytes=shape.block_bytes,
        kv=g.kv,
        graph_partial=g.partial,
        graph_full=g.full,
        output_bytes=shape.output_layer_bytes,
        gpu_zero_bytes=gzo,
        last_layer_extra_bytes=vision_w + vision_g,
        minimum_bytes=classic.minimum_memory(node.library),
        overhead_bytes=env.gpu_overhead_bytes or 0,
        metal=node.library.lower() == "metal",
    )
    return inputs, flash, kv_type, kv_note


def _classic(
    info: ModelInfo, shape: Shape, f: VersionFacts, node: NodeProfile, choice: ContextChoice
) -> _Parts:
    inputs, flash, kv_type, kv_note = _classic_parts(info, shape, f, node, choice)
    ps_size = classic.full_offload_size(inputs)
    notes = [kv_note] if kv_note else []
    if choice.fit_context != choice.context_length:
        # before v0.11.5 the scheduler judged the fit before the runner clamped the context
        fit_choice = replace(choice, context_length=choice.fit_context)
        inputs = _classic_parts(info, shape, f, node, fit_choice)[0]
        notes.append(
            f"{format_version(f.version)} judges the fit at the unclamped {choice.fit_context}"
            f" but runs (and reports) {choice.context_length}"
        )
    weights = sum(shape.block_bytes) + shape.output_layer_bytes
    buffer = shape.block_bytes[0] + inputs.kv[0]
    reserve = inputs.minimum_bytes + inputs.overhead_bytes
    graph = max(inputs.graph_partial, inputs.graph_full)
    projector = inputs.gpu_zero_bytes + inputs.last_layer_extra_bytes
    if shape.mm_bytes:
        notes.append("mm.* projector tensors are not counted by the classic estimate (llm/memory.go)")
    span2 = classic.full_offload_need(inputs, 2)
    span3 = classic.full_offload_need(inputs, 3)
    separate = inputs.gpu_zero_bytes > 0
    engine = "ollama" if ollama_engine_runs(shape.arch, f.version, separate_projector=separate) else "llama"
    return _Parts(
        engine=engine,
        weights=weights,
        kv=sum(inputs.kv),
        graph=graph,
        projector=projector,
        reserve=reserve,
        buffer=buffer,
        ps_size=ps_size,
        preload=None,
        kv_type=kv_type,
        flash=flash,
        span_base=span2 - (span3 - span2),
        extra_gpu=span3 - span2,
        notes=tuple(notes),
    )


def classic_inputs(
    info: ModelInfo, file_bytes: int, node: NodeProfile, *, num_ctx: int | None = None
) -> classic.ClassicInputs | None:
    """``estimateGPULayers``' inputs for ``info`` on ``node``, for ``estimate_gpu_layers``.

    Meaningful where the classic estimator placed the model (before v0.11.11, and llama-engine
    models to v0.12.10); the emulator uses it to reproduce partial offloads of those versions.
    """
    prepared = _prepare(info, file_bytes, node, num_ctx)
    if prepared is None:
        return None
    shape, f, choice, _ = prepared
    return _classic_parts(info, shape, f, node, choice)[0]


def _llama_layout(
    info: ModelInfo, shape: Shape, f: VersionFacts, node: NodeProfile, choice: ContextChoice
) -> _Parts:
    """``llm/server.go@v0.20.0`` llamaServer.Load: a layout synthesised from GraphSize."""
    v, env = f.version, node.env
    # the llama engine leaves flash attention to llama.cpp unless the setting forces it
    # ("auto"); a quantised cache needs it forced on
    flash_forced = env.flash_attention is True and supports_flash_attention(info, shape, v)
    flash = env.flash_attention is not False and supports_flash_attention(info, shape, v)
    kv_type, kv_note = _go_kv_type(shape, v, env, flash_forced)
    if kv_type != "f16" and not flash_forced:
        kv_type = "f16"
    ctx = choice.context_length
    batch = ctx if info.pooling else min(ctx, NUM_BATCH)  # embedding models: batch = num_ctx
    g = with_fallback(
        graph_size(shape, info, v, ctx, batch, choice.num_parallel, classic_kv_bytes(kv_type), flash_forced),
        shape,
    )
    minimum = classic.minimum_memory(node.library)
    overhead = env.gpu_overhead_bytes or 0
    buffer = shape.block_bytes[0] + g.kv[0]
    graph = max(g.partial, g.full)
    if node.library.lower() == "metal":
        graph = g.full
    weights = sum(shape.block_bytes) + shape.output_layer_bytes
    projector = shape.projector_file_bytes
    notes = [kv_note] if kv_note else []
    if projector:
        notes.append(
            "the projector file is counted although Ollama's layout sizes LoRA adapters in its place"
            " (llm/server.go@v0.20.0)"
        )
    reserve = minimum + overhead
    need = weights + g.kv_total + graph + projector + reserve + buffer
    extra = reserve + buffer + graph
    return _Parts(
        engine="llama",
        weights=weights,
        kv=g.kv_total,
        graph=graph,
        projector=projector,
        reserve=reserve,
        buffer=buffer,
        ps_size=weights + g.kv_total + g.full,
        preload=None,
        kv_type=kv_type,
        flash=flash,
        span_base=need,
        extra_gpu=extra,
        notes=tuple(notes),
    )


def _active_ff(info: ModelInfo, shape: Shape) -> int:
    """Feed-forward width one token goes through: the experts used, or the dense FFN."""
    if info.expert_used_count and info.expert_feed_forward_length:
        return info.expert_used_count * info.expert_feed_forward_length
    return shape.feed_forward or 4 * shape.embedding


def _ollama_engine(
    info: ModelInfo, shape: Shape, f: VersionFacts, node: NodeProfile, choice: ContextChoice
) -> _Parts:
    """The Ollama engine (``llm/server.go@v0.20.0`` ollamaServer.Load): measured allocations.

    Weights and cache are what the backend and ``kvcache`` allocate. The graph is measured by the
    runner reserving a worst-case batch; here it is approximated as one layer's activations
    (4 x batch x (2E + 2FF + (H + 2Hkv) x Dk)), the attention mask (flash attention) or the
    attention scores (without), and the logits of one token per slot.
    """
    v, env = f.version, node.env
    flash = _go_flash(info, shape, v, env)
    kv_type, kv_note = _go_kv_type(shape, v, env, flash)
    ctx, parallel = choice.context_length, choice.num_parallel
    batch = min(ctx, NUM_BATCH)
    layers_cache = cache.ollama_engine_cache(shape, info, ctx, parallel, batch, KV_TYPE_BYTES[kv_type])
    kv = sum(layers_cache)
    cells = cache.round_up(parallel * ctx, cache.CACHE_PADDING)
    dk = shape.key_length
    attention_width = (shape.heads_max + 2 * shape.heads_kv_max) * dk
    activations = 4 * batch * (2 * shape.embedding + 2 * _active_ff(info, shape) + attention_width)
    attention = 2 * batch * cells if flash else 4 * batch * cells * shape.heads_max
    logits = 0 if info.pooling else 4 * parallel * shape.vocab
    graph = activations + attention + logits
    weights = sum(shape.block_bytes) + shape.rope_freqs_bytes * shape.layers
    text_output = max(shape.engine_output_bytes - shape.vision_bytes - shape.mm_bytes, 0)
    if not shape.has_output:
        text_output += shape.token_embd_bytes  # tied embeddings: the output head is a GPU copy
    weights += text_output
    vision_w, vision_g = vision_graph_size(shape, info)
    projector = shape.vision_bytes + shape.mm_bytes + vision_g if (vision_w or shape.mm_bytes) else 0
    reserve = classic.minimum_memory(node.library) + (env.gpu_overhead_bytes or 0)
    need = weights + kv + graph + projector + reserve
    notes = [kv_note] if kv_note else []
    notes.append("the Ollama engine measures its compute graph; the graph here is an approximation")
    biggest_layer = max(b + c for b, c in zip(shape.block_bytes, layers_cache, strict=True))
    return _Parts(
        engine="ollama",
        weights=weights,
        kv=kv,
        graph=graph,
        projector=projector,
        reserve=reserve,
        buffer=0,
        ps_size=shape.engine_input_bytes + weights + kv + graph + projector,
        preload=None,
        kv_type=kv_type,
        flash=flash,
        span_base=need,
        extra_gpu=reserve + graph + biggest_layer,
        notes=tuple(notes),
    )


def generation_batch(ctx_total: int, flash_disabled: bool, library: str) -> int:
    """The batch llama-server gets for a completion model (``server/sched.go@v0.30.0``).

    ``automaticGenerationBatch``: 2048 above 32768 tokens of context, 1024 above 4096, else 512;
    with flash attention turned off on CUDA, 512. Ollama lowers the larger batches (and uses 256
    on CUDA GPUs of 8 GiB or less) when the free memory at load time is short; the free memory
    of that moment is unknown here, so the need is sized with the larger batch, which keeps it
    from shrinking as the context grows.
    """
    if flash_disabled and library.lower() == "cuda":
        return 512
    return 2048 if ctx_total > 32768 else 1024 if ctx_total > 4096 else 512


def lowered_batch(batch: int, predicted: int, available: int) -> int:
    """The batch ``automaticGenerationBatch`` settles on with ``available`` bytes free.

    ``generationBatchFits``: the prediction must stay under 80% of the free memory, under 60%
    (2048) or 75% (1024) for the larger batches, and leave room for the batch's surcharge.
    """

    def fits(b: int) -> bool:
        if predicted == 0 or available == 0:
            return True
        threshold = available * 80 // 100
        if predicted > threshold:
            return False
        if b >= 2048 and predicted > available * 60 // 100:
            return False
        if 1024 <= b < 2048 and predicted > available * 75 // 100:
            return False
        return batch_surcharge(b) <= threshold - predicted

    while batch > 512 and not fits(batch):
        batch = 1024 if batch > 1024 else 512
    return batch


def batch_surcharge(batch: int) -> int:
    """``generationBatchSurcharge``: memory Ollama adds to its prediction for a larger batch."""
    if batch >= 2048:
        return 2 * GIB
    if batch >= 1024:
        return 768 * MIB
    return 0


def predict_server_vram(shape: Shape, ctx_total: int) -> int:
    """``llm/llama_server.go@v0.30.0`` PredictServerVRAM: file size + f16 K and V for every layer."""
    kv_heads = shape.heads_kv_min or 1
    head_dim = shape.embedding // shape.heads_max if shape.heads_max > 0 else 0
    return shape.model_file_bytes + 2 * shape.layers * kv_heads * head_dim * ctx_total * 2


def _llama_server(
    info: ModelInfo, shape: Shape, f: VersionFacts, node: NodeProfile, choice: ContextChoice
) -> _Parts:
    """llama-server (v0.30+): llama.cpp's buffers, ``--fit``'s margin, Ollama's pre-load check.

    The compute buffer is llama.cpp's (no Ollama formula exists); it is taken as the larger of the
    logits (4 x ubatch x vocab) and, without flash attention, the attention scores, plus one
    layer's activations. That matches the llama.cpp compute buffers of ollama-observations rows 5,
    55 and 66 within 2% (calibration, not a port).
    """
    env = node.env
    ctx, parallel = choice.context_length, choice.num_parallel
    ctx_total = ctx * parallel
    completion = "completion" in info.capabilities
    notes: list[str] = []
    flash = env.flash_attention is not False
    kv_type = env.kv_cache_type or "f16"
    if kv_type not in ("f16", "f32", "bf16") and not flash:
        notes.append(
            f"llama.cpp cannot quantize the V cache without flash attention: OLLAMA_KV_CACHE_TYPE={kv_type}"
            " would fail to load; sized as f16"
        )
        kv_type = "f16"
    predicted = predict_server_vram(shape, ctx_total)
    if completion:
        ubatch = generation_batch(ctx_total, env.flash_attention is False, node.library)
        largest = max(node.gpu_total_bytes) if node.gpu_total_bytes else 0
        empty_node = lowered_batch(ubatch, predicted, largest)
        if empty_node < ubatch:
            notes.append(
                f"Ollama lowers the batch from {ubatch} to {empty_node} (or less) when free memory is"
                f" short, as it would be even on an empty GPU of this size; sized with {ubatch}"
            )
    else:
        ubatch = min(2048, ctx)  # DefaultEmbeddingNumBatch, capped to the context
    layers_kv, cells = cache.llama_cpp_cache(shape, info, ctx, parallel, ubatch, KV_TYPE_BYTES[kv_type])
    kv = sum(layers_kv)
    if not kv and info.pooling:
        notes.append("encoder-only embedding model: llama.cpp allocates no KV cache")
    logits = 4 * ubatch * shape.vocab if completion else 0
    scores = 0 if flash else 4 * ubatch * max(cells, ubatch) * shape.heads_max
    graph = max(logits, scores) + 4 * ubatch * (shape.embedding + _active_ff(info, shape))
    text = (
        sum(shape.block_bytes)
        + shape.output_bytes
        + shape.output_norm_bytes
        + shape.other_bytes
        + (0 if shape.has_output else shape.token_embd_bytes)  # the output head is a GPU copy
    )
    vision_weights = shape.vision_bytes + shape.mm_bytes + shape.projector_file_bytes
    _, vision_graph = vision_graph_size(shape, info)
    projector = vision_weights + vision_graph
    smallest = min(node.gpu_total_bytes) if node.gpu_total_bytes else 0
    if projector and smallest and smallest <= MMPROJ_OFFLOAD_LIMIT_BYTES:
        notes.append("projector kept on the CPU (--no-mmproj-offload on GPUs of 10 GiB or less)")
        projector = 0
    reserve = FIT_MARGIN_BYTES
    need = text + kv + graph + projector + reserve
    surcharge = batch_surcharge(ubatch) if completion else 0
    biggest_layer = max(b + c for b, c in zip(shape.block_bytes, layers_kv, strict=True))
    return _Parts(
        engine="llama-server",
        weights=text,
        kv=kv,
        graph=graph,
        projector=projector,
        reserve=reserve,
        buffer=0,
        ps_size=text + kv + graph,
        preload=predicted + surcharge,
        kv_type=kv_type,
        flash=flash,
        span_base=need,
        extra_gpu=reserve + graph + biggest_layer,
        notes=tuple(notes),
    )


def _estimate_with(
    info: ModelInfo, shape: Shape, f: VersionFacts, node: NodeProfile, choice: ContextChoice
) -> MemoryEstimate:
    era = f.era
    v = f.version
    separate_projector = shape.projector_file_bytes > 0
    if era is Era.LLAMA_SERVER:
        parts = _llama_server(info, shape, f, node, choice)
    elif era is Era.CLASSIC:
        parts = _classic(info, shape, f, node, choice)
    elif ollama_engine_runs(shape.arch, v, separate_projector=separate_projector):
        parts = _ollama_engine(info, shape, f, node, choice)
    elif v < LAYOUT_SINCE:
        parts = _classic(info, shape, f, node, choice)
    else:
        parts = _llama_layout(info, shape, f, node, choice)
    need = parts.weights + parts.kv + parts.graph + parts.projector + parts.reserve + parts.buffer
    notes = [*choice.notes, *shape.notes, *parts.notes]
    if not f.known:
        notes.insert(0, f"Ollama version {node.version!r} unknown: sized as {format_version(v)} would")
    return MemoryEstimate(
        era=era,
        version=node.version,
        engine=parts.engine,
        context_length=choice.context_length,
        context_reason=choice.reason,
        num_parallel=choice.num_parallel,
        kv_cache_type=parts.kv_type,
        flash_attention=parts.flash,
        weights_bytes=parts.weights,
        kv_bytes=parts.kv,
        graph_bytes=parts.graph,
        projector_bytes=parts.projector,
        reserve_bytes=parts.reserve,
        buffer_bytes=parts.buffer,
        need_bytes=need,
        ps_size_bytes=parts.ps_size,
        preload_bytes=parts.preload,
        notes=tuple(notes),
        ps_context_length=choice.ps_context_length,
        parallel_reason=choice.parallel_reason,
        weights_source=shape.weights_source,
        span_base_bytes=parts.span_base,
        extra_gpu_bytes=parts.extra_gpu,
    )


def _prepare(
    info: ModelInfo, file_bytes: int, node: NodeProfile, num_ctx: int | None
) -> tuple[Shape, VersionFacts, ContextChoice, MemoryEstimate] | None:
    """The model's shape, the node's version, the context and slots it gets, and the estimate."""
    if info.remote or not isinstance(file_bytes, int) or file_bytes <= 0:
        return None
    shape = model_shape(info, file_bytes)
    if shape is None:
        return None
    f = facts(node.version)
    choice = resolve_context(info, f, node.env, node.gpu_total_bytes, num_ctx)
    estimate = _estimate_with(info, shape, f, node, choice)
    # Auto parallel (before v0.10.0): the scheduler tries the default number of slots, then one.
    largest = max(node.gpu_total_bytes) if node.gpu_total_bytes else 0
    for fallback in choice.parallel_candidates[1:]:
        if not largest or estimate.need_bytes <= largest:
            break
        choice = replace(
            choice,
            num_parallel=fallback,
            parallel_reason=f"{choice.parallel_reason}: {fallback}, as more does not fit the largest GPU",
        )
        estimate = _estimate_with(info, shape, f, node, choice)
    return shape, f, choice, estimate


def estimate_memory(
    info: ModelInfo, file_bytes: int, node: NodeProfile, *, num_ctx: int | None = None
) -> MemoryEstimate | None:
    """What ``node``'s Ollama will need to hold ``info`` (``file_bytes`` on disk) fully on one GPU.

    ``num_ctx`` is the context gpu-router itself asks for (a priority model's ``num_ctx``, sent as
    ``options.num_ctx``). None when the metadata is too thin to size the model, or for a cloud
    model (it runs elsewhere). Never raises on odd metadata.
    """
    prepared = _prepare(info, file_bytes, node, num_ctx)
    return prepared[3] if prepared is not None else None
