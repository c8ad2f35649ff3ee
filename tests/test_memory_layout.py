"""The layout eras (v0.11.11 - v0.29): llm/server.go memory layouts for the llama and Ollama engines.

The llama engine's layout is synthesised from GraphSize (llm/server.go@v0.20.0 llamaServer.Load)
and is checked exactly. The Ollama engine allocates real buffers: its weights per layer
(ml/backend/ggml/ggml.go@v0.20.0) and its cache (kvcache/causal.go@v0.20.0) are checked exactly;
its compute graph is measured by the runner, so the engine approximates it, and the tests restate
that approximation (engine.py _ollama_engine) rather than an Ollama formula.
"""

from __future__ import annotations

from typing import Any

from model_shapes import (
    gemma2_9b,
    gemma3_4b,
    gpt_oss_20b,
    group_sums,
    load_show,
    nomic_embed_text,
    qwen3_30b_a3b,
)

from gpu_router.memory import Era, NodeProfile, OllamaEnv, estimate_memory, parse_ollama_env
from gpu_router.ollama import parse_show
from gpu_router.state import GIB, MIB

MINIMUM = 457 * MIB  # ml/device.go@v0.20.0 MinimumMemory


def node(version: str, gib: int = 24, env: OllamaEnv | None = None) -> NodeProfile:
    return NodeProfile(version, (gib * GIB,), env or OllamaEnv())


def estimate(body: dict[str, Any], file_bytes: int, version: str, ctx: int | None, **kw: Any):
    e = estimate_memory(parse_show(body, "m"), file_bytes, node(version, **kw), num_ctx=ctx)
    assert e is not None
    return e


def round_up(n: int, to: int = 256) -> int:
    """kvcache roundUp to the ggml backend's CachePadding of 256."""
    return -(-n // to) * to


def test_llama_engine_layout_reserves_buffer_minimum_and_graph_but_reports_only_the_model():
    body = load_show("mistral_7b")
    g = group_sums(body)
    ctx, layers, e, h, hkv, vocab = 8192, 32, 4096, 32, 8, 32768
    kv = ctx * 256 * hkv * 2  # GraphSize: context * (K + V) * headsKV * 2 (f16)
    b = 512
    full = max(4 * b * (1 + 4 * e + ctx * (1 + h)), 4 * b * (e + vocab))
    partial = 4 * b * e + max(
        4 * b * (1 + e + max(ctx, e)) + e * e * 9 // 16 + 4 * ctx * (b * h + (e // h) * hkv),
        4 * b * (e + vocab) + e * vocab * 105 // 128,
    )
    blocks = sum(g[f"blk.{i}"] for i in range(layers))
    output = g["output_norm"] + g["output"]
    buffer = g["blk.0"] + kv
    est = estimate(body, 4_372_824_384, "0.16.1", ctx)
    assert est.era is Era.LAYOUT
    assert est.engine == "llama"
    # llamaServer.Load: every GPU's free space loses the buffer layer, then buildLayout reserves
    # minimum + overhead + max(partial, full) graph; the layers then have to fit what is left
    assert est.need_bytes == buffer + MINIMUM + max(partial, full) + blocks + layers * kv + output
    # MemorySize: the synthesised allocations (weights, cache, the full graph) and nothing else
    assert est.ps_size_bytes == blocks + layers * kv + output + full


def test_llama_engine_layout_for_qwen2_and_gemma2_uses_their_graph_cases():
    body = load_show("deepcoder_1.5b")
    g = group_sums(body)
    ctx, e, h = 4096, 1536, 12
    vocab = next(t["shape"][1] for t in body["tensors"] if t["name"] == "token_embd.weight")
    b = 512
    full = max(4 * b * (e + vocab), 4 * b * (1 + 2 * e + ctx + ctx * h))
    est = estimate(body, sum(g.values()), "0.20.0", ctx)
    assert est.engine == "llama"
    assert est.ps_size_bytes - est.weights_bytes - est.kv_bytes == full

    m = gemma2_9b()
    ctx, layers, head, hkv = 8192, 42, 256, 8
    gemma = estimate(m.body, m.file_bytes, "0.20.0", ctx)
    assert gemma.engine == "llama"
    assert gemma.kv_bytes == layers * ctx * 2 * head * hkv * 2  # no sliding discount in GraphSize


def test_ollama_engine_qwen3_cache_weights_and_cpu_embeddings():
    body = load_show("qwen3_8b")
    g = group_sums(body)
    ctx, layers, e, h, hkv, head, ff, vocab = 8192, 36, 4096, 32, 8, 128, 12288, 151936
    cells = round_up(1 * ctx)  # Causal.Init: maxSequences * capacity, padded to 256
    kv = layers * cells * hkv * (head + head) * 2  # f16 K and V
    weights = sum(g[f"blk.{i}"] for i in range(layers)) + g["output"] + g["output_norm"]
    # the approximation of the measured graph: activations + attention mask (flash attention is on
    # by default for qwen3 from v0.12.4) + one token of logits per slot
    graph = 4 * 512 * (2 * e + 2 * ff + (h + 2 * hkv) * head) + 2 * 512 * cells + 4 * 1 * vocab
    est = estimate(body, 5_225_388_164, "0.16.1", ctx)
    assert est.engine == "ollama"
    assert est.flash_attention
    assert est.kv_bytes == kv
    assert est.weights_bytes == weights
    assert est.graph_bytes == graph
    assert est.need_bytes == weights + kv + graph + MINIMUM
    # ollamaServer MemorySize: token_embd stays on the CPU (InputWeights) but counts in size
    assert est.ps_size_bytes == g["token_embd"] + weights + kv + graph


def test_ollama_engine_qwen3moe_graph_goes_through_the_used_experts():
    m = qwen3_30b_a3b()
    ctx, e, h, hkv, head, vocab = 4096, 2048, 32, 4, 128, 151936
    graph = 4 * 512 * (2 * e + 2 * (8 * 768) + (h + 2 * hkv) * head) + 2 * 512 * ctx + 4 * vocab
    est = estimate(m.body, m.file_bytes, "0.16.1", ctx)
    assert est.engine == "ollama"
    assert est.graph_bytes == graph
    assert est.kv_bytes == 48 * ctx * hkv * 256 * 2


def test_ollama_engine_gemma3_keeps_the_window_on_sliding_layers_and_counts_the_projector():
    m = gemma3_4b()
    ctx, layers, hkv, head, window = 8192, 34, 4, 256, 1024
    swa_cells = round_up(1 * window + 512)  # NewSWACache: maxSequences * window + maxBatch
    cells = [ctx if (i + 1) % 6 == 0 else swa_cells for i in range(layers)]
    kv = sum(c * hkv * 2 * head * 2 for c in cells)
    image, patch, v_heads, v_width = 896, 14, 16, 1152
    patches = (image // patch) ** 2
    vision_graph = 4 * (image * image * 3 + v_width * patch + patches * patches * v_heads)
    est = estimate(m.body, m.file_bytes, "0.16.1", ctx, gib=16)
    assert est.kv_bytes == kv
    assert est.projector_bytes == m.vision + vision_graph
    small = estimate(m.body, m.file_bytes, "0.16.1", 1000, gib=16)
    assert small.context_length == 2048  # server/sched.go: vision models get at least 2048
    assert "vision" in small.context_reason


def test_ollama_engine_gpt_oss_sliding_memory_of_4096_and_a_q8_cache():
    m = gpt_oss_20b()
    ctx, layers, hkv, head = 32768, 24, 8, 64
    q8 = 34 / 32  # ggml q8_0: 34 bytes per block of 32
    swa = round_up(1 * 4096 + 512)  # NewSWAMemCache(window, 4096): 4096 positions, not the window
    env = parse_ollama_env({"OLLAMA_KV_CACHE_TYPE": "q8_0"})
    est = estimate(m.body, m.file_bytes, "0.16.1", ctx, env=env)
    assert est.flash_attention  # gpt-oss has flash attention on by default (v0.11.8+)
    assert est.kv_cache_type == "q8_0"
    per_layer = [(swa if i % 2 == 0 else ctx) * hkv * 2 * head for i in range(layers)]
    assert est.kv_bytes == sum(int(c * q8) for c in per_layer)


def test_mixed_era_sizes_ollama_engine_models_by_layout_and_llama_ones_the_classic_way():
    body = load_show("mistral_7b")
    classic = estimate(body, 4_372_824_384, "0.11.6", 4096)
    mixed = estimate(body, 4_372_824_384, "0.11.11", 4096)
    assert mixed.era is Era.MIXED
    assert mixed.ps_size_bytes == classic.ps_size_bytes == 5_778_720_768
    m = gemma3_4b()
    gemma = estimate(m.body, m.file_bytes, "0.11.11", 4096)
    assert gemma.engine == "ollama"
    assert gemma.buffer_bytes == 0  # the Ollama engine keeps no buffer layer


def test_encoder_models_on_the_ollama_engine_have_no_cache():
    m = nomic_embed_text()
    info = parse_show(m.body, "nomic-embed-text")
    before = estimate_memory(info, m.file_bytes, node("0.13.0"))
    after = estimate_memory(info, m.file_bytes, node("0.13.1"))
    assert before is not None
    assert after is not None
    assert before.engine == "llama"  # nomic-bert joined OllamaEngineRequired in v0.13.1
    assert before.kv_bytes > 0
    assert after.engine == "ollama"
    assert after.kv_bytes == 0  # model/models/nomicbert@v0.20.0 has no cache


def test_overhead_and_split_over_gpus_in_the_layout_era():
    body = load_show("qwen3_8b")
    plain = estimate(body, 5_225_388_164, "0.16.1", 8192)
    env = parse_ollama_env({"OLLAMA_GPU_OVERHEAD": "1073741824"})
    over = estimate(body, 5_225_388_164, "0.16.1", 8192, env=env)
    assert over.reserve_bytes == MINIMUM + GIB
    assert over.need_bytes == plain.need_bytes + GIB
    assert over.ps_size_bytes == plain.ps_size_bytes
    # buildLayout reserves minimum + overhead + graph on every GPU it uses; whole layers leave slack
    g = group_sums(body)
    biggest = max(g[f"blk.{i}"] for i in range(36)) + 8192 * 8 * 256 * 2
    assert plain.span_need_bytes(2) == plain.need_bytes + MINIMUM + plain.graph_bytes + biggest
