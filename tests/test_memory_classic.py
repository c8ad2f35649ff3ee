"""The classic era (before v0.11.11): llm/memory.go estimateGPULayers and fs/ggml/ggml.go GraphSize.

Every expected value is written out here from the Go source it ports (cited file@tag), with the
tensor sizes summed by the tests' own copy of Tensor.Size (model_shapes.tensor_bytes); nothing is
taken from the code under test.
"""

from __future__ import annotations

from typing import Any

import pytest
from model_shapes import (
    gemma2_9b,
    gemma3_4b,
    gpt_oss_20b,
    group_sums,
    load_show,
    nomic_embed_text,
    qwen3_30b_a3b,
)

from gpu_router.memory import (
    ClassicInputs,
    Era,
    NodeProfile,
    OllamaEnv,
    classic_inputs,
    estimate_gpu_layers,
    estimate_memory,
    parse_ollama_env,
)
from gpu_router.ollama import parse_show
from gpu_router.state import GIB, MIB

# ml/device.go@v0.12.10 MinimumMemory (discover/gpu.go@v0.11.6 cudaMinimumMemory): per CUDA GPU
MINIMUM = 457 * MIB


def node(version: str, gib: int = 24, env: OllamaEnv | None = None, library: str = "cuda") -> NodeProfile:
    return NodeProfile(version, (gib * GIB,), env or OllamaEnv(), library)


def estimate(body: dict[str, Any], file_bytes: int, version: str, ctx: int | None, **kw: Any):
    e = estimate_memory(parse_show(body, "m"), file_bytes, node(version, **kw), num_ctx=ctx)
    assert e is not None
    return e


def kv_layer(ctx: int, dk: int, dv: int, hkv: int, per_element: float = 2.0) -> int:
    """fs/ggml/ggml.go@v0.12.10 GraphSize: uint64(float64(context*(K+V)*headsKV) * bytesPerElement)."""
    return int(float(ctx * (dk + dv) * hkv) * per_element)


def test_llama_mistral_7b_reproduces_what_ollama_0_11_reported():
    body = load_show("mistral_7b")
    g = group_sums(body)
    ctx, layers, e, h, hkv, vocab = 4096, 32, 4096, 32, 8, 32768
    dk = dv = e // h  # EmbeddingHeadCountK: no attention.key_length key
    kv = kv_layer(ctx, dk, dv, hkv)
    b = min(ctx, 512)  # min(NumCtx, NumBatch)
    # GraphSize@v0.12.10, case "llama"
    full = max(4 * b * (1 + 4 * e + ctx * (1 + h)), 4 * b * (e + vocab))
    partial = 4 * b * e + max(
        4 * b * (1 + e + max(ctx, e)) + e * e * 9 // 16 + 4 * ctx * (b * h + (e // h) * hkv),
        4 * b * (e + vocab) + e * vocab * 105 // 128,
    )
    blocks = [g[f"blk.{i}"] for i in range(layers)]
    output = g["output_norm"] + g["output"]  # memoryLayerOutput
    buffer = blocks[0] + kv  # "add one layer worth of memory as a buffer"
    # estimateGPULayers@v0.12.10, one GPU, everything offloaded: minimum + buffer + layers + output + graph
    ps = MINIMUM + buffer + sum(blocks) + layers * kv + output + full
    est = estimate(body, 4_372_824_384, "0.11.6", ctx)
    assert est.era is Era.CLASSIC
    assert est.engine == "llama"
    assert est.kv_bytes == layers * kv == 512 * MIB
    assert est.graph_bytes == max(partial, full)
    assert est.ps_size_bytes == ps
    assert ps == 5_778_720_768  # ollama-observations row 41, /api/ps size on v0.10-0.11
    # the fit: free - overhead > V_full - G_full + max(G_partial, G_full)
    assert est.need_bytes == ps - full + max(partial, full)
    assert est.need_bytes == (
        est.weights_bytes
        + est.kv_bytes
        + est.graph_bytes
        + est.projector_bytes
        + est.reserve_bytes
        + est.buffer_bytes
    )


def test_qwen2_uses_its_own_graph_case():
    body = load_show("deepcoder_1.5b")
    g = group_sums(body)
    ctx, layers, e, h, hkv = 8192, 28, 1536, 12, 2
    vocab = next(t["shape"][1] for t in body["tensors"] if t["name"] == "token_embd.weight")
    kv = kv_layer(ctx, e // h, e // h, hkv)
    b = 512
    # GraphSize@v0.12.10, case "qwen2"
    full = max(4 * b * (e + vocab), 4 * b * (1 + 2 * e + ctx + ctx * h))
    partial = max(
        4 * b * (e + vocab) + e * vocab * 105 // 128, 4 * (b * (1 + 2 * e + ctx * (1 + h)) + e * (1 + ctx))
    )
    blocks = [g[f"blk.{i}"] for i in range(layers)]
    output = g["output_norm"] + g.get("output", g["token_embd"])
    ps = MINIMUM + blocks[0] + kv + sum(blocks) + layers * kv + output + full
    est = estimate(body, sum(g.values()), "0.11.6", ctx)
    assert est.graph_bytes == max(full, partial)
    assert est.ps_size_bytes == ps


def test_qwen3_falls_back_to_gqa_times_kv_over_six():
    body = load_show("qwen3_8b")
    g = group_sums(body)
    ctx, layers, h, hkv, head = 4096, 36, 32, 8, 128  # qwen3 sets attention.key_length 128
    kv = kv_layer(ctx, head, head, hkv)
    # estimateGPULayers@v0.12.10: no GraphSize case -> partial = (HeadCountMax / HeadCountKVMin) * kv / 6
    graph = (h // hkv) * (layers * kv) // 6
    blocks = [g[f"blk.{i}"] for i in range(layers)]
    ps = MINIMUM + blocks[0] + kv + sum(blocks) + layers * kv + g["output_norm"] + g["output"] + graph
    est = estimate(body, 5_225_388_164, "0.11.6", ctx)
    assert est.graph_bytes == graph == 384 * MIB
    assert est.ps_size_bytes == ps == 6_499_533_824  # ollama-observations row 49


def test_qwen3moe_is_a_llama_engine_model_before_v0_12_2_and_gets_the_generic_graph():
    m = qwen3_30b_a3b()
    ctx, layers, h, hkv, head = 4096, 48, 32, 4, 128
    kv = kv_layer(ctx, head, head, hkv)
    graph = (h // hkv) * (layers * kv) // 6
    ps = MINIMUM + m.blocks[0] + kv + sum(m.blocks) + layers * kv + m.output_norm + m.output + graph
    est = estimate(m.body, m.file_bytes, "0.11.6", ctx)
    assert est.engine == "llama"
    assert est.ps_size_bytes == ps


def test_gemma2_classic_keeps_full_context_on_every_layer():
    m = gemma2_9b()
    ctx, layers, e, h, hkv, head, vocab = 8192, 42, 3584, 16, 8, 256, 256000
    kv = kv_layer(ctx, head, head, hkv)  # "Gemma2 also has sliding window attention but ..." no discount
    b = 512
    full = max(4 * b * (e + vocab), 4 * b * (2 + ctx + ctx * h + 2 * e + 2 * head * h))
    partial = max(
        4 * e * b + e * vocab * 105 // 128 + 4 * vocab * b,
        4 * b * (2 * e + 1 + 2 * head * h + ctx + ctx * h) + 4 * head * ctx * 8 + e * head * h * 9 // 16,
    )
    output = m.output_norm + m.token_embd  # tied: no output tensor, so token_embd
    ps = MINIMUM + m.blocks[0] + kv + sum(m.blocks) + layers * kv + output + full
    est = estimate(m.body, m.file_bytes, "0.11.6", ctx)
    assert est.kv_bytes == layers * kv
    assert est.graph_bytes == max(full, partial)
    assert est.ps_size_bytes == ps


def test_gemma3_with_vision_sizes_sliding_layers_to_the_window_and_adds_the_vision_graph():
    m = gemma3_4b()
    ctx, layers, e, h, hkv, head, vocab, window = 8192, 34, 2560, 8, 4, 256, 262144, 1024
    b = 512
    sliding = 1 * window + b  # numParallel * attention.sliding_window + batch
    kv = [kv_layer(ctx if (i + 1) % 6 == 0 else sliding, head, head, hkv) for i in range(layers)]
    full = max(4 * b * (e + vocab), 4 * b * (2 + ctx + ctx * h + 2 * e + 2 * head * h))
    # VisionGraphSize@v0.12.10, case "gemma3"
    image, patch, channels, v_heads, v_width = 896, 14, 3, 16, 1152
    patches = (image // patch) ** 2
    vision_graph = 4 * (image * image * channels + v_width * patch + patches * patches * v_heads)
    last = m.output_norm + m.token_embd + m.vision + vision_graph  # memoryLastLayer
    ps = MINIMUM + m.blocks[0] + kv[0] + sum(m.blocks) + sum(kv) + last + full
    est = estimate(m.body, m.file_bytes, "0.11.6", ctx)
    assert est.engine == "ollama"  # gemma3 runs on the Ollama engine, sized by the classic estimator
    assert est.kv_bytes == sum(kv)
    assert est.projector_bytes == m.vision + vision_graph
    assert est.ps_size_bytes == ps


def test_nomic_bert_gets_one_kv_head_by_default_and_a_single_slot():
    m = nomic_embed_text()
    layers, e, h = 12, 768, 12
    ctx = 2048  # Modelfile num_ctx 8192, clamped to the trained 2048 (llm/server.go@v0.11.6)
    kv = kv_layer(ctx, e // h, e // h, 1)  # HeadCountKVMax defaults to 1 without the key
    graph = (h // 1) * (layers * kv) // 6
    output = m.token_embd  # no output tensor: memoryLayerOutput takes token_embd
    ps = MINIMUM + m.blocks[0] + kv + sum(m.blocks) + layers * kv + output + graph
    est = estimate_memory(parse_show(m.body, "nomic-embed-text"), m.file_bytes, node("0.11.6", 24))
    assert est is not None
    assert est.context_length == 2048
    assert est.num_parallel == 1
    assert est.kv_bytes == layers * kv == 6 * MIB
    assert est.ps_size_bytes == ps


@pytest.mark.parametrize(
    ("version", "graph_of"),
    [
        # fs/ggml/ggml.go@v0.11.3-v0.11.4: full = 4*H/HkvMin*kvTotal/6, partial = full
        ("0.11.4", lambda kv_uniform: 4 * 64 // 8 * kv_uniform // 6),
        # fs/ggml/ggml.go@v0.11.5+: partial = 2*H/HkvMin*kvTotal/6, full unset (= partial)
        ("0.11.6", lambda kv_uniform: 2 * 64 // 8 * kv_uniform // 6),
    ],
)
def test_gpt_oss_classic_kv_and_graph_match_ollamas_own_log(version: str, graph_of: Any):
    m = gpt_oss_20b()
    ctx, layers, hkv, head = 36864, 24, 8, 64
    b = 512
    # GraphSize@v0.11.6 case "gptoss": even layers hold 4096 x parallel + batch, odd ones the context
    per_token = (head + head) * hkv * 2
    kv = [per_token * (4096 + b if i % 2 == 0 else ctx) for i in range(layers)]
    kv_uniform = layers * kv_layer(ctx, head, head, hkv)  # kvTotal is summed before the override
    est = estimate(m.body, m.file_bytes, version, ctx)
    assert est.kv_bytes == sum(kv) == 972 * MIB  # ollama-observations row 19: kv="972.0 MiB"
    assert est.graph_bytes == graph_of(kv_uniform)
    if version == "0.11.4":
        assert round(est.graph_bytes / GIB, 1) == 9.0  # row 19: graph.full="9.0 GiB"


def test_metal_reserves_512_mib_and_overhead_is_kept_free_but_not_reported():
    body = load_show("qwen3_8b")
    cuda = estimate(body, 5_225_388_164, "0.11.4", 4096)
    metal = estimate_memory(
        parse_show(body, "m"), 5_225_388_164, node("0.11.4", library="metal"), num_ctx=4096
    )
    assert metal is not None
    # discover/gpu_darwin.go@v0.11.6 metalMinimumMemory = 512 MiB
    assert metal.ps_size_bytes - cuda.ps_size_bytes == 512 * MIB - MINIMUM
    assert metal.ps_size_bytes == 6_557_205_504  # ollama-observations row 48 (2025-07-30)
    env = parse_ollama_env({"OLLAMA_GPU_OVERHEAD": 256 * MIB})
    over = estimate_memory(parse_show(body, "m"), 5_225_388_164, node("0.11.4", env=env), num_ctx=4096)
    assert over is not None
    assert over.need_bytes == cuda.need_bytes + 256 * MIB
    assert over.ps_size_bytes == cuda.ps_size_bytes


def test_quantized_cache_needs_flash_attention_and_counts_one_byte_per_element():
    body = load_show("mistral_7b")
    ctx, layers = 8192, 32
    q8 = parse_ollama_env({"OLLAMA_KV_CACHE_TYPE": "q8_0"})
    without_fa = estimate_memory(parse_show(body, "m"), 4_372_824_384, node("0.12.6", env=q8), num_ctx=ctx)
    assert without_fa is not None
    assert without_fa.kv_cache_type == "f16"
    assert any("needs flash attention" in n for n in without_fa.notes)
    fa = parse_ollama_env({"OLLAMA_KV_CACHE_TYPE": "q8_0", "OLLAMA_FLASH_ATTENTION": "1"})
    with_fa = estimate_memory(parse_show(body, "m"), 4_372_824_384, node("0.12.6", env=fa), num_ctx=ctx)
    assert with_fa is not None
    # kvCacheBytesPerElement@v0.12.10: q8_0 -> 1
    assert with_fa.kv_cache_type == "q8_0"
    assert with_fa.kv_bytes == layers * kv_layer(ctx, 128, 128, 8, 1.0)
    assert with_fa.era is Era.MIXED  # a llama-engine model still sized the classic way at v0.12.6


def test_partial_offload_places_layers_from_the_last_and_reports_the_overflow():
    # llm/memory.go@v0.12.10: a GPU is used only if free >= overhead + graph + minimum + 2 x layer;
    # layers go last-first while free > used + graph + layer; the rest overflows to the CPU
    layer, kv, out, gp, gf = 100 * MIB, 10 * MIB, 50 * MIB, 40 * MIB, 30 * MIB
    inputs = ClassicInputs(
        block_bytes=(layer,) * 4, kv=(kv,) * 4, graph_partial=gp, graph_full=gf, output_bytes=out
    )
    buffer = layer + kv
    free = MINIMUM + buffer + gp + 2 * (layer + kv) + MIB  # room for two layers beside the graph
    r = estimate_gpu_layers([free], inputs)
    assert r.layers == 2
    assert not r.fully_loaded
    assert r.graph_bytes == gp  # not fully loaded: the partial graph
    assert r.vram_bytes == MINIMUM + buffer + 2 * (layer + kv) + gp
    assert r.total_bytes == r.vram_bytes + 2 * (layer + kv) + out
    everything = estimate_gpu_layers([10 * GIB], inputs)
    assert everything.layers == 5  # four blocks and the output layer
    assert everything.total_bytes == everything.vram_bytes == MINIMUM + buffer + 4 * (layer + kv) + out + gf
    assert estimate_gpu_layers([], inputs).layers == 0


def test_split_over_two_gpus_pays_minimum_buffer_and_partial_graph_twice():
    body = load_show("mistral_7b")
    info = parse_show(body, "m")
    est = estimate(body, 4_372_824_384, "0.11.6", 4096)
    inputs = classic_inputs(info, 4_372_824_384, node("0.11.6"), num_ctx=4096)
    assert inputs is not None
    buffer = inputs.block_bytes[0] + inputs.kv[0]
    body_bytes = sum(inputs.block_bytes) + sum(inputs.kv) + inputs.output_bytes
    # multi-GPU: graphFullOffload = graphPartialOffload, and every GPU gets minimum + buffer + graph;
    # layers are whole and the output layer lands on one GPU, so each further GPU keeps a layer spare
    per_gpu = MINIMUM + buffer + inputs.graph_partial
    spare = max(max(b + k for b, k in zip(inputs.block_bytes, inputs.kv, strict=False)), inputs.output_bytes)
    assert est.span_need_bytes(1) == est.need_bytes
    assert est.span_need_bytes(2) == 2 * per_gpu + body_bytes + spare
    assert est.span_need_bytes(3) == 3 * per_gpu + body_bytes + 2 * spare
    halves = estimate_gpu_layers([est.span_need_bytes(2) // 2] * 2, inputs)
    assert halves.layers == 33  # every block and the output layer
    assert halves.fully_loaded
    short = estimate_gpu_layers([(2 * per_gpu + body_bytes) // 2 - spare] * 2, inputs)
    assert not short.fully_loaded
