"""Needs per (model, node): each node's version, GPUs and settings, and the order of sources by key."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType

from builders import FOREVER, NOW, cluster, config, gib, node
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_router.config import Config, GpuSpec, NodeConfig, PriorityModel
from gpu_router.memory import NodeProfile, OllamaEnv, estimate_memory, need_from_observed
from gpu_router.ollama import parse_show
from gpu_router.sizing import GPU_MINIMUM_BYTES, Sizer, SizeSource, file_estimate, size_key
from gpu_router.state import InstalledModel, LoadedModel, ModelInfo, NodeState
from gpu_router.store import SizeKey

SHOW = Path(__file__).parent / "fixtures" / "observations" / "show"
MODEL = "mistral:7b"
DIGEST = "f974a74358d62a017b37c6f424fcdf2744ca02926c4f952513ddf474b2fa5091"
FILE = 4_372_824_384  # /api/tags size of mistral:7b (Q4_K_M), observation row 41
MISTRAL = parse_show(json.loads((SHOW / "mistral_7b.json").read_text()), MODEL)


def mistral_node(
    name: str, gpus_gib: tuple[float, ...], version: str, *, loaded: tuple[LoadedModel, ...] = ()
) -> NodeState:
    n = node(name, gpus_gib, loaded_models=loaded, info={MODEL: MISTRAL})
    inst = tuple(InstalledModel(MODEL, FILE, DIGEST) if m.name == MODEL else m for m in n.installed) or (
        InstalledModel(MODEL, FILE, DIGEST),
    )
    if MODEL not in {m.name for m in inst}:
        inst = (*inst, InstalledModel(MODEL, FILE, DIGEST))
    return replace(n, version=version, installed=inst)


def cfg(*names: str, **env: object) -> Config:
    return replace(config(nodes=names), ollama_env=MappingProxyType(dict(env)))


def profile(n: NodeState, **env: object) -> NodeProfile:
    return NodeProfile(n.version, tuple(g.total_bytes for g in n.gpu.gpus), OllamaEnv(**env))  # type: ignore[arg-type]


def test_the_same_model_needs_what_each_node_will_use() -> None:
    # A 24 GiB node on v0.16.1 defaults to a 32768 context (the VRAM tier, server/routes.go@v0.15.5);
    # an 8 GiB node on v0.12.6 runs it at 4096. So their needs differ by the KV cache and graph.
    big, small = mistral_node("big", (24,), "0.16.1"), mistral_node("small", (8,), "0.12.6")
    sizer = Sizer(cluster(big, small), cfg("big", "small"))
    on_big, on_small = sizer.need(MODEL, "big"), sizer.need(MODEL, "small")
    assert (on_big.context_length, on_big.era) == (32768, "layout")
    assert (on_small.context_length, on_small.era) == (4096, "mixed")
    assert on_big.source is on_small.source is SizeSource.ESTIMATED
    assert on_big.need_bytes is not None
    assert on_small.need_bytes is not None
    assert on_big.need_bytes > on_small.need_bytes + gib(1)
    # Each is exactly the engine's answer for that node's profile.
    for n, got in ((big, on_big), (small, on_small)):
        est = estimate_memory(MISTRAL, FILE, profile(n))
        assert est is not None
        assert got.need_bytes == est.need_bytes
        assert got.memory == est


def test_ollama_env_changes_the_need_per_node() -> None:
    a, b = mistral_node("a", (24,), "0.12.6"), mistral_node("b", (24,), "0.12.6")
    nodes = (
        NodeConfig("a", "http://a:11434", GpuSpec()),
        NodeConfig("b", "http://b:11434", GpuSpec(), ollama_env=MappingProxyType({"OLLAMA_NUM_PARALLEL": 4})),
    )
    config_ = Config(nodes=nodes, ollama_env=MappingProxyType({"OLLAMA_CONTEXT_LENGTH": 8192}))
    sizer = Sizer(cluster(a, b), config_)
    one, four = sizer.need(MODEL, "a"), sizer.need(MODEL, "b")
    assert one.context_length == four.context_length == 8192
    assert one.memory is not None
    assert four.memory is not None
    assert (one.memory.num_parallel, four.memory.num_parallel) == (1, 4)
    assert four.memory.kv_bytes == 4 * one.memory.kv_bytes  # KV for context x num_parallel
    # A priority model's own num_ctx wins over OLLAMA_CONTEXT_LENGTH.
    assert sizer.need(MODEL, "a", num_ctx=2048).context_length == 2048


def observed_entry(size: int, ctx: int) -> LoadedModel:
    return LoadedModel(MODEL, size, size, DIGEST, FOREVER, ctx)


def test_an_observed_size_counts_only_for_the_same_key() -> None:
    # Seen fully on GPU on a v0.12.6 node at 4096: that size sizes other v0.12.6 nodes at 4096 ...
    seen = mistral_node("seen", (8,), "0.12.6", loaded=(observed_entry(5_778_720_768, 4096),))
    twin = mistral_node("twin", (8,), "0.12.6")
    big = mistral_node("big", (24,), "0.16.1")  # ... but not a node that will run it at 32768
    sizer = Sizer(cluster(seen, twin, big), cfg("seen", "twin", "big"))
    got = sizer.need(MODEL, "twin")
    assert got.source is SizeSource.OBSERVED
    assert "on seen" in got.detail
    assert got.memory is not None
    assert got.need_bytes == need_from_observed(5_778_720_768, got.memory)
    assert sizer.need(MODEL, "big").source is SizeSource.ESTIMATED
    # A client's copy at another context is not the size gpu-router's own load would take.
    other = mistral_node("seen", (8,), "0.12.6", loaded=(observed_entry(9_000_000_000, 16384),))
    assert Sizer(cluster(other, twin), cfg("seen", "twin")).need(MODEL, "twin").source is SizeSource.ESTIMATED


def test_learned_is_used_only_for_its_own_key() -> None:
    n = mistral_node("a", (8,), "0.12.6")
    est = estimate_memory(MISTRAL, FILE, profile(n))
    assert est is not None
    key = size_key(DIGEST, est)
    assert key == SizeKey(DIGEST, 4096, 1, "f16", "mixed")
    got = Sizer(cluster(n), cfg("a"), learned={key: 5_500_000_000}).need(MODEL, "a")
    assert (got.source, got.need_bytes) == (SizeSource.LEARNED, need_from_observed(5_500_000_000, est))
    for other in (
        replace(key, context_length=8192),
        replace(key, num_parallel=2),
        replace(key, kv_cache_type="q8_0"),
        replace(key, era="llama-server"),
        replace(key, digest="0" * 64),
    ):
        assert (
            Sizer(cluster(n), cfg("a"), learned={other: 5_500_000_000}).need(MODEL, "a").source
            is SizeSource.ESTIMATED
        )


@settings(max_examples=60, deadline=None)
@given(
    ctx=st.sampled_from([2048, 4096, 8192, 32768]),
    par=st.integers(1, 4),
    kv=st.sampled_from(["f16", "q8_0", "q4_0"]),
    era=st.sampled_from(["classic", "mixed", "layout", "llama-server"]),
)
def test_property_a_learned_size_is_never_applied_to_another_key(
    ctx: int, par: int, kv: str, era: str
) -> None:
    n = mistral_node("a", (8,), "0.12.6")
    learned = {SizeKey(DIGEST, ctx, par, kv, era): 123 * 2**20}
    got = Sizer(cluster(n), cfg("a"), learned=learned).need(MODEL, "a")
    if got.source is SizeSource.LEARNED:
        assert got.key in learned


def test_given_beats_everything_and_cloud_is_never_sized() -> None:
    n = mistral_node("a", (8,), "0.12.6", loaded=(observed_entry(5_778_720_768, 4096),))
    sizer = Sizer(cluster(n), cfg("a"), needs={MODEL: gib(3)})
    assert (sizer.need(MODEL, "a").source, sizer.need(MODEL, "a").need_bytes) == (SizeSource.GIVEN, gib(3))
    cloud = replace(
        node("c", (8,)), installed=(InstalledModel("gpt-oss:120b-cloud", 384, "c" * 64, remote=True),)
    )
    sizer = Sizer(cluster(cloud), cfg("c"))
    got = sizer.need("gpt-oss:120b-cloud", "c")
    assert (got.source, got.need_bytes) == (SizeSource.CLOUD, None)
    assert sizer.is_cloud("gpt-oss:120b-cloud")


def test_without_metadata_the_file_size_with_overhead_else_unknown() -> None:
    bare = replace(node("a", (8,)), installed=(InstalledModel("x:latest", 1000 * 2**20, "d" * 64),))
    got = Sizer(cluster(bare), cfg("a")).need("x:latest", "a")
    assert got.source is SizeSource.FILE
    assert got.need_bytes == int(1000 * 2**20 * 1.2) + GPU_MINIMUM_BYTES
    assert file_estimate(None).source is SizeSource.UNKNOWN
    assert file_estimate(None).need_bytes is None


def test_span_pays_each_era_per_gpu_cost() -> None:
    n = mistral_node("a", (8, 8), "0.12.6")
    got = Sizer(cluster(n), cfg("a")).need(MODEL, "a")
    assert got.memory is not None
    assert got.span_need(1) == got.need_bytes
    assert got.span_need(2) == got.memory.span_need_bytes(2)
    assert got.span_need(3) is not None
    assert got.span_need(2) is not None
    assert got.span_need(3) > got.span_need(2)  # type: ignore[operator]
    plain = file_estimate(1000)
    assert plain.span_need(3) == plain.need_bytes + 2 * GPU_MINIMUM_BYTES  # type: ignore[operator]


def test_learning_keys_follow_the_context_ps_shows() -> None:
    n = mistral_node("a", (8,), "0.12.6", loaded=(observed_entry(8_329_906_176, 16384),))
    sizer = Sizer(cluster(n), cfg("a"))
    key = sizer.learnable(n, n.loaded[0])
    assert key == SizeKey(DIGEST, 16384, 1, "f16", "mixed")
    # Partly on CPU: the classic-era size is not the full-offload size, so nothing is learned.
    partial = replace(n.loaded[0], vram_bytes=7_206_864_896)
    assert sizer.learnable(n, partial) is None
    # In later eras /api/ps size is the whole allocation, partial or not.
    late = mistral_node("b", (8,), "0.20.0", loaded=(partial,))
    assert Sizer(cluster(late), cfg("b")).learnable(late, partial) == SizeKey(
        DIGEST, 16384, 1, "f16", "layout"
    )


def test_an_unparsable_info_is_only_a_file_estimate() -> None:
    thin = ModelInfo(MODEL)  # no architecture, no layers
    n = replace(mistral_node("a", (8,), "0.12.6"), info=MappingProxyType({MODEL: thin}))
    assert Sizer(cluster(n), cfg("a")).need(MODEL, "a").source is SizeSource.FILE


def test_expiry_does_not_matter_to_sizing() -> None:
    finite = LoadedModel(MODEL, 5_778_720_768, 5_778_720_768, DIGEST, NOW + timedelta(minutes=5), 4096)
    seen = mistral_node("seen", (8,), "0.12.6", loaded=(finite,))
    twin = mistral_node("twin", (8,), "0.12.6")
    assert Sizer(cluster(seen, twin), cfg("seen", "twin")).need(MODEL, "twin").source is SizeSource.OBSERVED


def test_the_planner_predicts_ollamas_own_pre_load_eviction_on_v030() -> None:
    # From v0.30 Ollama weighs file + f16 KV + batch surcharge against 80% of the free VRAM before
    # loading, and evicts other models (pinned ones too) when that fails, even if the model would
    # fit. The plan must unload what policy allows itself, or give the node up: never call it "fits".
    from gpu_router.planner import ActionKind, Verdict, plan
    from gpu_router.state import Gpu, GpuReading, VramSource

    probe = mistral_node("a", (24,), "0.30.0")
    est = Sizer(cluster(probe), cfg("a")).need(MODEL, "a")
    assert est.memory is not None
    assert est.need_bytes is not None
    assert est.preload_bytes is not None
    # Free VRAM just above the need, yet under preload / 0.8: fits by size, fails Ollama's check.
    free = max(est.need_bytes + 2**20, est.preload_bytes * 100 // 80 - 2**26)
    assert free >= est.need_bytes
    assert est.preload_bytes > free * 80 // 100
    total = gib(24)
    other = LoadedModel("x:latest", total - free, total - free, "e" * 64, NOW + timedelta(minutes=5), 4096)
    busy = replace(
        probe, loaded=(other,), gpu=GpuReading(VramSource.NVML, (Gpu(0, "GPU0", total, total - free, free),))
    )
    busy = replace(busy, installed=(*busy.installed, InstalledModel("x:latest", 2**30, "e" * 64)))
    config_ = replace(cfg("a"), priority_models=(PriorityModel(MODEL),), vram_safety_margin=1.0)
    p = plan(cluster(busy), config_)
    assert [(a.kind, a.model) for a in p.actions] == [
        (ActionKind.UNLOAD, "x:latest"),
        (ActionKind.LOAD, MODEL),
    ]
    p = plan(cluster(busy), replace(config_, evict="never"))
    assert p.actions == ()
    fit = p.model(MODEL).fits[0]
    assert fit.verdict is Verdict.NO_ROOM
    assert "pre-load check" in fit.reason
    # An older node has no such check: the same room is a plain fit there.
    old = replace(busy, version="0.12.6")
    assert [a.kind for a in plan(cluster(old), replace(config_, evict="never")).actions] in (
        [ActionKind.LOAD],
        [],
    )
