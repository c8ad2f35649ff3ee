"""The emulated Ollama of each era, over real HTTP on 127.0.0.1: what /api/ps shows and how it schedules."""

from __future__ import annotations

from typing import Any

import pytest
import web
from daemon_helpers import MakeNode

from gpu_router.emulator import CATALOGUE, EmulatedNode, EmulatorError, Fault, Version

MIB = 1024**2
GIB = 1024 * MIB
T = 10.0


def post(node: EmulatedNode, path: str, body: dict[str, Any]) -> web.Reply:
    return web.post(node.url + path, json=body, timeout=T)


def ps(node: EmulatedNode) -> list[dict[str, Any]]:
    r = web.get(node.url + "/api/ps", timeout=T)
    assert r.status_code == 200
    models = r.json()["models"]
    assert isinstance(models, list)
    return models


def entry(node: EmulatedNode, model: str) -> dict[str, Any]:
    found = [m for m in ps(node) if m["name"] == model]
    assert len(found) == 1, f"{model} not loaded once: {ps(node)}"
    return found[0]


def kinds(node: EmulatedNode) -> list[tuple[str, str]]:
    return [(e.kind, e.model) for e in node.events()]


# -- what /api/ps says, per version ------------------------------------------------------------


def test_context_length_in_ps_follows_the_version(make_node: MakeNode) -> None:
    request = {"model": "llama3.2", "options": {"num_ctx": 200_000}}  # beyond the trained 131072
    old = make_node("old", (24576,), ("llama3.2",), version="0.9.6")
    assert post(old, "/api/generate", request).status_code == 200
    assert "context_length" not in entry(old, "llama3.2:latest")  # absent before v0.10.0
    mid = make_node("mid", (24576,), ("llama3.2",), version="0.12.6")
    post(mid, "/api/generate", request)
    assert entry(mid, "llama3.2:latest")["context_length"] == 200_000  # requested, unclamped
    new = make_node("new", (24576,), ("llama3.2",), version="0.15.5")
    post(new, "/api/generate", request)
    assert entry(new, "llama3.2:latest")["context_length"] == 131_072  # the runner's, clamped
    # The clamp also sizes the cache: the same request costs the same as asking for 131072.
    assert entry(mid, "llama3.2:latest")["size"] == mid.predict("llama3.2", 131_072).total_bytes


@pytest.mark.parametrize(
    ("version", "gpus", "expected"),
    [
        ("0.6.6", (8192,), 2048),
        ("0.12.6", (8192,), 4096),
        ("0.15.5", (8192,), 4096),
        ("0.15.5", (24576,), 32768),
    ],
)
def test_default_context_in_ps(
    make_node: MakeNode, version: str, gpus: tuple[int, ...], expected: int
) -> None:
    node = make_node("n", gpus, ("qwen3:8b",), version=version, env={"OLLAMA_NUM_PARALLEL": 1})
    post(node, "/api/generate", {"model": "qwen3:8b"})
    if Version.parse(version) >= Version(0, 10, 0):
        assert entry(node, "qwen3:8b")["context_length"] == expected
    assert node.events()[-1].detail.endswith(f"context={min(expected, 40960)} parallel=1")


def test_vram_tier_context_is_clamped_to_the_trained_context(make_node: MakeNode) -> None:
    node = make_node("big", (49152, 49152), ("qwen3:8b",), version="0.15.5")
    assert node.behaviour.default_num_ctx() == 262144
    post(node, "/api/generate", {"model": "qwen3:8b"})
    assert entry(node, "qwen3:8b")["context_length"] == 40960


def test_ps_size_means_what_the_era_means(make_node: MakeNode) -> None:
    sizes = {}
    for version in ("0.12.6", "0.13.0", "0.30.0"):
        node = make_node(
            f"n{version}", (24576,), ("llama3.1:8b",), version=version, env={"OLLAMA_CONTEXT_LENGTH": 4096}
        )
        post(node, "/api/generate", {"model": "llama3.1:8b"})
        e = entry(node, "llama3.1:8b")
        assert e["size"] == e["size_vram"]
        sizes[version] = e["size"]
    # The classic estimate counts a 457 MiB minimum and a buffer layer that allocations do not hold.
    assert sizes["0.12.6"] > sizes["0.13.0"]
    assert sizes["0.12.6"] > sizes["0.30.0"]


def test_parallel_slots_multiply_the_cache(make_node: MakeNode) -> None:
    one = make_node("one", (24576,), ("llama3.1:8b", "nomic-embed-text"))
    four = make_node("four", (24576,), ("llama3.1:8b", "nomic-embed-text"), env={"OLLAMA_NUM_PARALLEL": 4})
    for node in (one, four):
        post(node, "/api/generate", {"model": "llama3.1:8b"})
        post(node, "/api/embed", {"model": "nomic-embed-text"})
    kv = 4096 * 256 * 8 * 2 * 32
    grown = entry(four, "llama3.1:8b")["size"] - entry(one, "llama3.1:8b")["size"]
    assert grown > 3 * kv  # three more slots of cache, and a bigger graph
    # ps context_length is per slot, and embedding models always get one slot.
    assert entry(four, "llama3.1:8b")["context_length"] == 4096
    assert entry(four, "nomic-embed-text:latest")["size"] == entry(one, "nomic-embed-text:latest")["size"]


def test_automatic_parallel_before_0_10_takes_two_slots_when_they_fit(make_node: MakeNode) -> None:
    roomy = make_node("roomy", (24576,), ("llama3.1:8b",), version="0.9.6")
    tight = make_node("tight", (6656,), ("llama3.1:8b",), version="0.9.6")
    post(roomy, "/api/generate", {"model": "llama3.1:8b"})
    post(tight, "/api/generate", {"model": "llama3.1:8b"})
    assert roomy.events()[-1].detail.endswith("parallel=2")
    assert tight.events()[-1].detail.endswith("parallel=1")  # two slots did not fit: one
    assert entry(roomy, "llama3.1:8b")["size"] > entry(tight, "llama3.1:8b")["size"]


def test_kv_cache_type_needs_flash_attention(make_node: MakeNode) -> None:
    env = {"OLLAMA_KV_CACHE_TYPE": "q8_0"}
    plain = make_node("plain", (24576,), ("llama3.1:8b", "qwen3:8b"))
    quant = make_node("quant", (24576,), ("llama3.1:8b", "qwen3:8b"), env=env)
    for node in (plain, quant):
        for model in ("llama3.1:8b", "qwen3:8b"):
            post(node, "/api/generate", {"model": model})
    # llama3.1 has no flash attention by default at v0.12.6: q8_0 does nothing; qwen3 has it.
    assert entry(quant, "llama3.1:8b")["size"] == entry(plain, "llama3.1:8b")["size"]
    assert entry(quant, "qwen3:8b")["size"] < entry(plain, "qwen3:8b")["size"]


# -- scheduling ----------------------------------------------------------------------------


def test_max_loaded_models_from_the_environment(make_node: MakeNode) -> None:
    node = make_node("n", (24576,), ("llama3.2", "llama3.2:1b"), env={"OLLAMA_MAX_LOADED_MODELS": 1})
    assert node.max_loaded_models == 1
    post(node, "/api/generate", {"model": "llama3.2", "keep_alive": -1})
    post(node, "/api/generate", {"model": "llama3.2:1b"})
    assert [m["name"] for m in ps(node)] == ["llama3.2:1b"]
    assert ("evict", "llama3.2:latest") in kinds(node)


def test_a_different_num_ctx_reloads_and_no_options_reuses(make_node: MakeNode) -> None:
    node = make_node("n", (24576,), ("llama3.2",))
    node.load("llama3.2", keep_alive=-1)
    node.clear_events()
    node.client_request("llama3.2", num_ctx=8192)
    assert [k for k, _ in kinds(node)] == ["client", "reload"]
    assert entry(node, "llama3.2:latest")["context_length"] == 8192
    node.clear_events()
    post(node, "/api/generate", {"model": "llama3.2"})  # the default 4096 again: another reload
    post(node, "/api/generate", {"model": "llama3.2"})  # same options: the loaded runner
    assert [k for k, _ in kinds(node)] == ["reload"]


def test_a_client_keep_alive_replaces_the_pin_without_reloading(make_node: MakeNode) -> None:
    node = make_node("n", (24576,), ("llama3.2",))
    node.load("llama3.2", keep_alive=-1)
    node.clear_events()
    node.client_request("llama3.2", keep_alive="6s")
    assert [k for k, _ in kinds(node)] == ["client"]
    assert int(entry(node, "llama3.2:latest")["expires_at"][:4]) < 2100  # no longer "forever"
    assert node.mutating_requests() == []  # a client's request is not the daemon's


def test_v030_preload_check_evicts_even_a_pinned_model(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ("llama3.2", "llama3.1:8b", "llama3.2:1b"), version="0.30.0")
    post(node, "/api/generate", {"model": "llama3.2", "keep_alive": -1})
    # llama3.2:1b: file + f16 KV is well under 80% of what is left: it loads beside the pin.
    post(node, "/api/generate", {"model": "llama3.2:1b"})
    assert {m["name"] for m in ps(node)} == {"llama3.2:latest", "llama3.2:1b"}
    node.clear_events()
    # llama3.1:8b (4.7 GiB + 512 MiB of cache) does not fit in 80% of what is left: Ollama evicts
    # the idle model first, then the pinned one, and loads it alone.
    assert post(node, "/api/generate", {"model": "llama3.1:8b"}).status_code == 200
    assert kinds(node) == [("evict", "llama3.2:1b"), ("evict", "llama3.2:latest"), ("load", "llama3.1:8b")]
    assert node.events()[0].detail == "llama-server model predicted to exceed available memory"


def test_v030_oom_at_load_evicts_everything_and_retries_once(make_node: MakeNode) -> None:
    node = make_node("n", (24576,), ("llama3.2", "llama3.2:1b", "qwen3:8b"), version="0.30.0")
    post(node, "/api/generate", {"model": "llama3.2", "keep_alive": -1})
    post(node, "/api/generate", {"model": "llama3.2:1b"})
    node.set_fault(Fault.LOAD_OOM, count=1)
    node.clear_events()
    assert post(node, "/api/generate", {"model": "qwen3:8b"}).status_code == 200
    assert [k for k, _ in kinds(node)] == ["retry", "evict", "evict", "load"]
    assert [m["name"] for m in ps(node)] == ["qwen3:8b"]
    # Twice in a row: the retry fails too, and the request gets the runner's 500.
    node.set_fault(Fault.LOAD_OOM, count=2)
    r = post(node, "/api/generate", {"model": "llama3.2"})
    assert r.status_code == 500
    assert r.json() == {
        "error": "llama-server process has terminated: exit status 1: cudaMalloc failed: out of memory"
    }
    assert ps(node) == []  # the others went for the retry


def test_v030_oom_with_an_automatic_context_steps_it_down(make_node: MakeNode) -> None:
    node = make_node("n", (49152,), ("llama3.1:8b",), version="0.30.0")
    assert node.behaviour.default_num_ctx() == 262144
    node.set_fault(Fault.LOAD_OOM, count=1)
    assert post(node, "/api/generate", {"model": "llama3.1:8b"}).status_code == 200
    assert node.events()[0].detail.startswith("num_ctx 262144 -> 32768 after: llama-server process")
    assert entry(node, "llama3.1:8b")["context_length"] == 32768
    node.clear_events()
    post(node, "/api/generate", {"model": "llama3.1:8b"})  # automatic again: the same runner
    assert node.events() == []
    post(node, "/api/generate", {"model": "llama3.1:8b", "options": {"num_ctx": 8192}})
    assert [k for k, _ in kinds(node)] == ["reload"]


def test_classic_eviction_then_partial_load_and_load_errors(make_node: MakeNode) -> None:
    node = make_node("n", (4096,), ("llama3.2:1b", "llama3.1:8b"))
    post(node, "/api/generate", {"model": "llama3.2:1b", "keep_alive": -1})
    node.set_fault(Fault.LOAD_ERROR, model="llama3.1:8b")
    r = post(node, "/api/generate", {"model": "llama3.1:8b"})
    assert (r.status_code, r.json()) == (500, {"error": "llama runner process has terminated: exit status 2"})
    assert [m["name"] for m in ps(node)] == ["llama3.2:1b"]  # nothing happened to the others
    node.set_fault(Fault.LOAD_BUSY)
    r = post(node, "/api/generate", {"model": "llama3.1:8b"})
    assert (r.status_code, r.json()["error"]) == (
        503,
        "server busy, please try again.  maximum pending requests exceeded",
    )
    node.clear_fault()
    assert post(node, "/api/generate", {"model": "llama3.2:1b"}).status_code == 200  # loaded: no fault
    node.set_fault(Fault.LOAD_OOM)
    r = post(node, "/api/generate", {"model": "llama3.1:8b"})
    assert (r.status_code, r.json()["error"]) == (
        500,
        "llama runner process has terminated: cudaMalloc failed: out of memory",
    )


def test_a_gpu_smaller_than_configured_loads_partly_on_cpu(make_node: MakeNode) -> None:
    from gpu_router.emulator import EmulatedCluster

    node = make_node("small", (4096,), ("llama3.1:8b",))
    cluster = EmulatedCluster([node])
    config = cluster.config(["llama3.1:8b"], claimed_vram_mib={"small": [8192]})
    assert config["nodes"][0]["gpu"] == {"vram_mb": [8192]}
    post(node, "/api/generate", {"model": "llama3.1:8b", "keep_alive": -1})
    e = entry(node, "llama3.1:8b")
    assert 0 < e["size_vram"] < e["size"]
    with pytest.raises(EmulatorError, match="unknown nodes: nope"):
        cluster.config([], claimed_vram_mib={"nope": [1]})


def test_a_model_loaded_out_of_band_between_observe_and_act(make_node: MakeNode) -> None:
    node = make_node("n", (24576,), ("llama3.2", "qwen3:8b"))
    node.on_request("/api/generate", lambda n: n.client_request("qwen3:8b"))
    assert ps(node) == []  # what the daemon observed
    post(node, "/api/generate", {"model": "llama3.2"})  # its action: meanwhile qwen3 arrived
    assert {m["name"] for m in ps(node)} == {"llama3.2:latest", "qwen3:8b"}
    assert [k for k, _ in kinds(node)] == ["client", "load", "load"]
    post(node, "/api/generate", {"model": "llama3.2"})
    assert len(kinds(node)) == 3  # once only


def test_removed_model_is_gone_from_tags_and_memory(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ("llama3.2",))
    node.load("llama3.2")
    assert node.remove("llama3.2")
    assert not node.remove("llama3.2")
    assert ps(node) == []
    assert web.get(node.url + "/api/tags", timeout=T).json() == {"models": []}
    assert post(node, "/api/generate", {"model": "llama3.2"}).status_code == 404


def test_lost_gpu_kills_its_runners_and_leaves_the_exporter(make_node: MakeNode) -> None:
    node = make_node("n", (8192, 8192), ("llama3.2",))
    node.load("llama3.2")
    [used] = [g["index"] for g in node.gpu_state() if g["used_bytes"]]
    node.lose_gpu(used)
    assert ps(node) == []
    assert ("crash", "llama3.2:latest") in kinds(node)
    text = web.get(node.metrics_url, timeout=T).text
    assert text.count("DCGM_FI_DEV_FB_FREE{") == 1
    assert f'gpu="{used}"' not in text
    post(node, "/api/generate", {"model": "llama3.2"})
    assert [g["index"] for g in node.gpu_state() if g["used_bytes"]] == [1 - used]
    node.restore_gpu(used)
    assert len(node.gpu_state()) == 2


# -- catalogue over HTTP -----------------------------------------------------------------------


def test_cloud_model_in_tags_and_show_and_never_loaded(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ("gpt-oss:20b-cloud", "llama3.2"))
    tags = {m["name"]: m for m in web.get(node.url + "/api/tags", timeout=T).json()["models"]}
    cloud = tags["gpt-oss:20b-cloud"]
    assert (cloud["remote_model"], cloud["remote_host"]) == ("gpt-oss:20b", "https://ollama.com:443")
    assert cloud["size"] < 1000
    assert "remote_model" not in tags["llama3.2:latest"]
    show = post(node, "/api/show", {"model": "gpt-oss:20b-cloud"}).json()
    assert show["remote_host"] == "https://ollama.com:443"
    assert "tensors" not in show
    assert show["model_info"]["gptoss.context_length"] == 131072
    r = post(node, "/api/generate", {"model": "gpt-oss:20b-cloud"})
    assert r.status_code == 200
    assert r.json()["remote_model"] == "gpt-oss:20b"
    assert ps(node) == []
    old = make_node("old", (8192,), ("gpt-oss:20b-cloud",), version="0.11.10")
    assert "remote_model" not in web.get(old.url + "/api/tags", timeout=T).json()["models"][0]


def test_show_tensors_match_the_file_for_every_catalogue_model(make_node: MakeNode) -> None:
    local = [name for name, spec in CATALOGUE.items() if not spec.is_cloud]
    node = make_node("n", (8192,), tuple(local))
    from gpu_router.emulator.ggml import tensors_from_json

    for name in local:
        show = post(node, "/api/show", {"model": name}).json()
        tensors = tensors_from_json(show["tensors"])
        total = sum(t.size_bytes for t in tensors) + CATALOGUE[name].projector_bytes
        assert 0.97 < total / CATALOGUE[name].file_size_bytes <= 1.0, name
        info = show["model_info"]
        arch = info["general.architecture"]
        assert info[f"{arch}.block_count"] == sum(
            1 for t in tensors if t.name.endswith("attn_norm.weight")
        ), name


def test_show_of_the_new_kinds_of_model(make_node: MakeNode) -> None:
    models = ("gemma3:4b", "minicpm-v:8b", "qwen3:30b-a3b", "gpt-oss:20b", "granite4:tiny-h")
    node = make_node("n", (8192,), models)
    gemma = post(node, "/api/show", {"model": "gemma3:4b"}).json()
    assert gemma["model_info"]["gemma3.attention.sliding_window"] == 1024
    assert "vision" in gemma["capabilities"]
    assert any(t["name"].startswith("v.blk.") for t in gemma["tensors"])
    minicpm = post(node, "/api/show", {"model": "minicpm-v:8b"}).json()
    assert minicpm["projector_info"]["clip.has_minicpmv_projector"] is True
    assert minicpm["details"]["families"] == ["qwen2", "clip"]
    moe = post(node, "/api/show", {"model": "qwen3:30b-a3b"}).json()["model_info"]
    assert (moe["qwen3moe.expert_count"], moe["qwen3moe.expert_used_count"]) == (128, 8)
    oss = post(node, "/api/show", {"model": "gpt-oss:20b"}).json()
    assert oss["model_info"]["gptoss.attention.sliding_window"] == 128
    assert {t["type"] for t in oss["tensors"] if "_exps." in t["name"] and t["name"].endswith("weight")} == {
        "MXFP4"
    }
    hybrid = post(node, "/api/show", {"model": "granite4:tiny-h"}).json()["model_info"]
    assert hybrid["granitehybrid.attention.head_count_kv"] is None  # an array: null without verbose
    verbose = post(node, "/api/show", {"model": "granite4:tiny-h", "verbose": True}).json()["model_info"]
    per_layer = verbose["granitehybrid.attention.head_count_kv"]
    assert len(per_layer) == 40
    assert per_layer.count(0) == 36
    assert len(verbose["tokenizer.ggml.tokens"]) == 100352
