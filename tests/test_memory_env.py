"""ollama_env parsing (envconfig/config.go@v0.30.0), versions and eras, context and parallel slots."""

from __future__ import annotations

import pytest

from gpu_router.memory import (
    SIZING_KEYS,
    EnvValueError,
    Era,
    OllamaEnv,
    era_of,
    parse_ollama_env,
    parse_version,
)
from gpu_router.memory.context import resolve_context
from gpu_router.memory.version import facts
from gpu_router.state import GIB, ModelInfo


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (8192, 8192),
        ("8192", 8192),
        (" 8192 ", 8192),  # envconfig.Var trims spaces
        ("'8192'", 8192),  # ... and quotes
        ('"8192"', 8192),
        (8192.0, 8192),  # YAML may write a whole number as a float
        ("", None),  # empty means unset
        (0, 0),  # 0 = "pick by VRAM" from v0.15.5
    ],
)
def test_context_length_is_parsed_as_parseuint_reads_it(value: object, expected: int | None):
    assert parse_ollama_env({"OLLAMA_CONTEXT_LENGTH": value}).context_length == expected


FULL_WIDTH_4096 = "\uff14\uff10\uff19\uff16"  # str.isdigit() says yes; ParseUint says no


@pytest.mark.parametrize("value", ["8k", "-1", "4096.5", 4096.5, "+4096", "0x1000", True, FULL_WIDTH_4096])
def test_context_length_rejects_what_ollama_would_silently_ignore(value: object):
    with pytest.raises(EnvValueError) as err:
        parse_ollama_env({"OLLAMA_CONTEXT_LENGTH": value})
    assert err.value.name == "OLLAMA_CONTEXT_LENGTH"
    assert "number of tokens" in str(err.value) or "expected" in str(err.value)


@pytest.mark.parametrize(
    ("key", "field", "good", "bad"),
    [
        ("OLLAMA_NUM_PARALLEL", "num_parallel", ("4", 4), "four"),
        ("OLLAMA_MAX_LOADED_MODELS", "max_loaded_models", (2, 2), "-2"),
        ("OLLAMA_GPU_OVERHEAD", "gpu_overhead_bytes", ("536870912", 512 * 2**20), "512MiB"),
    ],
)
def test_numbers(key: str, field: str, good: tuple[object, int], bad: str):
    assert getattr(parse_ollama_env({key: good[0]}), field) == good[1]
    with pytest.raises(EnvValueError, match=key):
        parse_ollama_env({key: bad})


def test_gpu_overhead_says_ollama_reads_bytes_only():
    with pytest.raises(EnvValueError) as err:
        parse_ollama_env({"OLLAMA_GPU_OVERHEAD": "1GiB"})
    assert "bytes per GPU" in err.value.message
    assert "digits only" in err.value.message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("1", True),
        ("t", True),
        ("TRUE", True),
        ("True", True),
        ("true", True),
        ("0", False),
        ("f", False),
        ("FALSE", False),
        ("false", False),
        ("", None),
    ],
)
def test_flash_attention_accepts_what_strconv_parsebool_accepts(value: object, expected: bool | None):
    assert parse_ollama_env({"OLLAMA_FLASH_ATTENTION": value}).flash_attention is expected
    assert parse_ollama_env({"OLLAMA_SCHED_SPREAD": value}).sched_spread is expected


@pytest.mark.parametrize("value", ["yes", "on", "enabled", 2, "tRuE"])
def test_booleans_ollama_would_take_as_true_are_refused(value: object):
    with pytest.raises(EnvValueError) as err:
        parse_ollama_env({"OLLAMA_FLASH_ATTENTION": value})
    assert "Ollama would treat it as true" in err.value.message


def test_cache_type_is_lower_cased_and_checked():
    assert parse_ollama_env({"OLLAMA_KV_CACHE_TYPE": "Q8_0"}).kv_cache_type == "q8_0"
    assert parse_ollama_env({"OLLAMA_KV_CACHE_TYPE": "q4_0"}).kv_cache_type == "q4_0"
    assert parse_ollama_env({"OLLAMA_KV_CACHE_TYPE": "iq4_nl"}).kv_cache_type == "iq4_nl"  # v0.30+
    with pytest.raises(EnvValueError) as err:
        parse_ollama_env({"OLLAMA_KV_CACHE_TYPE": "q3_k"})
    assert "f16, q8_0, q4_0" in err.value.message


def test_other_ollama_names_are_listed_as_unused_and_others_refused():
    env = parse_ollama_env({"OLLAMA_KEEP_ALIVE": "-1", "OLLAMA_HOST": "0.0.0.0", "OLLAMA_NUM_PARALLEL": 2})
    assert env.unused == ("OLLAMA_HOST", "OLLAMA_KEEP_ALIVE")
    assert env.num_parallel == 2
    with pytest.raises(EnvValueError) as err:
        parse_ollama_env({"CUDA_VISIBLE_DEVICES": "0"})
    assert err.value.name == "CUDA_VISIBLE_DEVICES"
    assert "OLLAMA_*" in err.value.message
    with pytest.raises(EnvValueError):
        parse_ollama_env({"OLLAMA_NUM_PARALLEL": ["2"]})


def test_env_is_hashable_and_the_sizing_keys_are_ollamas_names():
    a = parse_ollama_env({"OLLAMA_NUM_PARALLEL": "2"})
    b = parse_ollama_env({"OLLAMA_NUM_PARALLEL": 2})
    assert a == b
    assert hash(a) == hash(b)
    assert len(SIZING_KEYS) == 7
    assert all(k.startswith("OLLAMA_") for k in SIZING_KEYS)
    assert parse_ollama_env({}) == OllamaEnv()


@pytest.mark.parametrize(
    ("text", "version", "era"),
    [
        ("0.11.10", (0, 11, 10), Era.CLASSIC),
        ("0.11.11", (0, 11, 11), Era.MIXED),  # eb10390de: new memory estimates by default
        ("v0.12.10", (0, 12, 10), Era.MIXED),
        ("0.12.11", (0, 12, 11), Era.LAYOUT),  # f560bd0: layouts for both engines
        ("0.29.9", (0, 29, 9), Era.LAYOUT),
        ("0.30.0-rc2", (0, 30, 0), Era.LLAMA_SERVER),  # 9db4bdb: llama-server only
        ("0.33.0-rc2", (0, 33, 0), Era.LLAMA_SERVER),
        ("0.6", (0, 6, 0), Era.CLASSIC),
    ],
)
def test_versions_and_eras(text: str, version: tuple[int, int, int], era: Era):
    assert parse_version(text) == version
    assert era_of(text) is era


@pytest.mark.parametrize("text", ["0.0.0", "", "garbage", "1.x", None])
def test_unknown_versions_are_the_newest_era(text: str | None):
    assert parse_version(text) is None
    assert era_of(text) is Era.LLAMA_SERVER


LLAMA = ModelInfo("llama3.1:8b", "llama", ("completion",), 32, 4096, 32, 8, context_length=131072)


def choose(
    version: str, info: ModelInfo = LLAMA, gib: tuple[int, ...] = (24,), env: OllamaEnv | None = None, **kw
):
    return resolve_context(info, facts(version), env or OllamaEnv(), tuple(g * GIB for g in gib), **kw)


def test_context_precedence_request_modelfile_env_default():
    with_modelfile = ModelInfo(
        "m", "llama", ("completion",), 32, 4096, 32, 8, context_length=131072, num_ctx=8192
    )
    env = OllamaEnv(context_length=16384)
    assert choose("0.16.1", with_modelfile, env=env, num_ctx=2048).reason == "requested num_ctx 2048"
    assert choose("0.16.1", with_modelfile, env=env).reason == "Modelfile num_ctx 8192"
    assert choose("0.16.1", env=env).reason == "OLLAMA_CONTEXT_LENGTH=16384"
    assert choose("0.16.1").reason == "v0.16.1 default for 24.0 GiB of VRAM: 32768"
    assert choose("0.12.6").reason == "v0.12.6 default: 4096"
    assert choose("0.6.5").context_length == 2048  # 4096 from v0.6.7
    assert choose("0.16.1", gib=()).context_length == 4096  # unknown GPUs: the smallest tier
    old = choose("0.5.7", env=env)
    assert old.context_length == 2048
    assert any("does not read OLLAMA_CONTEXT_LENGTH" in n for n in old.notes)


def test_clamping_and_what_ps_shows():
    short = ModelInfo("m", "llama", ("completion",), 32, 4096, 32, 8, context_length=8192)
    new = choose("0.16.1", short, num_ctx=32768)
    assert new.context_length == 8192
    assert new.reason.endswith("clamped to the trained 8192")
    assert new.ps_context_length == 8192  # d11fbd2c6 (v0.15.5): ps shows the runner's context
    old = choose("0.12.6", short, num_ctx=32768)
    assert old.context_length == 8192
    assert old.ps_context_length == 32768  # before, the requested one
    assert choose("0.9.0", short, num_ctx=32768).ps_context_length is None  # no field yet
    assert choose("0.11.4", short, num_ctx=32768).fit_context == 32768  # fit judged before the clamp
    assert choose("0.9.2", short, num_ctx=32768).context_length == 32768  # not clamped before v0.9.3


def test_parallel_defaults_and_forced_single_slots():
    assert choose("0.16.1").num_parallel == 1
    assert choose("0.16.1", env=OllamaEnv(num_parallel=4)).num_parallel == 4
    assert choose("0.16.1", env=OllamaEnv(num_parallel=0)).num_parallel == 1  # max(n, 1)
    auto = choose("0.9.6")
    assert auto.num_parallel == 2
    assert auto.parallel_candidates == (2, 1)
    assert choose("0.6.5").parallel_candidates == (4, 1)
    embed = ModelInfo("e", "bert", ("embedding",), 12, 384, 12, 12, context_length=512)
    assert choose("0.16.1", embed, env=OllamaEnv(num_parallel=4)).num_parallel == 1
    vl = ModelInfo("v", "qwen3vl", ("completion", "vision"), 36, 4096, 32, 8, context_length=262144)
    forced = choose("0.16.1", vl, env=OllamaEnv(num_parallel=4))
    assert forced.num_parallel == 1
    assert "forces qwen3vl" in forced.parallel_reason
