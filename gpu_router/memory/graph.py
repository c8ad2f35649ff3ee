"""Ollama's ``GraphSize`` and ``VisionGraphSize``: KV cache per layer and compute-graph sizes. Pure.

A port of ``fs/ggml/ggml.go@v0.12.10`` ``GraphSize`` with every per-architecture case, plus the
earlier variants the classic era used (read with ``git log -L`` over that function):

- before v0.11.11 (7b91c9ce5) every layer's KV uses the largest KV head count, and there are no
  recurrent layers; from v0.11.11 the per-layer head counts apply and a layer without heads is a
  recurrent (state-space) layer sized from ``ssm.*`` in f32;
- gemma3's sliding-window layers are sized to the window from v0.6.3 (f66216e39);
- gpt-oss (v0.11.0 fa7776fd2): full graph 4*H/Hkv*KV/6 and partial twice that; equal from v0.11.3
  (fcec04bf4); from v0.11.5 only a partial graph of 2*H/Hkv*KV/6; from v0.11.8 (85ccf7354) a flat
  estimate with flash attention on.

Go computes in uint64 left to right; ``//`` on non-negative ints reproduces it exactly.
"""

from __future__ import annotations

from gpu_router.memory.shapes import Shape
from gpu_router.memory.version import Version
from gpu_router.records import record
from gpu_router.state import MIB, ModelInfo

# fs/ggml/ggml.go@v0.12.10 kvCacheBytesPerElement: the classic estimator's rounded sizes.
CLASSIC_KV_BYTES: dict[str, float] = {"q8_0": 1.0, "q4_0": 0.5, "f32": 4.0}


def classic_kv_bytes(kv_type: str) -> float:
    """Bytes per KV element as ``kvCacheBytesPerElement`` has them (f16 for anything else)."""
    return CLASSIC_KV_BYTES.get(kv_type, 2.0)


@record
class Graph:
    """GraphSize's answer: KV per layer, and the partial/full-offload graph (0 = no case)."""

    kv: tuple[int, ...]
    partial: int
    full: int

    @property
    def kv_total(self) -> int:
        """Sum of the per-layer KV."""
        return sum(self.kv)


def recurrent_state_bytes(info: ModelInfo) -> int:
    """One recurrent layer's state in f32, as ``GraphSize`` sizes it (v0.11.11+)."""
    ssm = info.ssm
    if ssm is None:
        return 0
    n_embd_r = 0
    if ssm.conv_kernel > 0:
        n_embd_r = (ssm.conv_kernel - 1) * (ssm.inner_size + 2 * ssm.group_count * ssm.state_size)
    n_embd_s = ssm.state_size * ssm.inner_size
    return (n_embd_r + n_embd_s) * 4


def graph_size(
    shape: Shape,
    info: ModelInfo,
    v: Version,
    context: int,
    batch: int,
    parallel: int,
    kv_bytes: float,
    flash_attention: bool,
) -> Graph:
    """``GraphSize(context, batch, numParallel, kvCacheType, useFlashAttention)``.

    ``context`` is the per-slot context; GraphSize multiplies it by ``parallel`` (from v0.11.5;
    before, the scheduler multiplied ``num_ctx`` itself, to the same effect).
    """
    arch = shape.arch
    ctx = context * parallel
    embedding = shape.embedding
    heads = shape.heads_max
    heads_kv = shape.heads_kv_max
    vocab = shape.vocab
    embedding_heads = shape.embedding_heads
    dk, dv = shape.key_length, shape.value_length

    kv = [0] * shape.layers
    uniform_total = 0
    per_layer = v >= (0, 11, 11)
    recurrent = recurrent_state_bytes(info)
    for i in range(shape.layers):
        h, hkv = (shape.heads[i], shape.heads_kv[i]) if per_layer else (1, heads_kv)
        if h > 0 and hkv > 0:
            kv[i] = int(float(ctx * (dk + dv) * hkv) * kv_bytes)
        else:
            kv[i] = recurrent
        uniform_total += kv[i]

    partial = full = 0
    if arch in ("llama", "llama4"):
        full = max(4 * batch * (1 + 4 * embedding + ctx * (1 + heads)), 4 * batch * (embedding + vocab))
        partial = 4 * batch * embedding + max(
            4 * batch * (1 + embedding + max(ctx, embedding))
            + embedding * embedding * 9 // 16
            + 4 * ctx * (batch * heads + embedding_heads * heads_kv),
            4 * batch * (embedding + vocab) + embedding * vocab * 105 // 128,
        )
        t = info.tensors
        if t is not None and t.ffn_gate_exps_bytes:
            # mixtral 8x22b
            ff = shape.feed_forward
            partial = max(
                3 * t.ffn_gate_exps_bytes
                + 4 * batch * (2 * ff + heads_kv + embedding + ctx + embedding_heads * heads_kv),
                4
                * (
                    ctx * batch * heads
                    + ctx * embedding_heads * heads_kv
                    + batch * 1024
                    + embedding_heads * heads_kv * batch
                ),
            )
        elif t is not None and t.ffn_gate0_width:
            # mixtral 8x7b
            w1 = t.ffn_gate0_width
            full = 4 * batch * (2 + 3 * embedding + ctx * (1 + heads) + 2 * heads_kv + w1)
            partial = max(
                4 * batch * (3 + embedding_heads * heads_kv + embedding + ctx * (1 + heads) + w1)
                + (embedding * embedding + 3 * embedding * heads_kv * w1) * 9 // 16,
                4 * batch * (1 + 2 * embedding + ctx * (1 + heads))
                + embedding * (6 * ctx * heads_kv // heads + embedding * 9 // 16),
            )
    elif arch == "mllama":
        vision_tokens, tiles = 1601, 4
        cross = set(info.tensors.cross_attention_layers) if info.tensors else set()
        for i in range(shape.layers):
            if i in cross:
                kv[i] = heads_kv * (dk + dv) * 4 * vision_tokens * tiles
        full = max(
            4 * batch * (2 + 3 * embedding + dk * heads + ctx * (1 + heads)),
            4 * batch * (embedding + vocab),
        )
        rope = info.tensors.rope_freqs_elements if info.tensors else 0
        partial = max(
            4 * (batch * (2 * embedding + 1 + ctx * (1 + heads) + dk * heads) + rope + dk * ctx * heads_kv),
            4 * batch * (embedding + vocab) + embedding * vocab * 105 // 128,
        )
    elif arch in ("gemma", "gemma2", "gemma3", "gemma3n"):
        full = max(
            4 * batch * (embedding + vocab),
            4 * batch * (2 + ctx + ctx * heads + 2 * embedding + 2 * dk * heads),
        )
        partial = max(
            4 * embedding * batch + embedding * vocab * 105 // 128 + 4 * vocab * batch,
            4 * batch * (2 * embedding + 1 + 2 * dk * heads + ctx + ctx * heads)
            + 4 * dk * ctx * 8
            + embedding * dk * heads * 9 // 16,
        )
        if arch == "gemma3n":
            full *= 4
            partial *= 4
        # Gemma2 also slides, but only the Ollama engine had a sliding cache; gemma3 always used it.
        if arch == "gemma3" and v >= (0, 6, 3):
            window = parallel * (info.sliding_window or 0) + batch
            for i in range(shape.layers):
                if (i + 1) % 6 != 0:
                    kv[i] = int(float(window * (dk + dv) * heads_kv) * kv_bytes)
    elif arch == "command-r":
        full = max(4 * batch * (embedding + vocab), 4 * batch * (2 + 4 * embedding + ctx * (1 + heads)))
        partial = max(
            4 * batch * (embedding + vocab) + embedding * vocab * 105 // 128,
            4 * batch * (1 + 2 * embedding + ctx * (1 + heads))
            + 4 * embedding * ctx
            + embedding * embedding * 9 // 16,
        )
    elif arch == "qwen2":
        full = max(4 * batch * (embedding + vocab), 4 * batch * (1 + 2 * embedding + ctx + ctx * heads))
        partial = max(
            4 * batch * (embedding + vocab) + embedding * vocab * 105 // 128,
            4 * (batch * (1 + 2 * embedding + ctx * (1 + heads)) + embedding * (1 + ctx)),
        )
    elif arch == "phi2":
        full = max(4 * batch * (embedding + vocab), 4 * batch * (1 + 4 * embedding + ctx + ctx * heads))
        partial = max(
            4 * batch * (2 * embedding + vocab) + embedding * vocab * 105 // 128,
            4 * batch * (2 + 3 * embedding + ctx + ctx * heads),
        )
    elif arch == "stablelm":
        full = 4 * batch * (ctx * (1 + heads) + 3 * embedding + 2)
        partial = max(4 * batch * (vocab + 2 * embedding), full)
    elif arch == "deepseek2":
        full = max(
            4 * batch * (3 * embedding + vocab),
            4 * batch * (3 * embedding + 2 + ctx * (1 + heads_kv) + 2 * dk * heads_kv),
        )
        partial = max(
            4 * batch * (3 * embedding + vocab) + embedding * vocab * 105 // 128,
            4 * batch * (2 * embedding + 1 + 2 * dk * heads_kv + ctx + ctx * heads_kv)
            + 4 * dk * ctx * heads_kv
            + embedding * dk * heads_kv * 9 // 16,
        )
    elif arch == "chatglm":
        full = 4 * batch * (embedding + vocab)
        partial = 4 * batch * (embedding + vocab) + embedding * vocab * 105 // 128
        bias = info.tensors.attn_qkv_bias_len if info.tensors else 0
        if bias:
            full = max(full, 4 * batch * (2 + 2 * embedding + ctx + ctx * heads + dk * heads + bias))
            partial = max(
                partial,
                4 * batch * (1 + 2 * embedding + dk * heads + ctx + ctx * heads)
                + 4 * dk * ctx
                + 4 * ctx * dk
                + 4 * bias,
            )
    elif arch in ("gptoss", "gpt-oss") and v >= (0, 11, 0):
        for i in range(shape.layers):
            per_token = int(float((dk + dv) * heads_kv) * kv_bytes)
            kv[i] = per_token * (parallel * 4096 + batch if i % 2 == 0 else ctx)
        ratio = max(shape.heads_kv_min, 1)
        if v < (0, 11, 3):
            full = 4 * shape.heads_max // ratio * uniform_total // 6
            partial = 2 * full
        elif v < (0, 11, 5):
            full = 4 * shape.heads_max // ratio * uniform_total // 6
            partial = full
        else:
            partial = 2 * shape.heads_max // ratio * uniform_total // 6
            if flash_attention and v >= (0, 11, 8):
                # "rough estimate of graph size with flash attention on"
                partial = (4 * parallel + (ctx >> 10) + 110) * MIB
    return Graph(tuple(kv), partial, full)


def with_fallback(graph: Graph, shape: Shape) -> Graph:
    """``estimateGPULayers``: an architecture without a case gets GQA x KV / 6 for both graphs."""
    partial, full = graph.partial, graph.full
    if partial == 0:
        gqa = shape.heads_max // max(shape.heads_kv_min, 1)
        partial = gqa * graph.kv_total // 6
    if full == 0:
        full = partial
    return Graph(graph.kv, partial, full)


# The release that gave each architecture its VisionGraphSize case (gemma3 033cec232, mistral3
# 6bd0a983c, qwen25vl with its own model in v0.7.0); mllama had one from the start.
_VISION_GRAPH_SINCE: dict[str, Version] = {"gemma3": (0, 6, 1), "mistral3": (0, 6, 5), "qwen25vl": (0, 7, 0)}


def vision_graph_size(shape: Shape, info: ModelInfo, v: Version = (0, 12, 10)) -> tuple[int, int]:
    """``VisionGraphSize`` (fs/ggml/ggml.go@v0.12.10): vision weights and the encoder's graph."""
    vis = info.vision
    if vis is None or vis.block_count == 0:
        return 0, 0
    weights = shape.vision_bytes
    if vis.patch_size == 0:
        return weights, 0
    image, patch, channels = vis.image_size, vis.patch_size, vis.num_channels
    patches = (image // patch) * (image // patch)
    if info.tensors is not None and info.tensors.class_embd:
        patches += 1
    heads, width = vis.head_count, vis.embedding_length
    graph = 0
    if v < (0, 6, 1) and shape.arch != "mllama":
        return 0, 0  # VisionGraphSize@v0.6.0 knew only mllama
    if v < _VISION_GRAPH_SINCE.get(shape.arch, (0, 0, 0)):
        return weights, 0
    if shape.arch == "mllama":
        padded = patches + 8 - (patches % 8) % 8
        tiles = vis.max_num_tiles
        graph = 4 * (
            8
            + image * image * channels * tiles
            + width * patches * tiles
            + 9 * width * padded * tiles
            + padded * tiles * padded * tiles * heads
        )
    elif shape.arch in ("gemma3", "mistral3"):
        graph = 4 * (image * image * channels + width * patch + patches * patches * heads)
    elif shape.arch == "qwen25vl":
        max_pixels = vis.max_pixels or 28 * 28 * 1280
        n = max_pixels // (patch * patch)
        graph = 4 * (
            max_pixels * channels
            + max_pixels * channels
            + n * channels * patch * patch
            + n * n * heads
            + width * n
        )
    return weights, graph
