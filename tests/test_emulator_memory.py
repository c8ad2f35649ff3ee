"""What each era's Ollama allocates (gpu_router.emulator.memory), checked by hand and against reality."""

from __future__ import annotations

import pytest

from gpu_router.emulator import CATALOGUE, EmulatedNode
from gpu_router.emulator.memory import (
    CLASSIC,
    FIT_MARGIN_BYTES,
    LLAMA_SERVER,
    MEASURED,
    RUNNER_OOM,
    GpuView,
    LoadShape,
    allocate,
    automatic_generation_batch,
    generation_batch_surcharge,
    graph_size,
    predict_llama_server_vram,
)

MIB = 1024**2
GIB = 1024 * MIB


def gpu(gib: float, index: int = 0) -> GpuView:
    return GpuView(index, int(gib * GIB), int(gib * GIB))


def alloc(era: str, model: str, gpus: list[GpuView], num_ctx: int = 4096, **kw: object):  # type: ignore[no-untyped-def]
    shape_kw = {
        k: kw.pop(k) for k in list(kw) if k in ("num_parallel", "num_gpu", "kv_cache_type", "flash_attention")
    }
    out = allocate(era, LoadShape(CATALOGUE[model], num_ctx, **shape_kw), gpus, require_full=False, **kw)  # type: ignore[arg-type]
    return out


# Real /api/ps sizes (ollama-observations rows 32, 41, 49: a CUDA build of ~v0.10-v0.11, num_ctx 4096,
# one slot). The classic port reproduces them to the byte.
@pytest.mark.parametrize(
    ("model", "observed"),
    [("qwen3:8b", 6_499_533_824), ("mistral:7b", 5_778_720_768), ("granite3.3:2b", 2_629_206_853)],
)
def test_classic_estimate_reproduces_real_ps_sizes(model: str, observed: int) -> None:
    node = EmulatedNode("n", (16384,), (model,), version="0.11.6")
    assert node.predict(model).total_bytes == observed


# Rows of the same reports within a few percent (their builds differ in small ways, e.g. 512 MiB
# per-GPU minimum on Metal instead of CUDA's 457 MiB).
@pytest.mark.parametrize(
    ("model", "observed"),
    [
        ("llama3.2:latest", 3_367_856_128),
        ("llama3.2:1b", 2_350_966_784),
        ("gemma3:1b", 1_936_012_288),
        ("qwen2.5vl:7b", 8_599_426_389),
        ("deepseek-r1:8b", 6_557_205_504),
    ],
)
def test_classic_estimate_is_close_to_other_real_ps_sizes(model: str, observed: int) -> None:
    node = EmulatedNode("n", (16384,), (model,), version="0.11.4")
    assert node.predict(model).total_bytes == pytest.approx(observed, rel=0.03)


def test_graph_size_by_hand_for_llama() -> None:
    spec = CATALOGUE["llama3.1:8b"]
    kv, partial, full = graph_size(spec, 4096, 512, 1, "", swa_cache=False)
    assert kv == [4096 * 256 * 8 * 2] * 32
    assert full == max(4 * 512 * (1 + 4 * 4096 + 4096 * 33), 4 * 512 * (4096 + 128256))
    assert partial > full
    # q8_0 halves the cache; two slots double it (GraphSize multiplies the context).
    assert graph_size(spec, 4096, 512, 1, "q8_0", swa_cache=False)[0][0] == kv[0] // 2
    assert graph_size(spec, 4096, 512, 2, "", swa_cache=False)[0][0] == kv[0] * 2


def test_bert_without_head_count_kv_has_one_kv_head() -> None:
    # HeadCountKV defaults to 1 when the GGUF has no attention.head_count_kv (fs/ggml/ggml.go).
    kv, _, _ = graph_size(CATALOGUE["all-minilm:latest"], 512, 512, 1, "", swa_cache=False)
    assert kv == [512 * (32 + 32) * 1 * 2] * 6


def test_sliding_window_layers_keep_a_small_cache_only_in_the_newer_engines() -> None:
    spec = CATALOGUE["gemma3:1b"]
    full_kv, _, _ = graph_size(spec, 32768, 512, 1, "", swa_cache=False)
    swa_kv, _, _ = graph_size(spec, 32768, 512, 1, "", swa_cache=True)
    local = [i for i, s in enumerate(spec.sliding_layers) if s]
    assert len(local) == 22
    assert 5 not in local
    assert all(swa_kv[i] == (512 + 512) * 512 * 1 * 2 for i in local)  # window + batch cells
    assert all(swa_kv[i] == full_kv[i] for i in range(26) if i not in local)
    assert sum(swa_kv) < sum(full_kv) / 4


def test_recurrent_layers_hold_a_fixed_state() -> None:
    spec = CATALOGUE["granite4:tiny-h"]
    kv4k, _, _ = graph_size(spec, 4096, 512, 1, "", swa_cache=False)
    kv64k, _, _ = graph_size(spec, 65536, 512, 1, "", swa_cache=False)
    recurrent = [i for i, h in enumerate(spec.kv_heads_per_layer) if h == 0]
    assert len(recurrent) == 36
    assert all(kv4k[i] == kv64k[i] > 0 for i in recurrent)  # does not grow with the context
    attention = [5, 15, 25, 35]
    assert all(kv64k[i] == 16 * kv4k[i] for i in attention)


def test_classic_full_offload_and_partial_by_whole_layers() -> None:
    full = alloc(CLASSIC, "llama3.1:8b", [gpu(24)]).allocation
    assert full is not None
    assert full.fully_on_gpu
    assert full.total_bytes == full.size_vram_bytes
    partial = alloc(CLASSIC, "llama3.1:8b", [gpu(4)]).allocation
    assert partial is not None
    assert not partial.fully_on_gpu
    assert 0 < partial.size_vram_bytes <= 4 * GIB < partial.total_bytes
    assert 0 < partial.layers_on_gpu < 33


def test_classic_needs_eviction_instead_of_partial_when_others_are_loaded() -> None:
    out = allocate(CLASSIC, LoadShape(CATALOGUE["llama3.1:8b"], 4096), [gpu(4)], require_full=True)
    assert out.needs_eviction
    assert out.allocation is None


def test_classic_forced_layers_that_do_not_fit_are_an_oom() -> None:
    out = alloc(CLASSIC, "llama3.1:8b", [gpu(4)], num_gpu=999)
    assert (out.error, out.out_of_memory) == (RUNNER_OOM, True)
    assert alloc(CLASSIC, "llama3.2:latest", [gpu(8)], num_gpu=999).allocation is not None


def test_classic_spreads_only_what_does_not_fit_one_gpu() -> None:
    one = alloc(CLASSIC, "llama3.2:latest", [gpu(8, 0), gpu(8, 1)]).allocation
    assert one is not None
    assert len(one.vram_by_gpu) == 1
    two = alloc(CLASSIC, "qwen2.5:14b", [gpu(8, 0), gpu(8, 1)]).allocation
    assert two is not None
    assert two.fully_on_gpu
    assert set(two.vram_by_gpu) == {0, 1}
    spread = alloc(CLASSIC, "llama3.2:latest", [gpu(8, 0), gpu(8, 1)], sched_spread=True).allocation
    assert spread is not None
    assert set(spread.vram_by_gpu) == {0, 1}


def test_measured_allocations_drop_the_minimum_and_the_buffer_layer() -> None:
    classic = alloc(CLASSIC, "llama3.1:8b", [gpu(24)]).allocation
    measured = alloc(MEASURED, "llama3.1:8b", [gpu(24)]).allocation
    assert classic is not None
    assert measured is not None
    spec = CATALOGUE["llama3.1:8b"]
    buffer = spec.layers.blocks_bytes[0] + 4096 * 256 * 8 * 2
    assert classic.total_bytes - measured.total_bytes == 457 * MIB + buffer
    assert measured.fully_on_gpu
    assert measured.total_bytes == measured.size_vram_bytes


def test_measured_ollama_engine_counts_input_embeddings_and_small_windows() -> None:
    spec = CATALOGUE["gemma3:1b"]
    llama_engine = alloc(MEASURED, "gemma3:1b", [gpu(24)], num_ctx=32768).allocation
    ollama_engine = alloc(MEASURED, "gemma3:1b", [gpu(24)], num_ctx=32768, ollama_engine=True).allocation
    assert llama_engine is not None
    assert ollama_engine is not None
    assert ollama_engine.total_bytes < llama_engine.total_bytes  # the window discount dominates
    assert spec.layers.output_tied  # gemma3 ties output to token_embd: no separate input weights


def test_llama_server_sizes_are_buffers_and_equal_when_fully_offloaded() -> None:
    out = alloc(LLAMA_SERVER, "llama3.1:8b", [gpu(24)]).allocation
    assert out is not None
    assert out.fully_on_gpu
    assert out.total_bytes == out.size_vram_bytes
    classic = alloc(CLASSIC, "llama3.1:8b", [gpu(24)]).allocation
    assert classic is not None
    assert out.total_bytes < classic.total_bytes


def test_llama_server_fit_leaves_a_margin_and_offloads_the_rest() -> None:
    spec = CATALOGUE["llama3.1:8b"]
    out = alloc(LLAMA_SERVER, "llama3.1:8b", [gpu(6)]).allocation
    assert out is not None
    assert not out.fully_on_gpu
    assert out.size_vram_bytes <= 6 * GIB - FIT_MARGIN_BYTES
    assert out.total_bytes > out.size_vram_bytes
    assert out.total_bytes >= spec.weights_bytes  # everything is somewhere


def test_llama_server_prediction_by_hand() -> None:
    spec = CATALOGUE["llama3.1:8b"]
    # PredictServerVRAM: file size + 2 * L * Hkv_min * (E / H_max) * ctx * 2 bytes.
    assert predict_llama_server_vram(spec, 8192) == spec.file_size_bytes + 2 * 32 * 8 * 128 * 8192 * 2
    hybrid = CATALOGUE["granite4:tiny-h"]
    # HeadCountKVMin is 0 on a hybrid (recurrent layers): the formula then counts one head.
    assert predict_llama_server_vram(hybrid, 4096) == hybrid.file_size_bytes + 2 * 40 * 1 * 128 * 4096 * 2


def test_generation_batch_and_surcharge() -> None:
    assert [generation_batch_surcharge(b) for b in (256, 512, 1024, 2048)] == [0, 0, 768 * MIB, 2 * GIB]
    plenty = 80 * GIB
    assert automatic_generation_batch(4096, GIB, plenty, flash_attention=True, small_cuda=False) == 512
    assert automatic_generation_batch(32768, GIB, plenty, flash_attention=True, small_cuda=False) == 1024
    assert automatic_generation_batch(131072, GIB, plenty, flash_attention=True, small_cuda=False) == 2048
    # Without the headroom the batch steps down; CUDA without flash attention stays small.
    assert (
        automatic_generation_batch(131072, 40 * GIB, 60 * GIB, flash_attention=True, small_cuda=False) == 1024
    )
    assert automatic_generation_batch(131072, GIB, plenty, flash_attention=False, small_cuda=True) == 256
    assert automatic_generation_batch(4096, GIB, plenty, flash_attention=False, small_cuda=True) == 512


def test_cpu_loads_have_no_vram() -> None:
    out = allocate(CLASSIC, LoadShape(CATALOGUE["llama3.2:latest"], 4096), [], require_full=False)
    assert out.allocation is not None
    assert out.allocation.size_vram_bytes == 0 < out.allocation.total_bytes
    short = allocate(
        CLASSIC, LoadShape(CATALOGUE["llama3.2:latest"], 4096), [], require_full=False, ram_free_bytes=GIB
    )
    assert short.allocation is None
    assert short.error.startswith("model requires more system memory (")
    oom = allocate(
        LLAMA_SERVER,
        LoadShape(CATALOGUE["llama3.2:latest"], 4096),
        [],
        require_full=False,
        ram_free_bytes=GIB,
    )
    assert oom.out_of_memory
    assert "out of memory" in oom.error
