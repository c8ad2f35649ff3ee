"""The emulator sizes models with the daemon's engine: what the daemon predicts is what a node reports."""

from __future__ import annotations

from typing import Any

import pytest
import web
from daemon_helpers import MakeNode

from gpu_router.emulator import EmulatedNode
from gpu_router.memory import NodeProfile, estimate_memory, parse_ollama_env, preload_check_passes
from gpu_router.ollama import parse_show

MIB = 1024**2
T = 10.0


def daemon_estimate(node: EmulatedNode, model: str, env: dict[str, Any] | None = None) -> Any:
    """What the daemon would predict from this node's own /api/show, /api/tags and /api/version."""
    show = web.post(node.url + "/api/show", json={"model": model}, timeout=T).json()
    tags = {m["name"]: m for m in web.get(node.url + "/api/tags", timeout=T).json()["models"]}
    version = web.get(node.url + "/api/version", timeout=T).json()["version"]
    info = parse_show(show, model)
    profile = NodeProfile(version, tuple(m * MIB for m in node.gpus_mib), parse_ollama_env(env or {}))
    return estimate_memory(info, tags[model]["size"], profile)


@pytest.mark.parametrize("version", ["0.11.6", "0.12.6", "0.13.0", "0.20.0", "0.30.0"])
@pytest.mark.parametrize(
    "model", ["llama3.1:8b", "qwen3:8b", "gemma3:1b", "granite4:tiny-h", "nomic-embed-text:latest"]
)
def test_ps_size_is_what_the_daemon_predicts(make_node: MakeNode, version: str, model: str) -> None:
    node = make_node("n", (24576,), (model,), version=version)
    est = daemon_estimate(node, model)
    assert web.post(node.url + "/api/embed", json={"model": model}, timeout=T).status_code == 200
    [entry] = web.get(node.url + "/api/ps", timeout=T).json()["models"]
    assert entry["size"] == entry["size_vram"] == est.ps_size_bytes
    if entry.get("context_length") is not None:
        assert entry["context_length"] == est.ps_context_length


def test_the_fit_threshold_is_the_daemons_need(make_node: MakeNode) -> None:
    # A GPU exactly as big as the need holds the model fully; a MiB less and it is partly on CPU.
    probe = make_node("probe", (24576,), ("qwen2.5:7b",), version="0.13.0")
    need = daemon_estimate(probe, "qwen2.5:7b").need_bytes
    fits = make_node("fits", (-(-need // MIB),), ("qwen2.5:7b",), version="0.13.0")
    short = make_node("short", (need // MIB - 1,), ("qwen2.5:7b",), version="0.13.0")
    for node in (fits, short):
        web.post(node.url + "/api/generate", json={"model": "qwen2.5:7b"}, timeout=T)
    [full] = fits.loaded()
    [partial] = short.loaded()
    assert full["size"] == full["size_vram"]
    assert partial["size_vram"] < partial["size"]


def test_the_preload_check_is_the_daemons(make_node: MakeNode) -> None:
    node = make_node("n", (12288,), ("llama3.2:1b", "llama3.1:8b"), version="0.30.0")
    node.load("llama3.2:1b", keep_alive=-1)
    free = node.gpu_state()[0]["free_bytes"]
    est = daemon_estimate(node, "llama3.1:8b")
    node.clear_events()
    node.load("llama3.1:8b")
    evicted = [e.model for e in node.events() if e.kind == "evict"]
    assert (evicted == []) == preload_check_passes(est, free)


def test_memory_engine_false_uses_the_emulators_own_port() -> None:
    # The two ports differ most on gemma3n (per-layer embeddings, shared KV layers): a switch to see.
    engine = EmulatedNode("a", (24576,), ("gemma3n:e4b",), version="0.30.0").predict("gemma3n:e4b")
    own = EmulatedNode("b", (24576,), ("gemma3n:e4b",), version="0.30.0", memory_engine=False).predict(
        "gemma3n:e4b"
    )
    assert engine.fully_on_gpu
    assert own.fully_on_gpu
    assert engine.total_bytes != own.total_bytes
