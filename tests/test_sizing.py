"""Sizing: the classic Ollama formula, and the order of sources."""

from __future__ import annotations

from builders import cluster, loaded, node

from gpu_router.sizing import (
    GPU_MINIMUM_BYTES,
    SizeSource,
    breakdown,
    effective_context,
    estimate,
    model_need,
    span_need,
)
from gpu_router.state import MIB, ModelInfo

# llama3 8B metadata, as /api/show gives it
LLAMA3_8B = ModelInfo(
    "llama3:8b",
    "llama",
    ("completion",),
    block_count=32,
    embedding_length=4096,
    head_count=32,
    head_count_kv=8,
    context_length=8192,
    vocab_size=128256,
)
# mistral 7B: the model of docs/api.md's /api/ps example (size 5137025024, num_ctx 2048 then)
MISTRAL_7B = ModelInfo(
    "mistral:latest",
    "llama",
    ("completion",),
    block_count=32,
    embedding_length=4096,
    head_count=32,
    head_count_kv=8,
    context_length=32768,
    vocab_size=32000,
)
MISTRAL_FILE = 4_113_301_824


def test_kv_cache_of_llama3_8b_at_4096_is_512_mib():
    b = breakdown(LLAMA3_8B, 4_661_211_808, 4096)
    assert b is not None
    # 32 layers * 4096 ctx * (128 + 128) * 8 kv heads * 2 bytes
    assert b.kv_bytes == 32 * 4096 * 256 * 8 * 2 == 512 * MIB


def test_graph_minimum_and_buffer_follow_the_formula():
    w = 4_661_211_808
    b = breakdown(LLAMA3_8B, w, 4096)
    assert b is not None
    batch = 512
    assert b.graph_bytes == max(4 * batch * (1 + 4 * 4096 + 4096 * 33), 4 * batch * (4096 + 128256))
    assert b.minimum_bytes == GPU_MINIMUM_BYTES == 457 * MIB
    assert b.buffer_bytes == w // 32 + b.kv_bytes // 32
    assert b.total_bytes == w + b.kv_bytes + b.graph_bytes + b.minimum_bytes + b.buffer_bytes


def test_estimate_is_close_to_what_ollama_reported_for_mistral():
    est = estimate(MISTRAL_7B, MISTRAL_FILE, 2048)
    assert est.source is SizeSource.ESTIMATED
    assert est.need_bytes is not None
    assert abs(est.need_bytes - 5_137_025_024) / 5_137_025_024 < 0.03
    assert "KV 256 MiB" in est.detail
    assert "at ctx 2048" in est.detail


def test_context_is_the_models_own_else_config_clamped_to_training():
    assert effective_context(LLAMA3_8B, 4096) == 4096
    assert effective_context(LLAMA3_8B, 100_000) == 8192
    own = ModelInfo(
        "x", "llama", block_count=1, embedding_length=8, head_count=1, context_length=8192, num_ctx=2048
    )
    assert effective_context(own, 4096) == 2048


def test_unknown_arch_uses_the_fallback_graph():
    bert = ModelInfo(
        "e",
        "bert",
        ("embedding",),
        block_count=24,
        embedding_length=1024,
        head_count=16,
        head_count_kv=16,
        context_length=512,
    )
    b = breakdown(bert, 669_615_493, 4096)
    assert b is not None
    assert b.context_length == 512
    assert b.graph_bytes == (16 // 16) * b.kv_bytes // 6


def test_file_size_fallback_states_its_overhead():
    est = estimate(None, 1000 * MIB, 4096)
    assert est.source is SizeSource.FILE
    assert est.need_bytes == int(1000 * MIB * 1.2) + GPU_MINIMUM_BYTES
    assert "x 1.2" in est.detail


def test_missing_metadata_falls_back_to_the_file():
    assert estimate(ModelInfo("x"), 1000 * MIB, 4096).source is SizeSource.FILE


def test_nothing_known_is_unknown_not_zero():
    est = estimate(None, None, 4096)
    assert est.source is SizeSource.UNKNOWN
    assert est.need_bytes is None


def test_observed_beats_estimate():
    info = {"m:latest": LLAMA3_8B}
    on_gpu = node("a", loaded_models=(loaded("m:latest", 5.5),), info=info)
    partial = node("b", loaded_models=(loaded("m:latest", 7, 3),), info=info)
    need = model_need(cluster(partial, on_gpu), "m:latest", 4096)
    assert need.source is SizeSource.OBSERVED
    assert "on a" in need.detail
    assert need.need_bytes == loaded("m:latest", 5.5).size_bytes
    # Partial copies are not proof of the full size.
    need = model_need(cluster(partial), "m:latest", 4096)
    assert need.source is SizeSource.ESTIMATED


def test_span_pays_the_minimum_per_extra_gpu():
    assert span_need(1000, 3) == 1000 + 2 * GPU_MINIMUM_BYTES
