"""Properties of the need in every era: it never shrinks as the context, the slots or the KV bytes grow."""

from __future__ import annotations

from functools import cache

from hypothesis import given, settings
from hypothesis import strategies as st
from model_shapes import (
    gemma2_9b,
    gemma3_4b,
    gemma3_27b,
    gpt_oss_20b,
    group_sums,
    llama31_8b,
    load_show,
    nomic_embed_text,
    qwen3_30b_a3b,
)

from gpu_router.memory import NodeProfile, estimate_memory, parse_ollama_env
from gpu_router.ollama import parse_show
from gpu_router.state import GIB, ModelInfo

VERSIONS = [
    "0.5.7",
    "0.6.8",
    "0.9.2",
    "0.10.1",
    "0.11.4",
    "0.11.6",
    "0.11.11",
    "0.12.6",
    "0.13.1",
    "0.16.1",
    "0.22.0",
    "0.30.0",
    "0.33.0",
]
MODELS = [
    "llama3.1",
    "gemma3:4b",
    "gemma3:27b",
    "gemma2",
    "qwen3moe",
    "gpt-oss",
    "nomic",
    "qwen3",
    "qwen2.5vl",
    "gemma3n",
    "minicpm-v",
]
# bytes per element, smallest first: q4_0 < q8_0 < f16 (< f32 from v0.30)
KV_TYPES = ["q4_0", "q8_0", "f16", "f32"]


@cache
def model(name: str) -> tuple[ModelInfo, int]:
    built = {
        "llama3.1": llama31_8b,
        "gemma3:4b": gemma3_4b,
        "gemma3:27b": gemma3_27b,
        "gemma2": gemma2_9b,
        "qwen3moe": qwen3_30b_a3b,
        "gpt-oss": gpt_oss_20b,
        "nomic": nomic_embed_text,
    }
    if name in built:
        b = built[name]()
        return parse_show(b.body, name), b.file_bytes
    real = {
        "qwen3": "qwen3_8b",
        "qwen2.5vl": "qwen2.5vl_7b",
        "gemma3n": "gemma3n_e4b",
        "minicpm-v": "minicpm-v_8b",
    }
    body = load_show(real[name])
    return parse_show(body, name), sum(group_sums(body).values()) + 600 * 2**20


common = {
    "name": st.sampled_from(MODELS),
    "version": st.sampled_from(VERSIONS),
    "gib": st.sampled_from([(8,), (16,), (24,), (48,), (24, 24), (80,)]),
    "flash": st.sampled_from([None, True, False]),
    "library": st.sampled_from(["cuda", "rocm", "metal"]),
}


def need(
    name: str, version: str, gib: tuple[int, ...], env: dict[str, object], library: str, ctx: int
) -> int:
    info, file_bytes = model(name)
    node = NodeProfile(version, tuple(g * GIB for g in gib), parse_ollama_env(env), library)
    est = estimate_memory(info, file_bytes, node, num_ctx=ctx)
    assert est is not None
    return est.need_bytes


def _env(flash: bool | None, **more: object) -> dict[str, object]:
    env: dict[str, object] = dict(more)
    if flash is not None:
        env["OLLAMA_FLASH_ATTENTION"] = flash
    return env


@settings(max_examples=400, deadline=None)
@given(**common, parallel=st.integers(1, 4), a=st.integers(1, 300_000), b=st.integers(1, 300_000))
def test_need_never_shrinks_as_the_context_grows(name, version, gib, flash, library, parallel, a, b):
    lo, hi = sorted((a, b))
    env = _env(flash, OLLAMA_NUM_PARALLEL=parallel)
    assert need(name, version, gib, env, library, lo) <= need(name, version, gib, env, library, hi)


@settings(max_examples=400, deadline=None)
@given(**common, ctx=st.integers(1, 140_000), p=st.integers(1, 8), q=st.integers(1, 8))
def test_need_never_shrinks_as_the_slots_grow(name, version, gib, flash, library, ctx, p, q):
    lo, hi = sorted((p, q))
    small = need(name, version, gib, _env(flash, OLLAMA_NUM_PARALLEL=lo), library, ctx)
    large = need(name, version, gib, _env(flash, OLLAMA_NUM_PARALLEL=hi), library, ctx)
    assert small <= large


@settings(max_examples=400, deadline=None)
@given(
    **common,
    ctx=st.integers(1, 140_000),
    i=st.integers(0, 3),
    j=st.integers(0, 3),
    parallel=st.integers(1, 3),
)
def test_need_never_shrinks_as_kv_bytes_per_element_grow(
    name, version, gib, flash, library, ctx, i, j, parallel
):
    lo, hi = sorted((i, j))
    small = need(
        name,
        version,
        gib,
        _env(flash, OLLAMA_KV_CACHE_TYPE=KV_TYPES[lo], OLLAMA_NUM_PARALLEL=parallel),
        library,
        ctx,
    )
    large = need(
        name,
        version,
        gib,
        _env(flash, OLLAMA_KV_CACHE_TYPE=KV_TYPES[hi], OLLAMA_NUM_PARALLEL=parallel),
        library,
        ctx,
    )
    assert small <= large
