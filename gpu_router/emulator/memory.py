"""What a given Ollama would allocate for a model: the emulator's one memory seam.

Pure: no I/O, no clocks. :func:`allocate` takes a model, the request as the scheduler has shaped it
(context per slot, parallel slots, KV type, ``num_gpu``), the GPUs' free memory as Ollama sees it
and the engine era, and answers what the runner takes on each GPU, the ``/api/ps`` ``size`` and
whether the load fits, must evict first, or fails. :func:`predict_llama_server_vram` is the >= v0.30
pre-load figure.

With an :class:`~gpu_router.emulator.engine.EngineView` (the node passes one whenever the daemon's
engine, ``gpu_router.memory``, can size the model) the figures are the engine's: the classic era
places layers with its ``estimate_gpu_layers``, the later eras fit with its ``need_bytes`` and
report its ``ps_size_bytes``, so the emulator and the daemon use the same port of Ollama's code.
The emulator's own port below remains for what the engine does not give (partial offloads after
v0.12.10, CPU loads) and for hand-made models it cannot size.

Eras, by what ``/api/ps`` ``size``/``size_vram`` mean:

- ``classic``: ``llm/memory.go@v0.12.10`` estimateGPULayers with ``fs/ggml/ggml.go@v0.12.10``
  GraphSize: the estimate itself (457 MiB per GPU, one layer of buffer, the graph), partial offload by
  whole layers; picking GPUs as ``pickBestFullFitByLibrary`` does (fewest GPUs first).
- ``measured``: ``llm/server.go@v0.20.0`` (buildLayout/assignLayers and the ollama engine's
  allocations): the memory actually allocated, weights + KV + graph, without the 457 MiB minimum or
  the buffer layer (both are still reserved when fitting); the ollama engine keeps a sliding window's
  cache small and counts the input embeddings.
- ``llama-server``: ``llm/llama_server.go@v0.30.0``: llama-server's buffer sizes (model, KV, compute)
  after llama.cpp's ``--fit`` left a margin on each GPU; ``size == size_vram`` when every layer is on
  the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpu_router.emulator.catalogue import GPU_MINIMUM_BYTES, ModelSpec
from gpu_router.emulator.engine import EngineView
from gpu_router.memory import estimate_gpu_layers
from gpu_router.records import field, record
from gpu_router.state import GIB, MIB

CLASSIC = "classic"
MEASURED = "measured"
LLAMA_SERVER = "llama-server"
ERAS = (CLASSIC, MEASURED, LLAMA_SERVER)

# llama.cpp common_params_fit: free memory left on every device (LLAMA_ARG_FIT_TARGET default).
FIT_MARGIN_BYTES = 1024 * MIB
# What a runner that ran out of VRAM leaves behind: StatusWriter keeps the "cudaMalloc failed" line
# (llm/status.go@v0.12.6) and WaitUntilRunning wraps it (llm/server.go@v0.12.6).
RUNNER_OOM = "llama runner process has terminated: cudaMalloc failed: out of memory"
# llm/llama_server.go@v0.30.0 WaitUntilRunning: "llama-server process has terminated: <exit>: <msg>".
LLAMA_SERVER_OOM = "llama-server process has terminated: exit status 1: cudaMalloc failed: out of memory"
LLAMA_SERVER_RAM_OOM = (
    "llama-server process has terminated: exit status 1: "
    "ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer: out of memory"
)


@record
class GpuView:
    """One GPU as the scheduler sees it when placing a model."""

    index: int
    total_bytes: int
    free_bytes: int


@record
class LoadShape:
    """A load request after the scheduler applied the version's rules."""

    spec: ModelSpec
    num_ctx: int  # per slot, as requested (before the trained-context clamp)
    num_parallel: int = 1
    num_gpu: int = -1  # -1 = auto
    kv_cache_type: str = ""  # "" / f16 / q8_0 / q4_0, as the runner will use it
    flash_attention: bool = False
    num_batch: int = 512
    clamp_to_trained: bool = True  # NewLlamaServer clamps num_ctx to the trained context from v0.9.3

    @property
    def context_length(self) -> int:
        """The context each slot gets: num_ctx, clamped to the trained context where the version does."""
        trained = self.spec.context_length
        return min(self.num_ctx, trained) if trained > 0 and self.clamp_to_trained else self.num_ctx


@record
class Allocation:
    """What the runner holds: per-GPU bytes, the ``/api/ps`` size, layers placed."""

    vram_by_gpu: dict[int, int] = field(default_factory=dict)
    total_bytes: int = 0  # /api/ps size
    layers_on_gpu: int = 0
    layers_total: int = 0

    @property
    def size_vram_bytes(self) -> int:
        """``/api/ps`` ``size_vram``."""
        return sum(self.vram_by_gpu.values())

    @property
    def fully_on_gpu(self) -> bool:
        """True when every layer is on a GPU."""
        return self.layers_total > 0 and self.layers_on_gpu >= self.layers_total


@record
class Outcome:
    """:func:`allocate`'s answer: an allocation, or "evict something first", or a load error."""

    allocation: Allocation | None = None
    needs_eviction: bool = False  # ErrLoadRequiredFull
    error: str = ""  # the load fails with this message (HTTP 500)
    out_of_memory: bool = False  # the error is an OOM (>= v0.30 retries those)


def kv_bytes_per_element(kv_cache_type: str) -> float:
    """``kvCacheBytesPerElement`` (fs/ggml/ggml.go@v0.12.10)."""
    return {"q8_0": 1.0, "q4_0": 0.5, "f32": 4.0}.get(kv_cache_type, 2.0)


def _recurrent_state_bytes(spec: ModelSpec) -> int:
    # GraphSize's recurrent layer: (d_conv-1)*(d_inner + 2*groups*d_state) + d_state*d_inner, f32.
    conv = spec.ssm_conv_kernel
    d_state, d_inner, groups = spec.ssm_state_size, spec.ssm_inner_size, max(1, spec.ssm_group_count)
    embd_r = (conv - 1) * (d_inner + 2 * groups * d_state) if conv > 0 else 0
    return (embd_r + d_state * d_inner) * 4


def graph_size(
    spec: ModelSpec, context: int, batch: int, num_parallel: int, kv_cache_type: str, *, swa_cache: bool
) -> tuple[list[int], int, int]:
    """Per-layer KV bytes and the (partial, full) compute graph: GraphSize (fs/ggml/ggml.go@v0.12.10).

    ``context`` is per slot; ``swa_cache`` sizes sliding-window layers by their window (what the
    ollama engine allocates) instead of the whole context.
    """
    ctx = context * num_parallel
    e = spec.embedding_length
    heads = spec.head_count
    hkv_layers = spec.kv_heads_per_layer
    hkv_max = max(hkv_layers) if hkv_layers else 1
    vocab = spec.vocab_size
    dk, dv = spec.head_dim_k, spec.head_dim_v
    dh = e // max(1, heads)
    b = kv_bytes_per_element(kv_cache_type)
    kv: list[int] = []
    for hkv in hkv_layers:
        if hkv > 0:
            kv.append(int(ctx * (dk + dv) * hkv * b))
        else:
            kv.append(_recurrent_state_bytes(spec) * num_parallel)
    if swa_cache and spec.sliding_window:
        window = num_parallel * spec.sliding_window + batch
        for i, local in enumerate(spec.sliding_layers):
            if local and hkv_layers[i] > 0:
                kv[i] = int(min(ctx, window) * (dk + dv) * hkv_layers[i] * b)
    full = partial = 0
    arch = spec.architecture
    if arch in ("llama", "llama4"):
        full = max(4 * batch * (1 + 4 * e + ctx * (1 + heads)), 4 * batch * (e + vocab))
        partial = 4 * batch * e + max(
            4 * batch * (1 + e + max(ctx, e)) + e * e * 9 // 16 + 4 * ctx * (batch * heads + dh * hkv_max),
            4 * batch * (e + vocab) + e * vocab * 105 // 128,
        )
    elif arch in ("gemma", "gemma2", "gemma3", "gemma3n"):
        full = max(4 * batch * (e + vocab), 4 * batch * (2 + ctx + ctx * heads + 2 * e + 2 * dk * heads))
        partial = max(
            4 * e * batch + e * vocab * 105 // 128 + 4 * vocab * batch,
            4 * batch * (2 * e + 1 + 2 * dk * heads + ctx + ctx * heads)
            + 4 * dk * ctx * 8
            + e * dk * heads * 9 // 16,
        )
        if arch == "gemma3n":
            full, partial = full * 4, partial * 4
    elif arch in ("qwen2", "qwen25vl"):
        full = max(4 * batch * (e + vocab), 4 * batch * (1 + 2 * e + ctx + ctx * heads))
        partial = max(
            4 * batch * (e + vocab) + e * vocab * 105 // 128,
            4 * (batch * (1 + 2 * e + ctx * (1 + heads)) + e * (1 + ctx)),
        )
    if partial == 0:
        # The fallback for architectures without a case of their own.
        hkv_min = min(hkv_layers) if hkv_layers else 1
        partial = heads // max(1, hkv_min) * sum(kv) // 6
    if full == 0:
        full = partial
    return kv, partial, full


def vision_graph(spec: ModelSpec) -> tuple[int, int]:
    """(weights, graph) of a vision tower inside the GGUF: VisionGraphSize (fs/ggml/ggml.go@v0.12.10)."""
    weights = spec.layers.vision_bytes
    if not weights:
        return 0, 0
    extra = dict(spec.extra_info)
    a = spec.architecture
    image = int(extra.get(f"{a}.vision.image_size", 896))
    patch = int(extra.get(f"{a}.vision.patch_size", 14)) or 14
    heads = int(extra.get(f"{a}.vision.attention.head_count", 16))
    embedding = int(extra.get(f"{a}.vision.embedding_length", 1152))
    patches = (image // patch) ** 2
    if a == "qwen25vl":
        max_pixels = 28 * 28 * 1280
        patches = max_pixels // (patch * patch)
        graph = 4 * (2 * max_pixels * 3 + patches * 3 * patch * patch + patches * patches * heads)
        graph += 4 * embedding * patches
    else:
        graph = 4 * (image * image * 3 + embedding * patch + patches * patches * heads)
    return weights, graph


# ------------------------------------------------------------------------------------------ classic


def _classic_estimate(
    shape: LoadShape, gpus: Sequence[GpuView], overhead_bytes: int
) -> tuple[int, int, dict[int, int], int]:
    """estimateGPULayers (llm/memory.go@v0.12.10): (layers, vram, per-GPU bytes, total)."""
    spec = shape.spec
    ctx = shape.context_length
    batch = min(ctx, shape.num_batch)
    kv_type = shape.kv_cache_type if shape.flash_attention else ""
    kv, partial, full = graph_size(spec, ctx, batch, shape.num_parallel, kv_type, swa_cache=False)
    sizes = spec.layers
    blocks = sizes.blocks_bytes
    n_blocks = spec.block_count
    llama_projector = spec.projector_bytes
    engine_projector, engine_projector_graph = (0, 0) if llama_projector else vision_graph(spec)
    layer_size = (blocks[0] if blocks else 0) + (kv[0] if kv else 0)
    if len(gpus) > 1:
        full = partial  # multigpu should always use the partial graph size
    graph_max = max(partial, full)
    output = sizes.output_bytes
    allocations = {g.index: 0 for g in gpus}
    split = {g.index: 0 for g in gpus}
    with_space: list[GpuView] = []
    for g in gpus:
        zero_overhead = llama_projector if not with_space else 0
        if g.free_bytes < overhead_bytes + zero_overhead + graph_max + GPU_MINIMUM_BYTES + 2 * layer_size:
            continue
        with_space.append(g)
        allocations[g.index] += GPU_MINIMUM_BYTES + layer_size
    overflow = 0
    if with_space:
        allocations[with_space[0].index] += llama_projector
    else:
        overflow += llama_projector
    layer_count = 0
    for i in range(n_blocks - 1, -1, -1):
        layer_size = blocks[i] + kv[i]
        if 0 <= shape.num_gpu <= layer_count:
            overflow += layer_size
            continue
        for j in range(len(with_space), 0, -1):
            g = with_space[i % j]
            used = allocations[g.index] + graph_max
            if g.free_bytes > overhead_bytes + used + layer_size:
                allocations[g.index] += layer_size
                split[g.index] += 1
                layer_count += 1
                break
            del with_space[i % j]
        if not with_space:
            overflow += layer_size
    fully = layer_count >= n_blocks
    last = output + engine_projector + engine_projector_graph
    if last > 0:
        if shape.num_gpu < 0 or layer_count < shape.num_gpu:
            for j in range(len(with_space), 0, -1):
                g = with_space[layer_count % j]
                used = allocations[g.index] + graph_max
                if g.free_bytes > overhead_bytes + used + last:
                    allocations[g.index] += last
                    split[g.index] += 1
                    layer_count += 1
                    break
        if layer_count < n_blocks + 1:
            fully = False
            overflow += last
    for index, count in split.items():
        if count > 0:
            allocations[index] += full if fully else partial
    vram = sum(allocations.values())
    total = vram + overflow
    if not gpus or layer_count == 0:
        return 0, 0, {}, total
    return layer_count, vram, {i: a for i, a in allocations.items() if split[i] > 0}, total


def _classic(
    shape: LoadShape, gpus: Sequence[GpuView], overhead: int, require_full: bool, sched_spread: bool
) -> Outcome:
    n_layers = shape.spec.block_count + 1
    want = n_layers if shape.num_gpu < 0 else shape.num_gpu
    ordered = sorted(gpus, key=lambda g: -g.free_bytes)
    subsets = [ordered] if sched_spread else [ordered[:k] for k in range(1, len(ordered) + 1)]
    chosen: Sequence[GpuView] | None = None
    for subset in subsets:
        layers, _, _, _ = _classic_estimate(shape, subset, overhead)
        if layers > 0 and layers >= want:
            chosen = subset
            break
    if chosen is None:
        if require_full:
            return Outcome(needs_eviction=True)
        chosen = ordered
    layers, _, per_gpu, total = _classic_estimate(shape, chosen, overhead)
    if shape.num_gpu >= 0 and layers < min(shape.num_gpu, n_layers):
        # createGPULayers uses num_gpu, not the estimate: forcing more layers than fit is an OOM.
        return Outcome(error=RUNNER_OOM, out_of_memory=True)
    return Outcome(Allocation(per_gpu, total, layers, n_layers))


# ----------------------------------------------------------------------------------------- measured


def _fill(layer_bytes: Sequence[int], capacity: dict[int, int], order: Sequence[int]) -> dict[int, list[int]]:
    """Layers (from the last) onto GPUs in ``order``, spilling to the next when one is full."""
    placed: dict[int, list[int]] = {i: [] for i in order}
    gpu_pos = len(order) - 1
    free = capacity[order[gpu_pos]] if order else 0
    for layer in range(len(layer_bytes) - 1, -1, -1):
        while gpu_pos >= 0:
            if layer_bytes[layer] <= free:
                placed[order[gpu_pos]].append(layer)
                free -= layer_bytes[layer]
                break
            gpu_pos -= 1
            free = capacity[order[gpu_pos]] if gpu_pos >= 0 else 0
        if gpu_pos < 0:
            break
    return placed


def _place_last(
    layer_bytes: Sequence[int], want: int, capacity: dict[int, int], order: Sequence[int]
) -> dict[int, list[int]]:
    """The last ``want`` layers (the output layer among them) filled over ``order``: GPU -> layer indexes."""
    n_layers = len(layer_bytes)
    trial = _fill(layer_bytes[n_layers - want :], capacity, order) if want and order else {}
    return {i: [n_layers - want + x for x in layers] for i, layers in trial.items()}


def _buffers(
    ordered: Sequence[GpuView],
    placed: dict[int, list[int]],
    layer_bytes: Sequence[int],
    per_gpu: int,
    first_gpu_extra: int,
) -> tuple[dict[int, int], int]:
    """Each GPU holding layers: their bytes + ``per_gpu`` (+ ``first_gpu_extra`` on the first); and
    the bytes of the layers left on the CPU."""
    vram: dict[int, int] = {}
    for g in ordered:
        layers = placed.get(g.index, [])
        if layers:
            vram[g.index] = sum(layer_bytes[i] for i in layers) + per_gpu + (0 if vram else first_gpu_extra)
    on_gpu = {i for layers in placed.values() for i in layers}
    return vram, sum(b for i, b in enumerate(layer_bytes) if i not in on_gpu)


def _measured(
    shape: LoadShape,
    gpus: Sequence[GpuView],
    overhead: int,
    require_full: bool,
    sched_spread: bool,
    ollama_engine: bool,
) -> Outcome:
    spec = shape.spec
    ctx = shape.context_length
    batch = min(ctx, shape.num_batch)
    if spec.pooling_type is not None:
        batch = ctx  # an embedding model's batch is its whole context (llamaServer.Load@v0.20.0)
    kv_type = shape.kv_cache_type if shape.flash_attention else ""
    kv, partial, full = graph_size(spec, ctx, batch, shape.num_parallel, kv_type, swa_cache=ollama_engine)
    sizes = spec.layers
    layer_bytes = [w + c for w, c in zip(sizes.blocks_bytes, kv, strict=True)]
    projector = spec.projector_bytes + (vision_graph(spec)[0] if ollama_engine else 0)
    layer_bytes.append(sizes.output_bytes)
    input_weights = sizes.token_embd_bytes if ollama_engine and not sizes.output_tied else 0
    n_layers = len(layer_bytes)
    graph = max(partial, full)
    buffer = 0 if ollama_engine else (sizes.blocks_bytes[0] + kv[0] if sizes.blocks_bytes else 0)
    ordered = sorted(gpus, key=lambda g: -g.free_bytes)
    want = n_layers if shape.num_gpu < 0 else min(shape.num_gpu, n_layers)
    capacity: dict[int, int] = {}
    for pos, g in enumerate(ordered):
        reserved = GPU_MINIMUM_BYTES + overhead + graph + buffer + (projector if pos == 0 else 0)
        capacity[g.index] = max(0, g.free_bytes - reserved)
    placed: dict[int, list[int]] = {}
    counts = range(len(ordered), len(ordered) + 1) if sched_spread else range(1, len(ordered) + 1)
    for k in counts:
        order = [g.index for g in ordered[:k]]
        placed = _place_last(layer_bytes, want, capacity, order)
        if sum(len(v) for v in placed.values()) >= want:
            break
    on_gpu = sum(len(v) for v in placed.values())
    if require_full and ordered and on_gpu < n_layers and (shape.num_gpu < 0 or on_gpu < shape.num_gpu):
        return Outcome(needs_eviction=True)
    if shape.num_gpu >= 0 and on_gpu < want and ordered:
        return Outcome(error=RUNNER_OOM, out_of_memory=True)
    fully = on_gpu >= n_layers
    graph_used = full if fully else partial
    vram, cpu = _buffers(ordered, placed, layer_bytes, graph_used, projector)
    if not vram:
        cpu += projector
    total = input_weights + cpu + sum(vram.values())
    if fully and vram:
        # MemorySize@v0.20.0: with no CPU layers the always-on-CPU parts count as offloaded too.
        first_gpu = next(iter(vram))
        vram[first_gpu] += input_weights
    return Outcome(Allocation(vram, total, on_gpu, n_layers))


# ------------------------------------------------------------------------------------- llama-server


def predict_llama_server_vram(spec: ModelSpec, context_tokens: int) -> int:
    """PredictServerVRAM (llm/llama_server.go@v0.30.0): file size + f16 KV, no graph.

    ``context_tokens`` is ``effectiveLlamaServerContext``: min(num_ctx, trained) x num_parallel.
    """
    hkv_min = min(spec.kv_heads_per_layer) if spec.kv_heads_per_layer else 1
    kv_heads = hkv_min or 1
    head_dim = spec.embedding_length // max(1, spec.head_count)
    kv_cache = 2 * spec.block_count * kv_heads * head_dim * context_tokens * 2
    return spec.file_size_bytes - spec.projector_bytes + kv_cache


def generation_batch_surcharge(batch: int) -> int:
    """generationBatchSurcharge (server/sched.go@v0.30.0)."""
    if batch >= 2048:
        return 2 * GIB
    if batch >= 1024:
        return 768 * MIB
    return 0


def automatic_generation_batch(
    effective_ctx: int, predicted: int, available: int, *, flash_attention: bool, small_cuda: bool
) -> int:
    """automaticGenerationBatch (server/sched.go@v0.30.0): 2048/1024/512 by context, if it fits."""
    if not flash_attention:
        return 256 if effective_ctx > 4096 and small_cuda else 512
    batch = 2048 if effective_ctx > 32768 else 1024 if effective_ctx > 4096 else 512

    def fits(b: int) -> bool:
        if predicted == 0 or available == 0:
            return True
        threshold = available * 80 // 100
        if predicted > threshold:
            return False
        headroom = 60 if b >= 2048 else 75 if b >= 1024 else 100
        if predicted > available * headroom // 100:
            return False
        return generation_batch_surcharge(b) <= threshold - predicted

    while batch > 512 and not fits(batch):
        batch = 1024 if batch > 1024 else 512
    return batch


def _llama_server(shape: LoadShape, gpus: Sequence[GpuView], ram_free_bytes: int) -> Outcome:
    spec = shape.spec
    ctx = shape.context_length
    ubatch = min(512, max(1, shape.num_batch))
    kv_type = shape.kv_cache_type or "f16"
    b = kv_bytes_per_element(kv_type)
    cells = ctx * shape.num_parallel
    window = spec.sliding_window * shape.num_parallel + ubatch
    window = -(-window // 256) * 256  # llama.cpp pads the SWA cache to 256 cells
    dk, dv = spec.head_dim_k, spec.head_dim_v
    kv: list[int] = []
    for i, hkv in enumerate(spec.kv_heads_per_layer):
        if hkv == 0:
            kv.append(_recurrent_state_bytes(spec) * shape.num_parallel)
            continue
        n = min(cells, window) if spec.sliding_layers[i] else cells
        kv.append(int(n * (dk + dv) * hkv * b))
    sizes = spec.layers
    vision_weights = sizes.vision_bytes + spec.projector_bytes
    # The compute buffer is dominated by the logits of one micro-batch (llama3-8B: 258 MiB at 512).
    compute = 4 * ubatch * (spec.embedding_length + spec.vocab_size)
    layer_bytes = [w + c for w, c in zip(sizes.blocks_bytes, kv, strict=True)] + [sizes.output_bytes]
    n_layers = len(layer_bytes)
    cpu_only_parts = sizes.token_embd_bytes if not sizes.output_tied else 0
    ordered = sorted(gpus, key=lambda g: -g.free_bytes)
    want = n_layers if shape.num_gpu < 0 else min(shape.num_gpu, n_layers)
    capacity: dict[int, int] = {}
    for pos, g in enumerate(ordered):
        reserved = FIT_MARGIN_BYTES + compute + (vision_weights if pos == 0 else 0)
        capacity[g.index] = max(0, g.free_bytes - reserved)
    if shape.num_gpu >= 0:
        # -ngl N: no fitting; the layers go to the GPUs whatever their free memory says.
        capacity = {i: c + FIT_MARGIN_BYTES for i, c in capacity.items()}
    order = [g.index for g in ordered]
    placed = _place_last(layer_bytes, want, capacity, order)
    on_gpu = sum(len(v) for v in placed.values())
    if shape.num_gpu >= 0 and on_gpu < want:
        return Outcome(error=LLAMA_SERVER_OOM, out_of_memory=True)
    vram, on_cpu = _buffers(ordered, placed, layer_bytes, compute, vision_weights)
    if not vram:
        on_cpu += compute + vision_weights
    if on_cpu + cpu_only_parts > ram_free_bytes:
        return Outcome(error=LLAMA_SERVER_RAM_OOM, out_of_memory=True)
    fully = on_gpu >= n_layers
    # MemorySize@v0.30.0: all layers offloaded, nothing overflowing -> total is the GPU buffers only.
    total = sum(vram.values()) if fully and vram else sum(vram.values()) + on_cpu + cpu_only_parts
    return Outcome(Allocation(vram, total, on_gpu, n_layers))


# ------------------------------------------------------------------------------- the daemon's engine


def _classic_engine(
    shape: LoadShape, gpus: Sequence[GpuView], engine: EngineView, require_full: bool, sched_spread: bool
) -> Outcome:
    """pickBestFullFitByLibrary + estimateGPULayers with the engine's port (gpu_router.memory.classic)."""
    assert engine.classic is not None
    n_layers = shape.spec.block_count + 1
    want = n_layers if shape.num_gpu < 0 else shape.num_gpu
    ordered = sorted(gpus, key=lambda g: -g.free_bytes)
    subsets = [ordered] if sched_spread else [ordered[:k] for k in range(1, len(ordered) + 1)]
    chosen: Sequence[GpuView] | None = None
    for subset in subsets:
        trial = estimate_gpu_layers([g.free_bytes for g in subset], engine.classic, shape.num_gpu)
        if trial.layers > 0 and trial.layers >= want:
            chosen = subset
            break
    if chosen is None:
        if require_full:
            return Outcome(needs_eviction=True)
        chosen = ordered
    placed = estimate_gpu_layers([g.free_bytes for g in chosen], engine.classic, shape.num_gpu)
    if shape.num_gpu >= 0 and placed.layers < min(shape.num_gpu, n_layers):
        return Outcome(error=RUNNER_OOM, out_of_memory=True)
    per_gpu = {
        g.index: placed.gpu_bytes[i]
        for i, g in enumerate(chosen)
        if placed.tensor_split[i] > 0 and placed.layers
    }
    return Outcome(Allocation(per_gpu, placed.total_bytes, placed.layers, n_layers))


def _engine_full_fit(
    shape: LoadShape, gpus: Sequence[GpuView], engine: EngineView, sched_spread: bool
) -> Outcome | None:
    """A full offload judged by the engine's need (one GPU first, then the fewest that hold it).

    None when it does not fit, or when ``num_gpu`` asks for a partial offload: the emulator's own
    layer placement answers those.
    """
    est = engine.estimate
    n_layers = shape.spec.block_count + 1
    if 0 <= shape.num_gpu < n_layers:
        return None
    ordered = sorted(gpus, key=lambda g: -g.free_bytes)
    counts = [len(ordered)] if sched_spread else list(range(1, len(ordered) + 1))
    for k in counts:
        chosen = ordered[:k]
        if est.span_need_bytes(k) > sum(g.free_bytes for g in chosen):
            continue
        if k > 1 and any(g.free_bytes < est.extra_gpu_bytes for g in chosen):
            continue
        # every GPU used holds its share of the layers and a graph of its own
        total = est.ps_size_bytes + (k - 1) * est.graph_bytes
        free = sum(g.free_bytes for g in chosen)
        shares = [total * g.free_bytes // free for g in chosen]
        shares[0] += total - sum(shares)
        return Outcome(
            Allocation({g.index: b for g, b in zip(chosen, shares, strict=True)}, total, n_layers, n_layers)
        )
    return None


# ----------------------------------------------------------------------------------------- the seam


def allocate(
    era: str,
    shape: LoadShape,
    gpus: Sequence[GpuView],
    *,
    require_full: bool,
    gpu_overhead_bytes: int = 0,
    sched_spread: bool = False,
    ollama_engine: bool = False,
    ram_free_bytes: int = 2**62,
    engine: EngineView | None = None,
) -> Outcome:
    """What loading ``shape`` on ``gpus`` gives in ``era`` (no GPUs = a CPU load).

    ``require_full`` is the scheduler's flag when other models are loaded (ErrLoadRequiredFull):
    the classic and measured eras then ask for an eviction instead of a partial load; llama-server
    ignores it (its pre-load check is the scheduler's, :func:`predict_llama_server_vram`).
    """
    if era not in ERAS:
        raise ValueError(f"unknown era {era!r}")
    if not gpus or shape.num_gpu == 0:
        return _cpu(era, shape, ram_free_bytes)
    out: Outcome | None = None
    if engine is not None and era == CLASSIC and engine.classic is not None:
        out = _classic_engine(shape, gpus, engine, require_full, sched_spread)
    elif engine is not None and era != CLASSIC:
        out = _engine_full_fit(shape, gpus, engine, sched_spread)
        if out is None and require_full and era == MEASURED:
            out = Outcome(needs_eviction=True)
    if out is None and era == CLASSIC:
        out = _classic(shape, gpus, gpu_overhead_bytes, require_full, sched_spread)
    elif out is None and era == MEASURED:
        out = _measured(shape, gpus, gpu_overhead_bytes, require_full, sched_spread, ollama_engine)
    elif out is None:
        out = _llama_server(shape, gpus, ram_free_bytes)
    if out.allocation is not None and era != LLAMA_SERVER:
        cpu_part = out.allocation.total_bytes - out.allocation.size_vram_bytes
        if cpu_part > ram_free_bytes:
            return Outcome(error=_ram_message(cpu_part, ram_free_bytes))
    return out


def _cpu(era: str, shape: LoadShape, ram_free_bytes: int) -> Outcome:
    spec = shape.spec
    ctx = shape.context_length
    batch = min(ctx, shape.num_batch)
    kv, _, _ = graph_size(spec, ctx, batch, shape.num_parallel, "", swa_cache=era != CLASSIC)
    sizes = spec.layers
    # estimateGPULayers with no GPU: every layer overflows, no graph (llm/memory.go@v0.12.10).
    total = sum(sizes.blocks_bytes) + sum(kv) + sizes.output_bytes + spec.projector_bytes + sizes.vision_bytes
    if era != CLASSIC and not sizes.output_tied:
        total += sizes.token_embd_bytes
    if total > ram_free_bytes:
        if era == LLAMA_SERVER:
            return Outcome(error=LLAMA_SERVER_RAM_OOM, out_of_memory=True)
        return Outcome(error=_ram_message(total, ram_free_bytes))
    return Outcome(Allocation({}, total, 0, spec.block_count + 1))


def _human_bytes2(n: int) -> str:
    # format.HumanBytes2: binary units, one decimal.
    value = float(max(0, n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _ram_message(required: int, available: int) -> str:
    # llamaServer.Load@v0.12.6 / verifyLayout@v0.20.0
    return (
        f"model requires more system memory ({_human_bytes2(required)}) "
        f"than is available ({_human_bytes2(max(0, available))})"
    )


__all__ = [
    "CLASSIC",
    "ERAS",
    "FIT_MARGIN_BYTES",
    "LLAMA_SERVER",
    "LLAMA_SERVER_OOM",
    "MEASURED",
    "RUNNER_OOM",
    "Allocation",
    "GpuView",
    "LoadShape",
    "Outcome",
    "allocate",
    "automatic_generation_batch",
    "generation_batch_surcharge",
    "graph_size",
    "kv_bytes_per_element",
    "predict_llama_server_vram",
    "vision_graph",
]
