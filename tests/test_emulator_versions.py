"""Per-version rules of the emulated Ollama (pure: no sockets)."""

from __future__ import annotations

import pytest

from gpu_router.emulator import CATALOGUE, Behaviour, EmulatorError, OllamaEnv, Version
from gpu_router.emulator.memory import CLASSIC, LLAMA_SERVER, MEASURED

GIB = 1024**3


def beh(version: str, gpus_gib: tuple[float, ...] = (8,), **env: object) -> Behaviour:
    return Behaviour(
        Version.parse(version), OllamaEnv.from_mapping(env), tuple(int(g * GIB) for g in gpus_gib)
    )


def test_versions_parse_and_order() -> None:
    assert Version.parse("v0.12.6") == Version(0, 12, 6)
    assert Version.parse("0.30.0-rc21") == Version(0, 30, 0)
    assert Version.parse("0.9.6") < Version.parse("0.10.0") < Version.parse("0.12.11")
    assert str(Version.parse("v0.15.5")) == "0.15.5"
    with pytest.raises(EmulatorError, match="not like"):
        Version.parse("latest")


def test_environment_is_parsed_and_checked() -> None:
    env = OllamaEnv.from_mapping(
        {
            "OLLAMA_NUM_PARALLEL": 2,
            "OLLAMA_FLASH_ATTENTION": "1",
            "OLLAMA_KV_CACHE_TYPE": "Q8_0",
            "OLLAMA_SCHED_SPREAD": True,
        }
    )
    assert (env.num_parallel, env.flash_attention, env.kv_cache_type, env.sched_spread) == (
        2,
        True,
        "q8_0",
        True,
    )
    assert OllamaEnv.from_mapping(None) == OllamaEnv()
    with pytest.raises(EmulatorError, match="unsupported environment: OLLAMA_NUM_PARALEL"):
        OllamaEnv.from_mapping({"OLLAMA_NUM_PARALEL": 2})
    with pytest.raises(EmulatorError, match="not a whole number"):
        OllamaEnv.from_mapping({"OLLAMA_MAX_LOADED_MODELS": "three"})
    with pytest.raises(EmulatorError, match="use f16, q8_0 or q4_0"):
        OllamaEnv.from_mapping({"OLLAMA_KV_CACHE_TYPE": "q5_1"})
    with pytest.raises(EmulatorError, match="not a boolean"):
        OllamaEnv.from_mapping({"OLLAMA_FLASH_ATTENTION": "maybe"})


@pytest.mark.parametrize(
    ("version", "gpus_gib", "expected"),
    [
        ("0.5.7", (8,), 2048),  # api/types.go DefaultOptions NumCtx 2048
        ("0.6.6", (80,), 2048),
        ("0.6.7", (8,), 4096),  # envconfig.ContextLength default 4096 from v0.6.7
        ("0.15.4", (80,), 4096),
        ("0.15.5", (8,), 4096),  # routes.go Serve: VRAM tiers from v0.15.5
        ("0.15.5", (24,), 32768),
        ("0.15.5", (24, 24), 262144),
        ("0.15.5", (), 4096),
        ("0.30.0", (48,), 262144),
    ],
)
def test_default_context_follows_version_and_vram(
    version: str, gpus_gib: tuple[float, ...], expected: int
) -> None:
    assert beh(version, gpus_gib).default_num_ctx() == expected


def test_vram_tier_subtracts_the_gpu_overhead_and_env_wins() -> None:
    assert beh("0.15.5", (24,), OLLAMA_GPU_OVERHEAD=2 * GIB).default_num_ctx() == 4096
    assert beh("0.15.5", (80,), OLLAMA_CONTEXT_LENGTH=8192).default_num_ctx() == 8192
    # Before envconfig.ContextLength existed (v0.5.13) the variable did nothing.
    assert beh("0.5.7", (8,), OLLAMA_CONTEXT_LENGTH=8192).default_num_ctx() == 2048


def test_requested_context_minimums_and_modelfile() -> None:
    b = beh("0.12.6")
    assert b.request_num_ctx(CATALOGUE["llama3.1:8b"], None) == 4096
    assert b.request_num_ctx(CATALOGUE["llama3.1:8b"], 2) == 4  # GetRunner: at least 4
    assert b.request_num_ctx(CATALOGUE["nomic-embed-text:latest"], None) == 8192  # PARAMETER num_ctx
    # Vision models get at least 2048 since v0.11.5.
    assert b.request_num_ctx(CATALOGUE["qwen2.5vl:7b"], 512) == 2048
    assert beh("0.11.4").request_num_ctx(CATALOGUE["qwen2.5vl:7b"], 512) == 512


def test_automatic_context_only_without_request_modelfile_or_env() -> None:
    llama, nomic = CATALOGUE["llama3.1:8b"], CATALOGUE["nomic-embed-text:latest"]
    assert beh("0.30.0").num_ctx_auto(llama, None)
    assert not beh("0.30.0").num_ctx_auto(llama, 8192)
    assert not beh("0.30.0").num_ctx_auto(nomic, None)  # its Modelfile sets num_ctx
    assert not beh("0.30.0", OLLAMA_CONTEXT_LENGTH=4096).num_ctx_auto(llama, None)
    assert not beh("0.12.6").num_ctx_auto(llama, None)


def test_ps_context_length_per_version() -> None:
    assert beh("0.9.6").ps_context_length(200000, 131072) is None  # not in ps before v0.10.0
    assert beh("0.12.6").ps_context_length(200000, 131072) == 200000  # the requested num_ctx
    assert beh("0.15.4").ps_context_length(200000, 131072) == 200000
    assert beh("0.15.5").ps_context_length(200000, 131072) == 131072  # the runner's, clamped


def test_trained_context_clamp_arrived_in_0_9_3() -> None:
    assert not beh("0.9.2").clamps_num_ctx
    assert beh("0.9.3").clamps_num_ctx


@pytest.mark.parametrize(
    ("version", "env", "model", "cpu_only", "expected"),
    [
        ("0.6.6", {}, "llama3.1:8b", False, (4, 1)),  # defaultParallel 4 then 1
        ("0.9.6", {}, "llama3.1:8b", False, (2, 1)),  # defaultParallel 2 from v0.6.7
        ("0.9.6", {}, "llama3.1:8b", True, (2,)),  # the CPU path takes the default
        ("0.10.0", {}, "llama3.1:8b", False, (1,)),  # OLLAMA_NUM_PARALLEL default 1
        ("0.12.6", {"OLLAMA_NUM_PARALLEL": 4}, "llama3.1:8b", False, (4,)),
        ("0.12.6", {"OLLAMA_NUM_PARALLEL": 4}, "nomic-embed-text:latest", False, (1,)),  # embedding
        ("0.6.6", {}, "nomic-embed-text:latest", False, (1,)),
    ],
)
def test_parallel_slots(
    version: str, env: dict[str, object], model: str, cpu_only: bool, expected: tuple[int, ...]
) -> None:
    assert beh(version, **env).parallel_candidates(CATALOGUE[model], cpu_only) == expected


def test_parallel_forced_to_one_for_some_architectures_by_version() -> None:
    from dataclasses import replace

    lfm2 = replace(CATALOGUE["qwen3:8b"], name="lfm2-like", architecture="lfm2", show_data="")
    assert beh("0.15.4", OLLAMA_NUM_PARALLEL=4).parallel_candidates(lfm2, False) == (4,)
    assert beh("0.15.5", OLLAMA_NUM_PARALLEL=4).parallel_candidates(lfm2, False) == (1,)


@pytest.mark.parametrize(
    ("version", "model", "expected"),
    [
        ("0.11.10", "gemma3:1b", CLASSIC),  # before the new memory management, all classic
        ("0.11.11", "gemma3:1b", MEASURED),  # ollama-engine models measure from v0.11.11
        ("0.11.11", "llama3.1:8b", CLASSIC),  # llama-engine models stay classic to v0.12.10
        ("0.11.11", "qwen3:8b", CLASSIC),  # qwen3 joined the ollama engine in v0.12.0
        ("0.12.0", "qwen3:8b", MEASURED),
        ("0.12.10", "llama3.1:8b", CLASSIC),
        ("0.12.11", "llama3.1:8b", MEASURED),  # both engines build layouts from v0.12.11
        ("0.24.0", "gemma3:1b", MEASURED),
        ("0.30.0", "llama3.1:8b", LLAMA_SERVER),
        ("0.30.0", "gemma3:1b", LLAMA_SERVER),
    ],
)
def test_eras(version: str, model: str, expected: str) -> None:
    assert beh(version).era(CATALOGUE[model]) == expected


def test_flash_attention_and_kv_cache_type() -> None:
    llama, qwen3, gemma2, nomic = (
        CATALOGUE[m] for m in ("llama3.1:8b", "qwen3:8b", "gemma2:2b", "nomic-embed-text:latest")
    )
    b = beh("0.12.6", OLLAMA_KV_CACHE_TYPE="q8_0")
    # FlashAttention() defaults: qwen3 on from v0.12.4, llama off; the KV type needs flash attention.
    assert b.flash_attention(qwen3)
    assert b.kv_cache_type(qwen3) == "q8_0"
    assert not b.flash_attention(llama)
    assert b.kv_cache_type(llama) == ""
    on = beh("0.12.6", OLLAMA_KV_CACHE_TYPE="q4_0", OLLAMA_FLASH_ATTENTION="true")
    assert on.kv_cache_type(llama) == "q4_0"
    assert not on.flash_attention(gemma2)  # SupportsFlashAttention: never gemma2
    assert not on.flash_attention(nomic)  # nor embedding models
    assert not beh("0.12.3", OLLAMA_KV_CACHE_TYPE="q8_0").flash_attention(qwen3)  # default off then
    # gpt-oss "wants" flash attention: forced on from v0.11.8, and only from v0.12.4 can it be refused.
    oss = CATALOGUE["gpt-oss:20b"]
    assert not beh("0.11.7").flash_attention(oss)
    assert beh("0.11.8", OLLAMA_FLASH_ATTENTION="false").flash_attention(oss)
    assert not beh("0.12.4", OLLAMA_FLASH_ATTENTION="false").flash_attention(oss)
    # llama-server gets OLLAMA_KV_CACHE_TYPE as is, flash attention on unless turned off.
    assert beh("0.30.0", OLLAMA_KV_CACHE_TYPE="q8_0").kv_cache_type(llama) == "q8_0"
    assert not beh("0.30.0", OLLAMA_FLASH_ATTENTION="0").flash_attention(llama)


def test_max_loaded_models() -> None:
    assert beh("0.12.6", (8, 8)).max_loaded_models() == 6
    assert beh("0.12.6", ()).max_loaded_models() == 3
    assert beh("0.12.6", (8,), OLLAMA_MAX_LOADED_MODELS=1).max_loaded_models() == 1


def test_version_switches() -> None:
    assert not beh("0.11.10").remote_models
    assert beh("0.12.0").remote_models
    assert not beh("0.24.0").preload_check
    assert beh("0.30.0").preload_check
    assert (beh("0.24.0").runner_name, beh("0.30.0").runner_name) == ("llama runner", "llama-server")
