"""The Ollama emulator, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import web
import yaml

from gpu_router.emulator import (
    CATALOGUE,
    GPU_MINIMUM_BYTES,
    EmulatedCluster,
    EmulatedNode,
    EmulatorError,
    Fault,
    ModelSpec,
    demo_cluster,
    estimate_memory,
    format_rfc3339nano,
    parse_go_duration,
    parse_keep_alive,
)

MIB = 1024 * 1024
GIB = 1024 * MIB
T = 10.0  # generous client timeout: only there to avoid hangs

PS_KEYS = {"name", "model", "size", "digest", "details", "expires_at", "size_vram", "context_length"}
DETAILS_KEYS = {"parent_model", "format", "family", "families", "parameter_size", "quantization_level"}
TAGS_KEYS = {"name", "model", "modified_at", "size", "digest", "details"}

MakeNode = Callable[..., EmulatedNode]

_RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def parse_ts(text: str) -> datetime:
    """Go RFC3339Nano -> aware datetime (Python 3.10's fromisoformat cannot read 9 digits or Z)."""
    m = _RFC3339.match(text)
    assert m, f"not RFC3339Nano: {text!r}"
    frac = (m.group(2) or "").ljust(6, "0")[:6]
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(f"{m.group(1)}.{frac}{tz}")


def seconds_left(entry: dict[str, Any]) -> float:
    return (parse_ts(entry["expires_at"]) - datetime.now(timezone.utc)).total_seconds()


@pytest.fixture
def make_node() -> Iterator[MakeNode]:
    nodes: list[EmulatedNode] = []

    def make(**kwargs: Any) -> EmulatedNode:
        node = EmulatedNode(**kwargs)
        node.start()
        nodes.append(node)
        return node

    yield make
    for n in nodes:
        n.stop()


def post(node: EmulatedNode, path: str, body: Any = None, **kw: Any) -> web.Reply:
    return web.post(node.url + path, json=body, timeout=kw.pop("timeout", T), **kw)


def ps(node: EmulatedNode) -> list[dict[str, Any]]:
    r = web.get(node.url + "/api/ps", timeout=T)
    assert r.status_code == 200
    models = r.json()["models"]
    assert isinstance(models, list)
    return models


def ps_names(node: EmulatedNode) -> list[str]:
    return [m["name"] for m in ps(node)]


def wait_until(cond: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def hand_estimate_llama31_8b_4096() -> int:
    """The classic approximation (weights + KV + graph + 457 MiB + W/L + KV/L) for llama3.1:8b."""
    w = 4_920_753_328
    kv = 4096 * (128 + 128) * 8 * 2 * 32  # C * (Dk + Dv) * Hkv * f16 * layers = 512 MiB
    graph = 4 * 512 * (1 + 4 * 4096 + 4096 * (1 + 32))  # G_full, larger than 4B(E+V) here
    return w + kv + graph + 457 * MIB + w // 32 + kv // 32


def hand_classic_llama31_8b_4096() -> int:
    """estimateGPULayers@v0.12.10 fully offloaded on one GPU, from the model's tensor list by hand:
    457 MiB + buffer (blk.0 + its KV) + every block with its KV + output layer + full graph."""
    layers = CATALOGUE["llama3.1:8b"].layers
    kv_layer = 4096 * (128 + 128) * 8 * 2  # 16 MiB per layer at 4096 tokens, f16
    graph = 4 * 512 * (1 + 4 * 4096 + 4096 * (1 + 32))
    blocks = sum(b + kv_layer for b in layers.blocks_bytes)
    return 457 * MIB + layers.blocks_bytes[0] + kv_layer + blocks + layers.output_bytes + graph


# -- catalogue and pure helpers -------------------------------------------------------------


def test_catalogue_has_the_well_known_models_with_real_figures() -> None:
    for name in (
        "all-minilm:latest",
        "nomic-embed-text:latest",
        "mxbai-embed-large:latest",
        "llama3.2:latest",
        "llama3.2:1b",
        "llama3.1:8b",
        "qwen2.5:7b",
        "qwen2.5:14b",
        "mistral:latest",
        "gemma2:2b",
        "phi3:mini",
    ):
        spec = CATALOGUE[name]
        assert ":" in spec.name
        assert re.fullmatch(r"[0-9a-f]{64}", spec.digest)
    l8 = CATALOGUE["llama3.1:8b"]
    assert (l8.block_count, l8.embedding_length, l8.head_count, l8.head_count_kv) == (32, 4096, 32, 8)
    assert (l8.context_length, l8.vocab_size, l8.architecture) == (131072, 128256, "llama")
    assert 4.8e9 < l8.file_size_bytes < 5.0e9
    nomic = CATALOGUE["nomic-embed-text:latest"]
    assert nomic.embedding_only
    assert nomic.architecture == "nomic-bert"
    assert nomic.context_length == 2048
    assert 2.6e8 < nomic.file_size_bytes < 2.9e8
    assert CATALOGUE["mxbai-embed-large:latest"].context_length == 512
    assert 1.9e9 < CATALOGUE["llama3.2:latest"].file_size_bytes < 2.1e9
    assert CATALOGUE["mistral:latest"].quantization_level == "Q4_0"


def test_estimate_matches_the_classic_formula_by_hand() -> None:
    est = estimate_memory(CATALOGUE["llama3.1:8b"], 4096)
    assert est.kv_bytes == 512 * MIB
    assert est.minimum_bytes == GPU_MINIMUM_BYTES == 457 * MIB
    assert est.full_bytes == hand_estimate_llama31_8b_4096()
    # The KV cache is sized by min(num_ctx, trained context): bert at 4096 counts only 512 rows.
    minilm = estimate_memory(CATALOGUE["all-minilm:latest"], 4096)
    assert minilm.kv_bytes == 512 * (32 + 32) * 12 * 2 * 6
    # Bigger context, bigger model.
    assert estimate_memory(CATALOGUE["llama3.1:8b"], 8192).full_bytes > est.full_bytes


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("10s", 10.0),
        ("1.5h", 5400.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("250ms", 0.25),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-1", 'time: missing unit in duration "-1"'),
        ("300", 'time: missing unit in duration "300"'),
        ("5x", 'time: unknown unit "x" in duration "5x"'),
        ("", 'time: invalid duration ""'),
        ("m", 'time: invalid duration "m"'),
    ],
)
def test_go_duration_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_go_duration(text)


def test_keep_alive_values() -> None:
    assert parse_keep_alive(None) is None
    assert parse_keep_alive(-1) == float("inf")
    assert parse_keep_alive("-1m") == float("inf")
    assert parse_keep_alive(2.5) == 2.5
    assert parse_keep_alive(0) == 0.0
    with pytest.raises(ValueError, match="Unsupported type: 'bool'"):
        parse_keep_alive(True)


def test_rfc3339nano_formatting() -> None:
    minus7 = timezone(-timedelta(hours=7))
    assert format_rfc3339nano(1_717_537_111_837_530_000, minus7) == "2024-06-04T14:38:31.83753-07:00"
    assert format_rfc3339nano(1_717_537_111_000_000_000, timezone.utc) == "2024-06-04T21:38:31Z"


def test_bad_node_arguments_are_typed_errors() -> None:
    with pytest.raises(EmulatorError, match="unknown model"):
        EmulatedNode("x", (8192,), ("no-such-model",))
    with pytest.raises(EmulatorError, match="loopback"):
        EmulatedNode("x", (8192,), (), host="10.0.0.1")
    with pytest.raises(EmulatorError, match="unique"):
        EmulatedCluster([EmulatedNode("a", (), ()), EmulatedNode("a", (), ())])
    with pytest.raises(EmulatorError, match="start"):
        _ = EmulatedNode("x", (), ()).url


# -- read endpoints -------------------------------------------------------------------------


def test_root_version_head_and_unknown_path(make_node: MakeNode) -> None:
    node = make_node(name="n", version="0.12.6")
    r = web.get(node.url + "/", timeout=T)
    assert (r.status_code, r.text) == (200, "Ollama is running")
    assert web.get(node.url + "/api/version", timeout=T).json() == {"version": "0.12.6"}
    head = web.head(node.url + "/api/version", timeout=T)
    assert head.status_code == 200
    assert head.content == b""
    assert web.head(node.url + "/api/tags", timeout=T).status_code == 200
    assert web.get(node.url + "/api/nothing", timeout=T).status_code == 404
    assert web.get(node.url + "/metrics", timeout=T).status_code == 404  # metrics=False


def test_tags_shape(make_node: MakeNode) -> None:
    node = make_node(name="n", models=("llama3.1:8b", "nomic-embed-text"), utc_offset_s=-7 * 3600)
    models = web.get(node.url + "/api/tags", timeout=T).json()["models"]
    assert sorted(m["name"] for m in models) == ["llama3.1:8b", "nomic-embed-text:latest"]
    for m in models:
        assert set(m) == TAGS_KEYS
        assert m["name"] == m["model"]
        spec = CATALOGUE[m["name"]]
        assert m["size"] == spec.file_size_bytes
        assert m["digest"] == spec.digest
        assert not m["digest"].startswith("sha256:")
        assert set(m["details"]) == DETAILS_KEYS
        assert m["details"]["format"] == "gguf"
        assert m["details"]["parent_model"] == ""
        assert isinstance(m["details"]["families"], list)
        assert m["modified_at"].endswith("-07:00")
        parse_ts(m["modified_at"])


def test_ps_empty(make_node: MakeNode) -> None:
    node = make_node(name="n")
    assert web.get(node.url + "/api/ps", timeout=T).json() == {"models": []}


def test_show_llm(make_node: MakeNode) -> None:
    node = make_node(name="n", models=("llama3.1:8b", "qwen2.5:7b"))
    r = post(node, "/api/show", {"model": "llama3.1:8b"})
    assert r.status_code == 200
    show = r.json()
    assert {
        "modelfile",
        "parameters",
        "template",
        "details",
        "model_info",
        "capabilities",
        "modified_at",
    } <= set(show)
    assert show["capabilities"] == ["completion", "tools"]
    info = show["model_info"]
    assert info["general.architecture"] == "llama"
    assert info["general.parameter_count"] == 8_030_261_248
    assert info["llama.block_count"] == 32
    assert info["llama.context_length"] == 131072
    assert info["llama.embedding_length"] == 4096
    assert info["llama.attention.head_count"] == 32
    assert info["llama.attention.head_count_kv"] == 8
    assert info["llama.vocab_size"] == 128256
    assert info["tokenizer.ggml.tokens"] is None  # every array is null without verbose
    assert "llama.pooling_type" not in info
    assert "num_ctx" not in show["parameters"]
    # qwen2 GGUFs carry no <arch>.vocab_size; the deprecated "name" key still works.
    qwen = post(node, "/api/show", {"name": "qwen2.5:7b"}).json()
    assert qwen["model_info"]["general.architecture"] == "qwen2"
    assert "qwen2.vocab_size" not in qwen["model_info"]


def test_show_embedding_model(make_node: MakeNode) -> None:
    node = make_node(name="n", models=("nomic-embed-text:latest", "all-minilm"))
    show = post(node, "/api/show", {"model": "nomic-embed-text"}).json()
    assert show["capabilities"] == ["embedding"]
    info = show["model_info"]
    assert info["general.architecture"] == "nomic-bert"
    assert info["nomic-bert.pooling_type"] == 1
    assert info["nomic-bert.context_length"] == 2048
    assert "nomic-bert.attention.head_count_kv" not in info  # BERT GGUFs have none
    assert re.search(r"^num_ctx +8192$", show["parameters"], re.M)
    assert "PARAMETER num_ctx 8192" in show["modelfile"]
    assert "bert.pooling_type" in post(node, "/api/show", {"model": "all-minilm"}).json()["model_info"]


def test_show_errors(make_node: MakeNode) -> None:
    node = make_node(name="n")
    r = post(node, "/api/show", {"model": "nope"})
    assert (r.status_code, r.json()) == (404, {"error": "model 'nope' not found"})
    r = post(node, "/api/show", {})
    assert (r.status_code, r.json()) == (400, {"error": "model is required"})
    r = web.post(node.url + "/api/show", timeout=T)
    assert (r.status_code, r.json()) == (400, {"error": "missing request body"})


# -- loading ----------------------------------------------------------------------------------


def test_generate_load_shape_and_ps_entry(make_node: MakeNode) -> None:
    node = make_node(name="n", gpus_mib=(8192,), models=("llama3.1:8b",), utc_offset_s=2 * 3600)
    r = post(node, "/api/generate", {"model": "llama3.1:8b"})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "llama3.1:8b"
    assert body["response"] == ""
    assert body["done"] is True
    assert body["done_reason"] == "load"
    assert body["created_at"].endswith("Z")
    [entry] = ps(node)
    assert set(entry) == PS_KEYS
    assert set(entry["details"]) == DETAILS_KEYS
    assert entry["details"]["parent_model"] == ""
    assert entry["name"] == entry["model"] == "llama3.1:8b"
    assert entry["digest"] == CATALOGUE["llama3.1:8b"].digest
    assert entry["size"] == entry["size_vram"] == hand_classic_llama31_8b_4096()
    assert entry["context_length"] == 4096
    assert entry["expires_at"].endswith("+02:00")
    assert 200 < seconds_left(entry) <= 301  # OLLAMA_KEEP_ALIVE default 5m
    assert node.loaded() == [entry] or node.loaded()[0]["name"] == "llama3.1:8b"


def test_chat_embed_and_embeddings_load(make_node: MakeNode) -> None:
    node = make_node(name="n", gpus_mib=(16384,), models=("llama3.2", "nomic-embed-text", "all-minilm"))
    chat = post(node, "/api/chat", {"model": "llama3.2", "messages": []}).json()
    assert chat["message"] == {"role": "assistant", "content": ""}
    assert chat["done"] is True
    assert chat["done_reason"] == "load"
    assert chat["model"] == "llama3.2"
    embed = post(node, "/api/embed", {"model": "nomic-embed-text"})
    assert (embed.status_code, embed.json()) == (200, {"model": "nomic-embed-text", "embeddings": []})
    legacy = post(node, "/api/embeddings", {"model": "all-minilm"})
    assert (legacy.status_code, legacy.json()) == (200, {"embedding": []})
    assert sorted(ps_names(node)) == ["all-minilm:latest", "llama3.2:latest", "nomic-embed-text:latest"]
    nomic = next(m for m in ps(node) if m["name"] == "nomic-embed-text:latest")
    assert nomic["context_length"] == 8192  # the model's PARAMETER num_ctx, not the server default


def test_real_requests_answer_and_refresh_expiry(make_node: MakeNode) -> None:
    node = make_node(name="n", gpus_mib=(16384,), models=("llama3.2", "all-minilm"))
    post(node, "/api/generate", {"model": "llama3.2", "keep_alive": "1m"})
    first = ps(node)[0]["expires_at"]
    time.sleep(0.02)
    r = post(node, "/api/generate", {"model": "llama3.2", "prompt": "hi", "stream": False})
    assert r.status_code == 200
    assert r.json()["response"]
    assert r.json()["done_reason"] == "stop"
    assert parse_ts(ps(node)[0]["expires_at"]) > parse_ts(first)
    streamed = post(node, "/api/generate", {"model": "llama3.2", "prompt": "hi"})
    lines = [json.loads(x) for x in streamed.text.splitlines()]
    assert len(lines) >= 2
    assert lines[-1]["done"] is True
    assert lines[0]["done"] is False
    chat = post(
        node,
        "/api/chat",
        {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False},
    )
    assert chat.json()["message"]["content"]
    vec = post(node, "/api/embed", {"model": "all-minilm", "input": ["a", "b"]}).json()["embeddings"]
    assert len(vec) == 2
    assert len(vec[0]) == 384
    assert (
        len(post(node, "/api/embeddings", {"model": "all-minilm", "prompt": "a"}).json()["embedding"]) == 384
    )


def test_generate_on_embedding_model_is_400_and_not_loaded(make_node: MakeNode) -> None:
    node = make_node(name="n", models=("nomic-embed-text",))
    r = post(node, "/api/generate", {"model": "nomic-embed-text"})
    assert (r.status_code, r.json()) == (400, {"error": '"nomic-embed-text" does not support generate'})
    r = post(node, "/api/chat", {"model": "nomic-embed-text", "messages": []})
    assert (r.status_code, r.json()) == (400, {"error": '"nomic-embed-text" does not support chat'})
    assert ps(node) == []


def test_unknown_model_errors(make_node: MakeNode) -> None:
    node = make_node(name="n")
    for path, body in (
        ("/api/generate", {"model": "nope"}),
        ("/api/chat", {"model": "nope", "messages": []}),
    ):
        r = post(node, path, body)
        assert (r.status_code, r.json()) == (404, {"error": "model 'nope' not found"})
    for path in ("/api/embed", "/api/embeddings"):
        r = post(node, path, {"model": "nope"})
        assert (r.status_code, r.json()) == (404, {"error": 'model "nope" not found, try pulling it first'})
    r = post(node, "/api/chat", {"messages": []})
    assert (r.status_code, r.json()) == (400, {"error": "model is required"})
    for path in ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings"):
        r = web.post(node.url + path, timeout=T)
        assert (r.status_code, r.json()) == (400, {"error": "missing request body"})


def test_unload_with_keep_alive_zero(make_node: MakeNode) -> None:
    node = make_node(name="n", gpus_mib=(16384,), models=("llama3.2", "nomic-embed-text"))
    post(node, "/api/generate", {"model": "llama3.2"})
    post(node, "/api/embed", {"model": "nomic-embed-text"})
    r = post(node, "/api/generate", {"model": "llama3.2", "keep_alive": 0})
    assert r.status_code == 200
    assert r.json()["done_reason"] == "unload"
    assert r.json()["done"] is True
    assert r.json()["response"] == ""
    assert ps_names(node) == ["nomic-embed-text:latest"]
    # Also for an embedding model (the unload branch comes before the capability check).
    r = post(node, "/api/generate", {"model": "nomic-embed-text", "keep_alive": "0s"})
    assert r.status_code == 200
    assert r.json()["done_reason"] == "unload"
    assert ps(node) == []
    # Not loaded: still 200.
    r = post(node, "/api/chat", {"model": "llama3.2", "messages": [], "keep_alive": 0})
    assert r.status_code == 200
    assert r.json()["done_reason"] == "unload"
    assert r.json()["message"] == {"role": "assistant", "content": ""}
    assert [e.kind for e in node.events()].count("unload") == 2
    # /api/embed with keep_alive 0 loads, answers, then unloads.
    assert post(node, "/api/embed", {"model": "nomic-embed-text", "keep_alive": 0}).status_code == 200
    assert ps(node) == []


@pytest.mark.parametrize(
    ("keep_alive", "low_s", "high_s"),
    [("5m", 290, 301), ("1h30m", 5390, 5401), (10, 5, 11), (2.5, 0, 3), ("10s", 5, 11)],
)
def test_keep_alive_durations(make_node: MakeNode, keep_alive: Any, low_s: float, high_s: float) -> None:
    node = make_node(name="n", models=("all-minilm",))
    assert post(node, "/api/embed", {"model": "all-minilm", "keep_alive": keep_alive}).status_code == 200
    assert low_s < seconds_left(ps(node)[0]) <= high_s


@pytest.mark.parametrize("keep_alive", [-1, "-1m", -5.5, "-1h"])
def test_keep_alive_forever(make_node: MakeNode, keep_alive: Any) -> None:
    node = make_node(name="n", models=("llama3.2",))
    assert post(node, "/api/generate", {"model": "llama3.2", "keep_alive": keep_alive}).status_code == 200
    assert parse_ts(ps(node)[0]["expires_at"]).year > 2300


@pytest.mark.parametrize(
    ("keep_alive", "error"),
    [
        ("-1", 'time: missing unit in duration "-1"'),
        ("300", 'time: missing unit in duration "300"'),
        (True, "Unsupported type: 'bool'"),
    ],
)
def test_bad_keep_alive_is_400_and_loads_nothing(make_node: MakeNode, keep_alive: Any, error: str) -> None:
    node = make_node(name="n", models=("llama3.2", "all-minilm"))
    for path, model in (("/api/generate", "llama3.2"), ("/api/embed", "all-minilm")):
        r = post(node, path, {"model": model, "keep_alive": keep_alive})
        assert (r.status_code, r.json()) == (400, {"error": error})
    assert ps(node) == []


def test_request_without_keep_alive_keeps_the_duration(make_node: MakeNode) -> None:
    node = make_node(name="n", models=("llama3.2",))
    post(node, "/api/generate", {"model": "llama3.2", "keep_alive": -1})
    post(node, "/api/generate", {"model": "llama3.2", "prompt": "hello", "stream": False})
    post(node, "/api/generate", {"model": "llama3.2", "keep_alive": None})
    assert parse_ts(ps(node)[0]["expires_at"]).year > 2300
    post(node, "/api/generate", {"model": "llama3.2", "keep_alive": "1m"})
    assert seconds_left(ps(node)[0]) < 61


def test_expiry(make_node: MakeNode) -> None:
    node = make_node(name="n", models=("all-minilm", "nomic-embed-text"))
    post(node, "/api/embed", {"model": "all-minilm", "keep_alive": 0.2})
    post(node, "/api/embed", {"model": "nomic-embed-text", "keep_alive": "1h"})
    assert sorted(ps_names(node)) == ["all-minilm:latest", "nomic-embed-text:latest"]
    assert wait_until(lambda: ps_names(node) == ["nomic-embed-text:latest"])
    assert [(e.kind, e.model) for e in node.events() if e.kind == "expire"] == [
        ("expire", "all-minilm:latest")
    ]


def test_ps_sorted_by_expiry_latest_first(make_node: MakeNode) -> None:
    node = make_node(name="n", gpus_mib=(16384,), models=("all-minilm", "nomic-embed-text", "llama3.2"))
    post(node, "/api/embed", {"model": "all-minilm", "keep_alive": "10m"})
    post(node, "/api/embed", {"model": "nomic-embed-text", "keep_alive": -1})
    post(node, "/api/generate", {"model": "llama3.2", "keep_alive": "1h"})
    assert ps_names(node) == ["nomic-embed-text:latest", "llama3.2:latest", "all-minilm:latest"]


# -- the scheduler ----------------------------------------------------------------------------


def test_eviction_takes_the_shortest_keep_alive_first_regardless_of_size(make_node: MakeNode) -> None:
    node = make_node(name="n", gpus_mib=(8192,), models=("all-minilm", "mxbai-embed-large", "llama3.2"))
    node.set_other_usage_mib(0, 3500)
    post(node, "/api/embed", {"model": "all-minilm", "keep_alive": "10m"})
    post(node, "/api/embed", {"model": "mxbai-embed-large", "keep_alive": "5m"})
    node.clear_events()
    assert post(node, "/api/generate", {"model": "llama3.2"}).status_code == 200
    assert sorted(ps_names(node)) == ["all-minilm:latest", "llama3.2:latest"]
    assert [(e.kind, e.model) for e in node.events()] == [
        ("evict", "mxbai-embed-large:latest"),
        ("load", "llama3.2:latest"),
    ]
    entry = next(m for m in ps(node) if m["name"] == "llama3.2:latest")
    assert entry["size_vram"] == entry["size"]


def test_eviction_order_forever_last_but_still_evicted(make_node: MakeNode) -> None:
    node = make_node(name="n", gpus_mib=(8192,), models=("llama3.2", "nomic-embed-text", "llama3.1:8b"))
    post(node, "/api/generate", {"model": "llama3.2", "keep_alive": -1})
    post(node, "/api/embed", {"model": "nomic-embed-text", "keep_alive": "1m"})
    node.clear_events()
    assert post(node, "/api/generate", {"model": "llama3.1:8b"}).status_code == 200
    assert [(e.kind, e.model) for e in node.events()] == [
        ("evict", "nomic-embed-text:latest"),
        ("evict", "llama3.2:latest"),
        ("load", "llama3.1:8b"),
    ]
    [entry] = ps(node)
    assert entry["name"] == "llama3.1:8b"
    assert entry["size_vram"] == entry["size"]


def test_eviction_ties_break_by_name(make_node: MakeNode) -> None:
    node = make_node(name="n", gpus_mib=(8192,), models=("mxbai-embed-large", "all-minilm", "llama3.2"))
    node.set_other_usage_mib(0, 3500)
    post(node, "/api/embed", {"model": "mxbai-embed-large", "keep_alive": "5m"})
    post(node, "/api/embed", {"model": "all-minilm", "keep_alive": "5m"})
    node.clear_events()
    post(node, "/api/generate", {"model": "llama3.2"})
    evicted = [e.model for e in node.events() if e.kind == "evict"]
    assert evicted[0] == "all-minilm:latest"


def test_partial_offload_only_when_nothing_else_is_loaded(make_node: MakeNode) -> None:
    node = make_node(name="n", gpus_mib=(4096,), models=("nomic-embed-text", "llama3.1:8b"))
    post(node, "/api/embed", {"model": "nomic-embed-text", "keep_alive": -1})
    node.clear_events()
    assert post(node, "/api/generate", {"model": "llama3.1:8b"}).status_code == 200
    # It did not fit fully beside nomic, so nomic went (even though it was "forever"), then a partial load.
    assert [(e.kind, e.model) for e in node.events()][:2] == [
        ("evict", "nomic-embed-text:latest"),
        ("load", "llama3.1:8b"),
    ]
    [entry] = ps(node)
    assert 0 < entry["size_vram"] < entry["size"]
    assert entry["size_vram"] <= 4096 * MIB
    # The embedding model now needs to be fully on GPU beside it: the partial model goes.
    post(node, "/api/embed", {"model": "nomic-embed-text"})
    [entry] = ps(node)
    assert entry["name"] == "nomic-embed-text:latest"
    assert entry["size_vram"] == entry["size"]


def test_model_bigger_than_every_gpu_loads_partially_with_whole_layers(make_node: MakeNode) -> None:
    node = make_node(name="n", gpus_mib=(2048,), models=("llama3.1:8b",))
    post(node, "/api/generate", {"model": "llama3.1:8b"})
    [entry] = ps(node)
    assert 0 < entry["size_vram"] < entry["size"]
    assert node.gpu_state()[0]["used_bytes"] == entry["size_vram"] <= 2048 * MIB
    # Layers go to the GPU from the last block down; what stays on CPU is the first k blocks (with
    # their KV cache) and the output layer: whole layers only.
    layers = CATALOGUE["llama3.1:8b"].layers
    kv_layer = 4096 * 256 * 8 * 2
    on_cpu = entry["size"] - entry["size_vram"]
    prefixes = {layers.output_bytes + sum(b + kv_layer for b in layers.blocks_bytes[:k]) for k in range(33)}
    assert on_cpu in prefixes


def test_cpu_only_node_and_ram_limit(make_node: MakeNode) -> None:
    node = make_node(name="cpu", gpus_mib=(), models=("nomic-embed-text", "llama3.1:8b"), ram_bytes=4 * GIB)
    assert post(node, "/api/embed", {"model": "nomic-embed-text"}).status_code == 200
    [entry] = ps(node)
    assert entry["size_vram"] == 0
    assert entry["size"] > 0
    assert node.gpu_state() == []
    r = post(node, "/api/generate", {"model": "llama3.1:8b"})
    assert r.status_code == 500
    assert r.json()["error"].startswith("model requires more system memory")
    assert ps_names(node) == []  # the embedding model was evicted trying to make room


def test_num_gpu_zero_loads_on_cpu(make_node: MakeNode) -> None:
    node = make_node(name="n", gpus_mib=(8192,), models=("llama3.2",))
    post(node, "/api/generate", {"model": "llama3.2", "options": {"num_gpu": 0}})
    [entry] = ps(node)
    assert entry["size_vram"] == 0
    assert node.gpu_state()[0]["used_bytes"] == 0


def test_num_gpu_all_layers_is_all_or_error(make_node: MakeNode) -> None:
    node = make_node(name="n", gpus_mib=(4096,), models=("llama3.1:8b", "llama3.2"))
    r = post(node, "/api/generate", {"model": "llama3.1:8b", "options": {"num_gpu": 999}})
    assert r.status_code == 500
    assert "out of memory" in r.json()["error"]
    assert ps(node) == []
    assert post(node, "/api/generate", {"model": "llama3.2", "options": {"num_gpu": 999}}).status_code == 200


def test_multi_gpu_spread(make_node: MakeNode) -> None:
    node = make_node(name="n", gpus_mib=(8192, 8192), models=("qwen2.5:14b", "llama3.2"))
    assert node.estimate("qwen2.5:14b").full_bytes > 8192 * MIB
    post(node, "/api/generate", {"model": "qwen2.5:14b"})
    [entry] = ps(node)
    assert entry["size_vram"] == entry["size"]
    used = [g["used_bytes"] for g in node.gpu_state()]
    assert all(u > 0 for u in used)
    assert sum(used) == entry["size"]
    # A model that fits one GPU stays on one GPU.
    other = make_node(name="m", gpus_mib=(8192, 8192), models=("llama3.2",))
    post(other, "/api/generate", {"model": "llama3.2"})
    assert sorted(g["used_bytes"] > 0 for g in other.gpu_state()) == [False, True]


def test_max_loaded_models_is_three_per_gpu(make_node: MakeNode) -> None:
    node = make_node(
        name="cpu", gpus_mib=(), models=("all-minilm", "nomic-embed-text", "mxbai-embed-large", "llama3.2:1b")
    )
    assert node.max_loaded_models == 3
    post(node, "/api/embed", {"model": "all-minilm", "keep_alive": "1h"})
    post(node, "/api/embed", {"model": "nomic-embed-text", "keep_alive": "2m"})
    post(node, "/api/embed", {"model": "mxbai-embed-large", "keep_alive": "3m"})
    post(node, "/api/generate", {"model": "llama3.2:1b"})
    assert sorted(ps_names(node)) == ["all-minilm:latest", "llama3.2:1b", "mxbai-embed-large:latest"]


def test_num_ctx_change_reloads(make_node: MakeNode) -> None:
    node = make_node(name="n", gpus_mib=(16384,), models=("llama3.2",))
    post(node, "/api/generate", {"model": "llama3.2"})
    small = ps(node)[0]
    node.clear_events()
    post(node, "/api/generate", {"model": "llama3.2", "options": {"num_ctx": 8192}})
    big = ps(node)[0]
    assert big["context_length"] == 8192
    assert big["size"] > small["size"]
    # num_gpu -1 never reloads; the same num_ctx does not either.
    post(node, "/api/generate", {"model": "llama3.2", "options": {"num_ctx": 8192, "num_gpu": -1}})
    # Without options the server default applies again: that is another reload (why preloads send none).
    post(node, "/api/generate", {"model": "llama3.2", "prompt": "x", "stream": False})
    assert [e.kind for e in node.events()] == ["reload", "reload"]
    assert ps(node)[0]["context_length"] == 4096


def test_model_being_loaded_shows_in_ps_and_reads_keep_answering(make_node: MakeNode) -> None:
    node = make_node(name="n", models=("llama3.2",), load_delay_s=0.4)
    results: list[int] = []
    thread = threading.Thread(
        target=lambda: results.append(post(node, "/api/generate", {"model": "llama3.2"}).status_code)
    )
    thread.start()
    seen_while_loading = wait_until(lambda: "llama3.2:latest" in ps_names(node) and thread.is_alive())
    tags_ok = web.get(node.url + "/api/tags", timeout=T).status_code == 200
    thread.join(T)
    assert seen_while_loading
    assert tags_ok
    assert results == [200]


def test_restart_drops_models(make_node: MakeNode) -> None:
    node = make_node(name="n", models=("llama3.2",))
    post(node, "/api/generate", {"model": "llama3.2", "keep_alive": -1})
    node.restart()
    assert ps(node) == []
    assert node.events()[-1].kind == "restart"
    post(node, "/api/generate", {"model": "llama3.2"})
    node.restart(down_s=0.3, wait=False)
    with pytest.raises(web.Unreachable):
        web.get(node.url + "/api/ps", timeout=T)
    assert wait_until(lambda: node.running)
    assert ps(node) == []


def test_direct_load_and_errors() -> None:
    node = EmulatedNode("n", (4096,), ("llama3.2", "nomic-embed-text"))
    entry = node.load("llama3.2", keep_alive="10m")  # no server needed
    assert entry["name"] == "llama3.2:latest"
    assert entry["size_vram"] == entry["size"]
    assert [m["name"] for m in node.loaded()] == ["llama3.2:latest"]
    with pytest.raises(EmulatorError, match="not installed"):
        node.load("qwen2.5:7b")
    with pytest.raises(EmulatorError, match="missing unit"):
        node.load("llama3.2", keep_alive="-1")
    node.unload("llama3.2")
    assert node.loaded() == []


def test_custom_model_spec(make_node: MakeNode) -> None:
    spec = ModelSpec(
        name="tiny",
        family="llama",
        parameter_size="100M",
        quantization_level="Q8_0",
        file_size_bytes=100 * MIB,
        architecture="llama",
        block_count=4,
        embedding_length=512,
        head_count=8,
        head_count_kv=8,
        context_length=2048,
        vocab_size=32000,
    )
    assert spec.name == "tiny:latest"
    assert spec.parameter_count == 100_000_000
    node = make_node(name="n", models=(spec,))
    assert post(node, "/api/generate", {"model": "tiny"}).status_code == 200
    assert ps_names(node) == ["tiny:latest"]


# -- faults ---------------------------------------------------------------------------------


def test_fault_refuse_and_relisten_on_the_same_port(make_node: MakeNode) -> None:
    node = make_node(name="n")
    url = node.url
    node.set_fault(Fault.REFUSE)
    with pytest.raises(web.Unreachable):
        web.get(url + "/api/version", timeout=T)
    node.clear_fault()
    assert node.url == url
    assert web.get(url + "/api/version", timeout=T).status_code == 200


def test_fault_refuse_on_some_paths_drops_those_connections(make_node: MakeNode) -> None:
    node = make_node(name="n")
    node.set_fault(Fault.REFUSE, paths=("/api/ps",))
    with pytest.raises(web.Unreachable):
        web.get(node.url + "/api/ps", timeout=T)
    assert web.get(node.url + "/api/version", timeout=T).status_code == 200


def test_fault_hang_times_out_while_others_answer(make_node: MakeNode) -> None:
    node = make_node(name="n")
    other = make_node(name="m")
    node.set_fault(Fault.HANG, paths=("/api/ps",))
    with pytest.raises(web.Timeout):
        web.get(node.url + "/api/ps", timeout=0.2)
    assert web.get(node.url + "/api/version", timeout=T).status_code == 200
    assert web.get(other.url + "/api/ps", timeout=T).status_code == 200
    node.set_fault(Fault.HANG)
    with pytest.raises(web.Timeout):
        web.get(node.url + "/api/version", timeout=0.2)
    node.clear_fault()
    assert web.get(node.url + "/api/ps", timeout=T).json() == {"models": []}


def test_stop_does_not_wait_for_hanging_requests() -> None:
    node = EmulatedNode("n", (), ())
    node.start()
    node.set_fault(Fault.HANG)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            web.get(node.url + "/api/ps", timeout=T)
        except web.RequestError as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    assert wait_until(lambda: len(node.requests) == 1)
    node.stop()
    thread.join(T)
    assert not thread.is_alive()
    assert len(errors) == 1
    node.stop()  # idempotent


def test_fault_http500_garbage_wrong_shape(make_node: MakeNode) -> None:
    node = make_node(name="n", models=("llama3.2",))
    node.set_fault(Fault.HTTP500)
    r = web.get(node.url + "/api/ps", timeout=T)
    assert r.status_code == 500
    assert isinstance(r.json()["error"], str)
    assert post(node, "/api/generate", {"model": "llama3.2"}).status_code == 500
    node.set_fault(Fault.GARBAGE)
    r = web.get(node.url + "/api/ps", timeout=T)
    assert r.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        r.json()
    node.set_fault(Fault.WRONG_SHAPE)
    r = web.get(node.url + "/api/ps", timeout=T)
    assert r.status_code == 200
    assert r.json() == {"models": "x"}
    node.clear_fault()
    assert ps(node) == []  # faulted requests had no side effects


def test_fault_slow(make_node: MakeNode) -> None:
    node = make_node(name="n")
    node.set_fault(Fault.SLOW, slow_s=0.4, paths=("/api/ps",))
    with pytest.raises(web.Timeout):
        web.get(node.url + "/api/ps", timeout=0.05)
    assert web.get(node.url + "/api/ps", timeout=T).json() == {"models": []}
    assert web.get(node.url + "/api/version", timeout=0.2).status_code == 200


# -- recording and metrics --------------------------------------------------------------------


def test_request_recording(make_node: MakeNode) -> None:
    node = make_node(name="n", models=("llama3.2",))
    web.get(node.url + "/api/ps", timeout=T)
    post(node, "/api/show", {"model": "llama3.2"})
    post(node, "/api/generate", {"model": "llama3.2", "keep_alive": "5m"})
    recorded = node.requests
    assert [(r.method, r.path) for r in recorded] == [
        ("GET", "/api/ps"),
        ("POST", "/api/show"),
        ("POST", "/api/generate"),
    ]
    assert recorded[2].body == {"model": "llama3.2", "keep_alive": "5m"}
    assert recorded[0].body is None
    assert recorded[0].at_monotonic_s <= recorded[2].at_monotonic_s
    assert [r.path for r in node.mutating_requests()] == ["/api/generate"]
    node.clear_requests()
    assert node.requests == []


def test_pull_and_delete_are_mutating(make_node: MakeNode) -> None:
    node = make_node(name="n", models=("llama3.2",))
    assert post(node, "/api/pull", {"model": "all-minilm", "stream": False}).json() == {"status": "success"}
    assert "all-minilm:latest" in [m.name for m in node.installed()]
    r = web.delete(node.url + "/api/delete", json={"model": "llama3.2"}, timeout=T)
    assert r.status_code == 200
    assert [m.name for m in node.installed()] == ["all-minilm:latest"]
    assert [r.path for r in node.mutating_requests()] == ["/api/pull", "/api/delete"]


def parse_metrics(text: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        assert m, line
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        out[f"{m.group(1)}/{labels['gpu']}"] = {"labels": labels, "value": float(m.group(3))}
    return out


def test_metrics_dcgm_format(make_node: MakeNode) -> None:
    node = make_node(
        name="gpu-box", gpus_mib=(8192, 4096), metrics=True, models=("llama3.2",), reserved_mib=100
    )
    node.set_other_usage_mib(1, 512)
    text = web.get(node.metrics_url, timeout=T).text
    for metric in ("DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_RESERVED"):
        assert f"# HELP {metric} " in text
        assert f"# TYPE {metric} gauge" in text
    values = parse_metrics(text)
    for gpu, total in (("0", 8192), ("1", 4096)):
        free, used, reserved = (
            values[f"DCGM_FI_DEV_FB_{k}/{gpu}"]["value"] for k in ("FREE", "USED", "RESERVED")
        )
        assert free + used + reserved == total
    assert values["DCGM_FI_DEV_FB_USED/1"]["value"] == 512
    labels = values["DCGM_FI_DEV_FB_FREE/0"]["labels"]
    assert labels["UUID"].startswith("GPU-")
    assert labels["device"] == "nvidia0"
    assert labels["Hostname"] == "gpu-box"
    assert labels["modelName"].startswith("NVIDIA")
    assert "pci_bus_id" in labels
    post(node, "/api/generate", {"model": "llama3.2"})
    after = parse_metrics(web.get(node.metrics_url, timeout=T).text)
    size_vram = ps(node)[0]["size_vram"]
    assert after["DCGM_FI_DEV_FB_USED/0"]["value"] == size_vram // MIB


# -- clusters, demo and CLI -------------------------------------------------------------------


def test_cluster_context_manager() -> None:
    a, b = EmulatedNode("a", (8192,), ()), EmulatedNode("b", (), ())
    with EmulatedCluster([a, b]) as cluster:
        assert cluster["b"] is b
        assert len(cluster) == 2
        for n in cluster:
            assert web.get(n.url + "/api/version", timeout=T).status_code == 200
    with pytest.raises(web.Unreachable):
        web.get(a.url + "/api/version", timeout=T)


def test_demo_cluster() -> None:
    cluster = demo_cluster()
    with cluster:
        assert [n.name for n in cluster] == ["gpu-small", "cpu-only", "gpu-8g"]
        small, cpu, big = cluster["gpu-small"], cluster["cpu-only"], cluster["gpu-8g"]
        assert small.gpus_mib == (4096,)
        assert cpu.gpus_mib == ()
        assert big.gpus_mib == (8192,)
        assert small.metrics
        assert big.metrics
        assert not cpu.metrics
        [partial] = ps(small)
        assert partial["name"] == "llama3.1:8b"
        assert 0 < partial["size_vram"] < partial["size"]
        assert small.estimate("llama3.1:8b").full_bytes > 4096 * MIB
        [on_cpu] = ps(cpu)
        assert on_cpu["name"] == "nomic-embed-text:latest"
        assert on_cpu["size_vram"] == 0
        assert all(m["size_vram"] == m["size"] for m in ps(big))
        assert len(ps(big)) == 2
        assert "nomic-embed-text:latest" in [m.name for m in small.installed()]
        assert "nomic-embed-text:latest" in [m.name for m in big.installed()]
        assert web.get(big.metrics_url, timeout=T).status_code == 200
        config = cluster.config(["nomic-embed-text:latest"])
        gpu_by_name = {n["name"]: n["gpu"] for n in config["nodes"]}
        assert gpu_by_name["cpu-only"] == "none"
        assert gpu_by_name["gpu-8g"] == {"exporter": big.metrics_url}
        assert config["priority_models"] == ["nomic-embed-text:latest"]


def test_cli_runs_nodes_and_writes_config(tmp_path: Path) -> None:
    config_path = tmp_path / "gpu-router.yaml"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpu_router.emulator",
            "--nodes",
            "2",
            "--ollama-version",
            "0.30.0",
            "--env",
            "OLLAMA_NUM_PARALLEL=2",
            "--write-config",
            str(config_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=repo,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("node-1 http://127.0.0.1:")
        assert lines[2].startswith("config written")
        config = yaml.safe_load(config_path.read_text())
        assert [n["name"] for n in config["nodes"]] == ["node-1", "node-2"]
        for n in config["nodes"]:
            assert web.get(n["url"] + "/api/version", timeout=T).json() == {"version": "0.30.0"}
            assert web.get(n["gpu"]["exporter"], timeout=T).status_code == 200
        assert config["priority_models"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=T) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_rejects_a_setting_that_is_not_ollamas() -> None:
    from gpu_router.emulator.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--nodes", "1", "--env", "PATH=/tmp"])
    assert exc.value.code == 2
