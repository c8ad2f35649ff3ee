"""KV caches as the runners allocate them: the Ollama engine's ``kvcache`` and llama.cpp's. Pure.

The classic estimator's KV is ``GraphSize``'s (graph.py). The Ollama engine (v0.11.11 - v0.29) and
llama-server (v0.30+) allocate real buffers, with sliding-window layers holding only their window:

- Ollama engine, ``kvcache/causal.go@v0.20.0`` Causal.Init: a full layer holds
  ``slots x num_ctx`` cells, a sliding-window layer ``slots x window + batch`` (``NewSWAMemCache``
  keeps 4096 instead of the window for gpt-oss and gemma4; with more than one slot at least
  window + 1), rounded up to the backend's padding of 256 (``ml/backend/ggml/ggml.go@v0.20.0``
  CacheConfig); a window no smaller than the context is a full layer.
- llama.cpp (llama-server): each of the ``slots`` sequences has its own stream of ``num_ctx``
  cells; a sliding-window layer keeps ``window + ubatch`` cells per stream, padded to 256. Observed
  (ollama-observations row 67, gpt-oss:120b at 131072 x 2): 9216 MiB for 18 full layers of 131072
  cells and 2 streams, and 90 MiB for 18 sliding layers of 1280 = pad256(128 + 1024) cells.
"""

from __future__ import annotations

from gpu_router.memory.graph import recurrent_state_bytes
from gpu_router.memory.shapes import Shape
from gpu_router.state import ModelInfo

CACHE_PADDING = 256
# Architectures whose sliding-window cache keeps 4096 positions (NewSWAMemCache(window, 4096)).
_SWA_MEMORY_4096 = frozenset({"gptoss", "gpt-oss", "gemma4"})
# llama.cpp's encoder-only embedding architectures: no KV cache at all (llama_model::create_memory).
NON_CAUSAL_ARCHS = frozenset(
    {
        "bert",
        "nomic-bert",
        "nomic-bert-moe",
        "jina-bert-v2",
        "jina-bert-v3",
        "neo-bert",
        "modern-bert",
        "t5encoder",
        "gemma-embedding",
    }
)


def round_up(n: int, to: int) -> int:
    """``roundUp``/``GGML_PAD``."""
    return -(-n // to) * to


def sliding_layers(shape: Shape, info: ModelInfo) -> tuple[bool, ...]:
    """Which layers use a sliding-window cache.

    The GGUF's ``attention.sliding_window_pattern`` when /api/show has it (it is an array, so
    usually blanked), else the pattern the model code hard-wires: gemma3 (model_text.go: every 6th
    layer global), gemma2 and gpt-oss (even layers slide), gemma3n (llama.cpp: 4 of every 5),
    cohere2/olmo3 (3 of every 4); gemma4 from the key width of each layer's attn_k tensor.
    """
    n = shape.layers
    if not info.sliding_window:
        return (False,) * n
    if len(info.sliding_window_pattern) == n:
        return info.sliding_window_pattern
    arch = shape.arch
    if arch == "gemma3":
        return tuple((i + 1) % 6 != 0 for i in range(n))
    if arch in ("gemma2", "gptoss", "gpt-oss"):
        return tuple(i % 2 == 0 for i in range(n))
    if arch == "gemma3n":
        return tuple(i % 5 < 4 for i in range(n))
    if arch in ("cohere2", "olmo3"):
        return tuple(i % 4 < 3 for i in range(n))
    if arch == "gemma4":
        widths = info.tensors.attn_k_widths if info.tensors else ()
        swa_len = info.key_length_swa
        if widths and swa_len and len(widths) == n:
            return tuple(w > 0 and w == shape.heads_kv[i] * swa_len for i, w in enumerate(widths))
        return tuple((i + 1) % 6 != 0 for i in range(n))
    return (False,) * n


def _head_dims(shape: Shape, info: ModelInfo, swa: bool) -> tuple[int, int]:
    if swa and info.key_length_swa:
        return info.key_length_swa, info.value_length_swa or info.key_length_swa
    return shape.key_length, shape.value_length


def _owns_cache(shape: Shape, info: ModelInfo, i: int) -> bool:
    """gemma3n/gemma4 share the cache of an earlier layer in their last ``shared_kv_layers``."""
    return not (info.shared_kv_layers and i >= shape.layers - info.shared_kv_layers)


def ollama_engine_cache(
    shape: Shape, info: ModelInfo, context: int, parallel: int, batch: int, kv_bytes: float
) -> tuple[int, ...]:
    """Bytes of each layer's cache in the Ollama engine (``kvcache`` Causal/SWA/Wrapper).

    The encoder models (``model/models/bert``, ``nomicbert`` at v0.20.0) have no cache at all.
    """
    if shape.arch in NON_CAUSAL_ARCHS:
        return (0,) * shape.layers
    swa = sliding_layers(shape, info)
    window = info.sliding_window or 0
    memory = 4096 if shape.arch in _SWA_MEMORY_4096 else window
    if memory and parallel > 1:
        memory = max(memory, window + 1)
    cross = set(info.tensors.cross_attention_layers) if info.tensors else set()
    recurrent = recurrent_state_bytes(info) * parallel
    out = []
    for i in range(shape.layers):
        hkv = shape.heads_kv[i]
        if i in cross and shape.arch == "mllama":
            # the encoder cache holds the image tokens: 1601 x 4 tiles, f32 (GraphSize@v0.12.10)
            out.append(shape.heads_kv_max * (shape.key_length + shape.value_length) * 4 * 1601 * 4)
            continue
        if hkv <= 0:
            out.append(recurrent)
            continue
        if not _owns_cache(shape, info, i):
            out.append(0)
            continue
        if swa[i] and memory and memory < context:
            cells = round_up(parallel * memory + batch, CACHE_PADDING)
        else:
            cells = round_up(parallel * context, CACHE_PADDING)
        dk, dv = _head_dims(shape, info, swa[i])
        out.append(int(cells * hkv * (dk + dv) * kv_bytes))
    return tuple(out)


def llama_cpp_cache(
    shape: Shape, info: ModelInfo, context: int, parallel: int, ubatch: int, kv_bytes: float
) -> tuple[tuple[int, ...], int]:
    """llama.cpp's KV (and recurrent-state) bytes per layer, and the cells one stream spans."""
    if shape.arch in NON_CAUSAL_ARCHS or info.causal is False:
        return (0,) * shape.layers, 0
    swa = sliding_layers(shape, info)
    window = info.sliding_window or 0
    # -c is num_ctx x slots, padded to 256 and split into one stream per slot
    total = round_up(context * parallel, CACHE_PADDING)
    swa_total = min(total, parallel * round_up(window + ubatch, CACHE_PADDING)) if window else total
    recurrent = recurrent_state_bytes(info) * parallel
    out = []
    largest = 0
    for i in range(shape.layers):
        hkv = shape.heads_kv[i]
        if hkv <= 0:
            out.append(recurrent)
            continue
        if not _owns_cache(shape, info, i):
            out.append(0)
            continue
        cells = swa_total if swa[i] else total
        largest = round_up(context, CACHE_PADDING)  # one stream's cells: what attention spans
        dk, dv = _head_dims(shape, info, swa[i])
        out.append(int(cells * hkv * (dk + dv) * kv_bytes))
    return tuple(out), largest
