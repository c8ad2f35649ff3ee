"""The llama-server era (v0.30+): llama.cpp's buffers, --fit's margin, Ollama's pre-load check.

Ollama's own parts are ports and checked exactly: PredictServerVRAM (llm/llama_server.go@v0.30.0),
the pre-load eviction rule and batch surcharge (server/sched.go@v0.30.0), the context tiers
(server/routes.go@v0.15.5). llama.cpp's KV cache follows its allocation rules (checked against a
real log); its compute buffer has no Ollama formula, so the engine's calibrated approximation is
restated here.
"""

from __future__ import annotations

from typing import Any

import pytest
from model_shapes import (
    build,
    gemma2_9b,
    gemma3_4b,
    gpt_oss_20b,
    group_sums,
    llama31_8b,
    load_show,
    nomic_embed_text,
    qwen3_30b_a3b,
)

from gpu_router.memory import (
    Era,
    NodeProfile,
    OllamaEnv,
    estimate_memory,
    max_loaded_models,
    parse_ollama_env,
    preload_check_passes,
)
from gpu_router.memory.cache import llama_cpp_cache
from gpu_router.memory.shapes import model_shape
from gpu_router.ollama import parse_show
from gpu_router.state import GIB, MIB

FIT_MARGIN = 1024 * MIB  # llama.cpp common_params fit_params_target


def node(
    version: str = "0.30.0", gibs: tuple[float, ...] = (24,), env: OllamaEnv | None = None
) -> NodeProfile:
    return NodeProfile(version, tuple(int(g * GIB) for g in gibs), env or OllamaEnv())


def estimate(body: dict[str, Any], file_bytes: int, ctx: int | None = None, **kw: Any):
    e = estimate_memory(parse_show(body, "m"), file_bytes, node(**kw), num_ctx=ctx)
    assert e is not None
    return e


def test_default_context_follows_the_vram_tiers_and_clamps_to_training():
    m = llama31_8b()
    # server/routes.go@v0.15.5 Serve: sum over GPUs of (total - OLLAMA_GPU_OVERHEAD)
    assert estimate(m.body, m.file_bytes, gibs=(16,)).context_length == 4096
    assert estimate(m.body, m.file_bytes, gibs=(24,)).context_length == 32768
    assert estimate(m.body, m.file_bytes, gibs=(12, 12)).context_length == 32768
    big = estimate(m.body, m.file_bytes, gibs=(48,))
    assert big.context_length == 131072  # 262144, clamped to llama3.1's trained 131072
    assert "48.0 GiB" in big.context_reason
    assert "clamped to the trained 131072" in big.context_reason
    env = parse_ollama_env({"OLLAMA_GPU_OVERHEAD": 2 * GIB})
    assert estimate(m.body, m.file_bytes, gibs=(24,), env=env).context_length == 4096  # 22 GiB < 23
    assert estimate(m.body, m.file_bytes, version="0.15.4", gibs=(48,)).context_length == 4096


def test_llama31_kv_weights_compute_margin_and_preload():
    m = llama31_8b()
    ctx, layers, e, h, hkv, vocab, ff = 32768, 32, 4096, 32, 8, 128256, 14336
    est = estimate(m.body, m.file_bytes, gibs=(24,))
    assert est.era is Era.LLAMA_SERVER
    assert est.engine == "llama-server"
    assert est.context_length == ctx
    # llama.cpp: one stream of num_ctx cells per slot, K and V f16
    assert est.kv_bytes == layers * ctx * hkv * (128 + 128) * 2
    # token_embd stays on the CPU; the untied output head goes to the GPU
    assert est.weights_bytes == sum(m.blocks) + m.output + m.output_norm
    # automaticGenerationBatch: 1024 above 4096 tokens; compute = logits + one layer's activations
    ubatch = 1024
    assert est.graph_bytes == 4 * ubatch * vocab + 4 * ubatch * (e + ff)
    assert est.reserve_bytes == FIT_MARGIN
    assert est.need_bytes == est.weights_bytes + est.kv_bytes + est.graph_bytes + FIT_MARGIN
    assert est.ps_size_bytes == est.need_bytes - FIT_MARGIN
    # PredictServerVRAM: file + 2 * layers * min KV heads * (E / max heads) * ctx * 2, plus the
    # 768 MiB surcharge of a 1024 batch
    predicted = m.file_bytes + 2 * layers * hkv * (e // h) * ctx * 2
    assert est.preload_bytes == predicted + 768 * MIB


def test_preload_check_is_eighty_percent_of_free():
    m = llama31_8b()
    est = estimate(m.body, m.file_bytes, gibs=(24,))
    assert est.preload_bytes is not None
    free = est.preload_bytes * 100 // 80 + 1
    assert preload_check_passes(est, free)
    assert not preload_check_passes(est, free - 2)
    classic = estimate(m.body, m.file_bytes, version="0.12.6")
    assert classic.preload_bytes is None
    assert preload_check_passes(classic, 0)  # no such check before v0.30


def test_parallel_slots_multiply_the_cache_and_the_prediction():
    m = llama31_8b()
    env = parse_ollama_env({"OLLAMA_NUM_PARALLEL": "4", "OLLAMA_CONTEXT_LENGTH": "4096"})
    est = estimate(m.body, m.file_bytes, env=env)
    assert est.num_parallel == 4
    assert est.context_length == 4096
    assert est.kv_bytes == 4 * 32 * 4096 * 8 * 256 * 2
    # ctx x parallel = 16384 > 4096: a 1024 batch and its surcharge
    assert est.preload_bytes == m.file_bytes + 2 * 32 * 8 * 128 * 16384 * 2 + 768 * MIB


def test_quantized_cache_uses_ggml_block_sizes_and_needs_flash_attention():
    m = llama31_8b()
    env = parse_ollama_env({"OLLAMA_KV_CACHE_TYPE": "q8_0", "OLLAMA_FLASH_ATTENTION": True})
    est = estimate(m.body, m.file_bytes, env=env)
    assert est.kv_cache_type == "q8_0"
    assert est.kv_bytes == int(32 * 32768 * 8 * 256 * 34 / 32)  # q8_0: 34 bytes per 32 elements
    off = parse_ollama_env({"OLLAMA_KV_CACHE_TYPE": "q4_0", "OLLAMA_FLASH_ATTENTION": "false"})
    refused = estimate(m.body, m.file_bytes, env=off)
    assert refused.kv_cache_type == "f16"
    assert any("cannot quantize the V cache" in n for n in refused.notes)
    # without flash attention the attention scores are materialised: 4 x ubatch x cells x heads
    assert refused.graph_bytes == max(4 * 512 * 128256, 4 * 512 * 32768 * 32) + 4 * 512 * (4096 + 14336)


def test_sliding_window_layers_keep_window_plus_batch_per_stream():
    m = gemma2_9b()
    ctx, layers, hkv, head = 8192, 42, 8, 256
    est = estimate(m.body, m.file_bytes, ctx)
    swa_cells = 5120  # GGML_PAD(4096 + ubatch 1024, 256)
    cells = [swa_cells if i % 2 == 0 else ctx for i in range(layers)]
    assert est.kv_bytes == sum(c * hkv * 2 * head * 2 for c in cells)


def test_gpt_oss_120b_cache_matches_llama_server_log():
    # openai/gpt-oss-120b config: 36 layers, 8 KV heads of 64, sliding window 128 on even layers
    m = build(
        "gptoss",
        layers=36,
        embedding=2880,
        heads=64,
        heads_kv=8,
        head_dim=64,
        ff=2880,
        vocab=201088,
        context=131072,
        experts=128,
        experts_used=4,
        expert_ff=2880,
        expert_type="MXFP4",
        weight_type="Q8_0",
        embed_type="Q8_0",
        extra_info={"gptoss.attention.sliding_window": 128},
    )
    info = parse_show(m.body, "gpt-oss:120b")
    shape = model_shape(info, m.file_bytes)
    assert shape is not None
    # ollama-observations row 67 (v0.30.2, -c 262144 -np 2, ubatch 1024): "non-SWA KV 9216.00 MiB
    # (131072 cells, 18 layers, 2/2 seqs); SWA KV 90.00 MiB (1280 cells)"
    full = 2 * 131072 * 18 * 8 * 128 * 2
    swa = 2 * 1280 * 18 * 8 * 128 * 2  # 1280 = GGML_PAD(window 128 + ubatch 1024, 256)
    assert full == 9216 * MIB
    assert swa == 90 * MIB
    layers, _ = llama_cpp_cache(shape, info, 131072, 2, 1024, 2.0)
    assert sum(layers) == full + swa
    # The estimate sizes the batch of 2048 that 262144 tokens of context get; Ollama lowered it to
    # 1024 there because the prediction (file + f16 KV) exceeded 60% of the GPU's memory.
    env = parse_ollama_env({"OLLAMA_NUM_PARALLEL": 2})
    est = estimate(m.body, m.file_bytes, 131072, gibs=(112.5,), env=env)
    assert est.kv_bytes == full + 2 * 2304 * 18 * 8 * 128 * 2  # GGML_PAD(128 + 2048, 256) = 2304
    assert any("lowers the batch from 2048 to 1024" in n for n in est.notes)


def test_encoder_embedding_models_get_no_cache_and_no_logits():
    m = nomic_embed_text()
    est = estimate_memory(parse_show(m.body, "nomic-embed-text"), m.file_bytes, node())
    assert est is not None
    assert est.num_parallel == 1
    assert est.kv_bytes == 0
    ubatch = min(2048, est.context_length)  # DefaultEmbeddingNumBatchForContext
    assert est.graph_bytes == 4 * ubatch * (768 + 3072)
    assert est.weights_bytes == sum(m.blocks) + m.other + m.token_embd  # the tied head is a copy
    assert est.preload_bytes == m.file_bytes + 2 * 12 * 1 * (768 // 12) * 2048 * 2  # no surcharge


def test_vision_projector_on_the_gpu_unless_the_gpu_is_small():
    m = gemma3_4b()
    image, patch, heads, width = 896, 14, 16, 1152
    patches = (image // patch) ** 2
    vision_graph = 4 * (image * image * 3 + width * patch + patches * patches * heads)
    big = estimate(m.body, m.file_bytes, 4096, gibs=(16,))
    assert big.projector_bytes == m.vision + vision_graph
    small = estimate(m.body, m.file_bytes, 4096, gibs=(8,))
    assert small.projector_bytes == 0  # --no-mmproj-offload at 10 GiB or less
    assert any("projector kept on the CPU" in n for n in small.notes)
    assert big.need_bytes - small.need_bytes == m.vision + vision_graph


@pytest.mark.parametrize("arch_case", ["qwen3", "qwen2", "qwen3moe", "gpt-oss"])
def test_every_architecture_sums_its_parts(arch_case: str):
    if arch_case == "qwen3":
        body, file_bytes = load_show("qwen3_8b"), 5_225_388_164
    elif arch_case == "qwen2":
        body = load_show("deepcoder_1.5b")
        file_bytes = sum(group_sums(body).values())
    elif arch_case == "qwen3moe":
        m = qwen3_30b_a3b()
        body, file_bytes = m.body, m.file_bytes
    else:
        m = gpt_oss_20b()
        body, file_bytes = m.body, m.file_bytes
    est = estimate(body, file_bytes, 8192)
    assert (
        est.need_bytes
        == est.weights_bytes + est.kv_bytes + est.graph_bytes + est.projector_bytes + FIT_MARGIN
    )
    assert est.span_need_bytes(2) > est.need_bytes + FIT_MARGIN


def test_max_loaded_models_is_three_per_gpu_unless_set():
    assert max_loaded_models(OllamaEnv(), 0) == 3
    assert max_loaded_models(OllamaEnv(), 1) == 3
    assert max_loaded_models(OllamaEnv(), 4) == 12
    assert max_loaded_models(parse_ollama_env({"OLLAMA_MAX_LOADED_MODELS": "1"}), 4) == 1


def test_cloud_models_and_thin_metadata_are_not_sized():
    m = llama31_8b()
    cloud = dict(m.body, remote_model="gpt-oss:120b", remote_host="https://ollama.com:443")
    assert estimate_memory(parse_show(cloud, "gpt-oss:120b-cloud"), 384, node()) is None
    assert estimate_memory(parse_show({"model_info": {}}, "x"), 10**9, node()) is None
    assert estimate_memory(parse_show(m.body, "m"), 0, node()) is None


def test_unknown_version_is_sized_by_the_newest_rules_and_says_so():
    m = llama31_8b()
    for version in (None, "0.0.0", "not a version"):
        est = estimate(m.body, m.file_bytes, version=version)
        assert est.era is Era.LLAMA_SERVER
        assert "unknown" in est.notes[0]
        assert "newest rules" in est.context_reason
