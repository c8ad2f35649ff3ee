"""The planner: placement rule, room-making policy, replicas, failover, and its invariants."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from types import MappingProxyType

from builders import NOW, cluster, config, gib, loaded, needs, node
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_router.config import PriorityModel
from gpu_router.planner import ActionKind, Placement, Verdict, capacity, plan
from gpu_router.state import ClusterState, Gpu, GpuReading, LoadedModel, NodeStatus, VramSource

M = "m:latest"


def verdicts(p, model=M):
    return {f.node: f.verdict for f in p.model(model).fits}


def actions(p):
    return [(a.kind.value, a.node, a.model) for a in p.actions]


def test_usable_and_free_follow_margin_and_reserve():
    n = node("a", (10,), used_gib=(2,))
    cap = capacity(n, config(vram_safety_margin=0.9, vram_reserve_bytes=gib(1)))
    assert cap.gpus[0].usable_bytes == gib(10) * 9 // 10 - gib(1)
    assert cap.gpus[0].free_bytes == cap.gpus[0].usable_bytes - gib(2)


def test_priority_model_already_on_gpu_gets_no_action():
    state = cluster(node("a", loaded_models=(loaded(M, 3, pinned=True),)), node("b"))
    p = plan(state, config(M))
    assert p.actions == ()
    assert verdicts(p)["a"] is Verdict.RESIDENT
    d = p.model(M).decision
    assert (d.placement, d.node) == (Placement.GPU, "a")


def test_best_fit_takes_the_tightest_gpu_and_keeps_big_holes():
    # 3 GiB fits both; b (8 GiB card, 6.4 usable) leaves less than c (24 GiB card).
    state = cluster(node("c", (24,), installed={M: 2}), node("b", (8,), installed={M: 2}))
    p = plan(state, config(M), needs=needs(m__latest=3))
    assert actions(p) == [("load", "b", M)]
    assert p.model(M).decision.node == "b"


def test_ties_go_to_the_node_listed_first():
    state = cluster(node("x", (8,), installed={M: 2}), node("y", (8,), installed={M: 2}))
    assert actions(plan(state, config(M), needs=needs(m__latest=3))) == [("load", "x", M)]


def test_never_plans_two_models_into_room_for_one():
    # a has 6.4 GiB usable: room for one 4 GiB model, not two.
    state = cluster(node("a", (8,), installed={"p1:latest": 2, "p2:latest": 2}))
    p = plan(state, config("p1:latest", "p2:latest"), needs=needs(p1__latest=4, p2__latest=4))
    assert actions(p) == [("load", "a", "p1:latest")]
    assert verdicts(p, "p2:latest")["a"] is Verdict.NO_ROOM
    assert p.model("p2:latest").decision.placement is Placement.NONE


def test_too_large_is_never_placed_and_says_why():
    state = cluster(node("a", (8,), installed={M: 9}))
    p = plan(state, config(M), needs=needs(m__latest=7))
    assert p.actions == ()
    f = p.model(M).fits[0]
    assert f.verdict is Verdict.TOO_LARGE
    assert "needs 7.0 GiB, usable VRAM is 6.4 GiB" in f.reason


def test_reasons_for_nodes_that_cannot_hold_it():
    state = cluster(
        node("down", status=NodeStatus.DOWN, error="GET /api/ps: connection refused"),
        node("cpu", None, installed={M: 1}),
        node("unknown", (), installed={M: 1}, source=VramSource.UNKNOWN),
        node("missing", (8,)),
    )
    p = plan(state, config(M), needs=needs(m__latest=2))
    v = verdicts(p)
    assert v == {
        "down": Verdict.NODE_DOWN,
        "cpu": Verdict.NO_GPU,
        "unknown": Verdict.VRAM_UNKNOWN,
        "missing": Verdict.NOT_INSTALLED,
    }
    reasons = {f.node: f.reason for f in p.model(M).fits}
    assert "connection refused" in reasons["down"]
    assert "no GPU source configured" in reasons["unknown"]
    assert p.model(M).decision.placement is Placement.NONE


def test_resident_model_proves_a_fit_even_when_vram_is_unknown():
    state = cluster(node("u", (), loaded_models=(loaded(M, 3),), source=VramSource.UNKNOWN))
    assert verdicts(plan(state, config(M)))["u"] is Verdict.RESIDENT


def test_idle_policy_unloads_idle_models_soonest_expiring_first_never_pinned_or_priority():
    models = (
        loaded("late:latest", 2, expires_in_s=3000),
        loaded("soon:latest", 2, expires_in_s=60),
        loaded("pinned:latest", 1, pinned=True),
    )
    state = cluster(node("a", (8,), loaded_models=models, installed={M: 2}))
    # usable 6.4, used 5 -> free 1.4; M needs 3: unloading "soon" (2) gives 3.4.
    p = plan(state, config(M), needs=needs(m__latest=3))
    assert actions(p) == [("unload", "a", "soon:latest"), ("load", "a", M)]
    assert p.actions[0].for_model == M
    assert verdicts(p)["a"] is Verdict.FITS_AFTER_EVICTION


def test_idle_policy_does_not_touch_a_pinned_model_but_any_does():
    state = cluster(node("a", (8,), loaded_models=(loaded("big:latest", 5, pinned=True),), installed={M: 2}))
    need = needs(m__latest=3)
    assert plan(state, config(M), needs=need).actions == ()
    assert actions(plan(state, config(M, evict="any"), needs=need)) == [
        ("unload", "a", "big:latest"),
        ("load", "a", M),
    ]


def test_never_policy_makes_no_room():
    state = cluster(node("a", (8,), loaded_models=(loaded("x:latest", 5),), installed={M: 2}))
    assert plan(state, config(M, evict="never"), needs=needs(m__latest=3)).actions == ()


def test_a_priority_model_is_never_evicted_for_another():
    state = cluster(
        node("a", (8,), loaded_models=(loaded("p1:latest", 5, pinned=True),), installed={"p2:latest": 2})
    )
    p = plan(state, config("p1:latest", "p2:latest", evict="any"), needs=needs(p2__latest=3))
    assert p.actions == ()


def test_a_resident_priority_model_with_a_finite_keep_alive_is_pinned_in_place():
    # A client reloaded it with keep_alive 6s at context 8192: it would expire. It is pinned where it
    # is, at the context it runs with, so Ollama keeps the runner instead of reloading it.
    m = LoadedModel("p1:latest", gib(5), gib(5), expires_at=NOW + timedelta(seconds=6), context_length=8192)
    p = plan(cluster(node("a", (8,), loaded_models=(m,))), config("p1:latest"))
    assert [(a.kind, a.node, a.model, a.num_ctx) for a in p.actions] == [
        (ActionKind.PIN, "a", "p1:latest", 8192)
    ]
    assert p.model("p1:latest").decision.node == "a"
    assert verdicts(p, "p1:latest")["a"] is Verdict.RESIDENT


def test_fit_without_eviction_is_preferred_over_making_room():
    busy = node("a", (8,), loaded_models=(loaded("x:latest", 5),), installed={M: 2})
    free = node("b", (8,), installed={M: 2})
    assert actions(plan(cluster(busy, free), config(M), needs=needs(m__latest=3))) == [("load", "b", M)]


def test_partial_priority_model_is_reloaded_only_when_it_will_then_fit():
    # 4 GiB model, 2.5 of it in VRAM; free 6.4 - 2.5 = 3.9 plus its own 2.5 back = 6.4 >= 4.
    part = loaded(M, 4, 2.5)
    p = plan(cluster(node("a", (8,), loaded_models=(part,))), config(M))
    assert actions(p) == [("unload", "a", M), ("load", "a", M)]
    assert "now 38%/62% CPU/GPU" in p.actions[1].reason
    # On a 4 GiB card (3.2 usable) it will not fit fully: leave it alone.
    small = plan(cluster(node("a", (4,), loaded_models=(part,))), config(M))
    assert small.actions == ()
    d = small.model(M).decision
    assert (d.placement, d.node) == (Placement.CPU, "a")  # partial offload is not on GPU
    assert "partially offloaded" in d.reason


def test_replicas_go_to_distinct_nodes():
    state = cluster(*(node(n, (8,), installed={M: 2}) for n in "abc"))
    p = plan(state, config(PriorityModel(M, replicas=2)), needs=needs(m__latest=3))
    assert actions(p) == [("load", "a", M), ("load", "b", M)]
    assert p.model(M).decision.nodes == ("a", "b")
    every = plan(state, config(PriorityModel(M, replicas="all")), needs=needs(m__latest=3))
    assert [a.node for a in every.actions] == ["a", "b", "c"]


def test_nodes_list_restricts_placement():
    state = cluster(node("a", (8,), installed={M: 2}), node("b", (24,), installed={M: 2}))
    p = plan(state, config(PriorityModel(M, nodes=("b",))), needs=needs(m__latest=3))
    assert actions(p) == [("load", "b", M)]
    assert verdicts(p)["a"] is Verdict.NOT_ALLOWED


def test_failover_then_no_flap_when_the_node_returns():
    down = cluster(node("a", status=NodeStatus.DOWN, error="refused"), node("b", (8,), installed={M: 2}))
    assert actions(plan(down, config(M), needs=needs(m__latest=3))) == [("load", "b", M)]
    # a is back (models dropped by its restart); M is on b: nothing moves back.
    back = cluster(
        node("a", (8,), installed={M: 2}), node("b", (8,), loaded_models=(loaded(M, 3, pinned=True),))
    )
    assert plan(back, config(M)).actions == ()


def test_cpu_fallback_loads_on_a_cpu_node_only_when_asked():
    state = cluster(node("a", (4,), installed={M: 5}), node("cpu", None, installed={M: 5}))
    need = needs(m__latest=6)
    assert plan(state, config(M), needs=need).actions == ()
    p = plan(state, config(M, cpu_fallback=True), needs=need)
    assert actions(p) == [("load", "cpu", M)]
    assert p.model(M).decision.placement is Placement.CPU
    assert "cpu_fallback" in p.model(M).decision.reason


def test_multi_gpu_prefers_one_gpu_and_spans_when_needed():
    n = node("a", (8, 8), installed={M: 2, "big:latest": 9})
    p = plan(cluster(n), config(M, "big:latest"), needs=needs(m__latest=3, big__latest=9))
    by_model = {a.model: a for a in p.actions}
    assert by_model[M].gpus == (0,)
    # 9 GiB does not fit one 6.4 GiB usable GPU; after M takes 3 on GPU 0, 3.4 + 6.4 is left for 9 + 457 MiB.
    assert by_model["big:latest"].gpus == (0, 1)


def test_backoff_pairs_are_skipped():
    state = cluster(node("a", (8,), installed={M: 2}), node("b", (8,), installed={M: 2}))
    p = plan(state, config(M), needs=needs(m__latest=3), backoff={(M, "a")})
    assert actions(p) == [("load", "b", M)]
    assert verdicts(p)["a"] is Verdict.BACKOFF


def test_embedding_only_models_are_loaded_as_such():
    from gpu_router.state import ModelInfo

    info = {M: ModelInfo(M, "bert", ("embedding",), 12, 384, 12, 12, context_length=512)}
    state = cluster(node("a", (8,), installed={M: 0.1}, info=info))
    p = plan(state, config(M))
    assert p.actions[0].embedding is True


def test_non_priority_models_get_a_decision_but_no_action():
    state = cluster(node("a", (8,), installed={"x:latest": 2}))
    p = plan(state, config(), needs=needs(x__latest=3))
    assert p.actions == ()
    m = p.model("x:latest")
    assert not m.priority
    assert (m.decision.placement, m.decision.node) == (Placement.GPU, "a")


# Properties


@st.composite
def clusters(draw, fillers=False):
    """Up to five nodes; ``fillers`` loads a non-priority model filling most of some nodes' first
    GPU, so room must be made there."""
    names = [f"m{i}:latest" for i in range(draw(st.integers(1, 6)))]
    nodes = []
    for i in range(draw(st.integers(1, 5))):
        gpus = tuple(draw(st.lists(st.sampled_from([4, 8, 12, 24]), min_size=0, max_size=3)))
        inst = {m: 1.0 for m in names if draw(st.booleans())}
        lm = []
        if fillers and gpus and draw(st.booleans()):
            size = gpus[0] * draw(st.floats(0.3, 0.95))
            lm.append(loaded(f"filler{i}:latest", size, pinned=False, expires_in_s=draw(st.integers(1, 900))))
        for m in inst:
            if draw(st.integers(0, 3)) == 0:
                size = draw(st.floats(0.5, 10))
                frac = draw(st.sampled_from([0.0, 0.5, 1.0])) if gpus else 0.0
                lm.append(
                    loaded(
                        m,
                        size,
                        size * frac,
                        pinned=draw(st.booleans()),
                        expires_in_s=draw(st.integers(1, 900)),
                    )
                )
        status = draw(st.sampled_from([NodeStatus.UP, NodeStatus.UP, NodeStatus.UP, NodeStatus.DOWN]))
        nodes.append(
            node(
                f"n{i}",
                gpus if gpus else None,
                installed=inst,
                loaded_models=tuple(lm),
                status=status,
                error="refused",
            )
        )
    sizes = {m: gib(draw(st.floats(0.2, 30))) for m in names}
    prio = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    evict = draw(st.sampled_from(["never", "idle", "any"]))
    margin = draw(st.sampled_from([0.5, 0.8, 1.0]))
    return cluster(*nodes), config(*prio, evict=evict, vram_safety_margin=margin), sizes


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_never_overbooks_a_gpu(case):
    state, cfg, sizes = case
    p = plan(state, cfg, needs=sizes)
    caps = {c.node: c for c in p.nodes}
    for n in state.nodes:
        loads = [a for a in p.actions if a.node == n.name and a.kind is ActionKind.LOAD]
        if not loads or not caps[n.name].gpus:
            continue
        freed = sum(
            m.vram_bytes
            for m in n.loaded
            if any(a.kind is ActionKind.UNLOAD and a.node == n.name and a.model == m.name for a in p.actions)
        )
        free = sum(g.free_bytes for g in caps[n.name].gpus)
        # Every GPU load is planned within the free usable VRAM plus what the planned unloads return.
        assert sum(a.need_bytes for a in loads) <= free + freed
        for a in loads:
            if len(a.gpus) == 1:
                assert a.need_bytes <= caps[n.name].gpus[a.gpus[0]].usable_bytes


@settings(max_examples=200, deadline=None)
@given(clusters())
def test_deterministic(case):
    state, cfg, sizes = case
    assert plan(state, cfg, needs=sizes) == plan(state, cfg, needs=sizes)


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_a_model_bigger_than_every_usable_gpu_is_never_placed_on_one(case):
    state, cfg, sizes = case
    p = plan(state, cfg, needs=sizes)
    for a in p.actions:
        if a.kind is not ActionKind.LOAD or not a.gpus:
            continue
        cap = next(c for c in p.nodes if c.node == a.node)
        usable = [cap.gpus[i].usable_bytes for i in a.gpus]
        assert a.need_bytes <= sum(usable)
        assert len(a.gpus) > 1 or a.need_bytes <= usable[0]


@settings(max_examples=200, deadline=None)
@given(clusters())
def test_never_unloads_a_priority_model_for_another(case):
    state, cfg, sizes = case
    prio = {pm.name for pm in cfg.priority_models}
    for a in plan(state, cfg, needs=sizes).actions:
        if a.kind is ActionKind.UNLOAD and a.model in prio:
            assert a.for_model == a.model  # only its own partial copy, reloaded in place


def test_observed_at_is_what_pinned_is_measured_from():
    state = ClusterState(cluster(node("a")).nodes, observed_at=NOW)
    assert plan(state, config()).models == ()


def test_an_unhealthy_gpu_gets_nothing_and_its_priority_models_fail_over():
    sick_gpu = Gpu(
        0, "GPU0", gib(8), gib(3), gib(5), healthy=False, health_reason="XID 79 (GPU fell off the bus)"
    )
    a = node("a", (8,), loaded_models=(loaded(M, 3, pinned=True),))
    a = replace(a, gpu=GpuReading(VramSource.NVML, (sick_gpu,)))
    b = node("b", (8,), installed={M: 2})
    p = plan(cluster(a, b), config(M), needs=needs(m__latest=3))
    assert verdicts(p)["a"] is Verdict.GPU_UNHEALTHY
    assert "XID 79" in p.model(M).fits[0].reason
    assert actions(p) == [("load", "b", M)]
    # On a node with one sick GPU of two, only the healthy one takes placements.
    two = replace(
        node("c", (8, 8), installed={M: 2}),
        gpu=GpuReading(VramSource.NVML, (sick_gpu, Gpu(1, "GPU1", gib(8), 0, gib(8)))),
    )
    p = plan(cluster(two), config(M), needs=needs(m__latest=3))
    assert [(a.node, a.gpus) for a in p.actions] == [("c", (1,))]


@settings(max_examples=300, deadline=None)
@given(clusters(), st.integers(1, 3))
def test_never_plans_more_models_on_a_node_than_its_ollama_keeps(case, limit):
    # Past OLLAMA_MAX_LOADED_MODELS Ollama evicts a model of its own choosing (pinned ones too) and
    # the daemon would flap: a plan never takes a node over it (a node a client already took over
    # it is never made worse).
    state, cfg, sizes = case
    cfg = replace(cfg, ollama_env=MappingProxyType({"OLLAMA_MAX_LOADED_MODELS": limit}))
    p = plan(state, cfg, needs=sizes)
    for n in state.nodes:
        loads = {a.model for a in p.actions if a.node == n.name and a.kind is ActionKind.LOAD}
        unloads = {a.model for a in p.actions if a.node == n.name and a.kind is ActionKind.UNLOAD}
        if not loads:
            continue
        after = ({m.name for m in n.loaded} - unloads) | loads
        assert len(after) <= max(limit, len(n.loaded))


def test_a_node_at_its_max_loaded_models_needs_an_allowed_unload():
    full = node(
        "a",
        (24,),
        loaded_models=(loaded("x:latest", 1), loaded("y:latest", 1, pinned=True)),
        installed={M: 2},
    )
    cfg = replace(config(M), ollama_env=MappingProxyType({"OLLAMA_MAX_LOADED_MODELS": 2}))
    # idle policy: x (finite keep_alive) may go, so it is unloaded first, on purpose.
    p = plan(cluster(full), cfg, needs=needs(m__latest=3))
    assert actions(p) == [("unload", "a", "x:latest"), ("load", "a", M)]
    # never: Ollama would evict one itself, so the node is given up, with the reason.
    p = plan(cluster(full), replace(cfg, evict="never"), needs=needs(m__latest=3))
    assert p.actions == ()
    assert "OLLAMA_MAX_LOADED_MODELS" in p.model(M).fits[0].reason


def test_replicas_take_the_tightest_fits_in_turn_ties_to_the_first_node():
    # The first replica is the judge's own best fit, later ones come off a heap: both must agree
    # with "least room left, then config order".
    gpus = {"a": 12, "b": 8, "c": 24, "d": 8, "e": 16}
    state = cluster(*(node(n, (g,), installed={M: 2}) for n, g in gpus.items()))
    p = plan(state, config(PriorityModel(M, replicas=4)), needs=needs(m__latest=3))
    assert [a.node for a in p.actions] == ["b", "d", "a", "e"]
    assert p.model(M).decision.nodes == ("b", "d", "a", "e")


@st.composite
def daemon_cases(draw):
    """``clusters`` with what the daemon's path must also get right: several replicas, nodes
    lists, pulls wanted and in flight, backoff, and Ollama's own limit on loaded models."""
    state, cfg, sizes = draw(clusters(fillers=True))
    extra = draw(st.lists(clusters(fillers=True), max_size=1))  # up to ten nodes: more than the few best kept
    if extra:
        more = [replace(n, name=f"x{n.name}") for n in extra[0][0].nodes]
        state = replace(state, nodes=(*state.nodes, *more))
        sizes = {**extra[0][2], **sizes}
    changed = []
    for n in state.nodes:
        # Sick GPUs, stale pictures of nodes that missed a poll, entries /api/ps could not vouch for.
        gpus = tuple(
            replace(g, healthy=False, health_reason="xid 79") if draw(st.integers(0, 5)) == 0 else g
            for g in n.gpu.gpus
        )
        n = replace(n, gpu=replace(n.gpu, gpus=gpus))
        if n.status is NodeStatus.DOWN and draw(st.booleans()):
            n = replace(n, status=NodeStatus.DEGRADED, stale=True, error=None)
        if n.loaded and draw(st.integers(0, 3)) == 0:
            n = replace(n, suspect=frozenset({n.loaded[0].name}))
        changed.append(n)
    state = replace(state, nodes=tuple(changed))
    names = [n.name for n in state.nodes]
    prio = tuple(
        PriorityModel(
            pm.name,
            replicas=draw(st.sampled_from([1, 1, 2, 3, "all"])),
            nodes=tuple(draw(st.lists(st.sampled_from(names), unique=True, max_size=2))),
            pull=draw(st.sampled_from([None, True])),
        )
        for pm in cfg.priority_models
    )
    env = {"OLLAMA_MAX_LOADED_MODELS": draw(st.integers(1, 3))} if draw(st.booleans()) else {}
    cfg = replace(cfg, priority_models=prio, ollama_env=MappingProxyType(env))
    pairs = st.tuples(st.sampled_from(sorted(sizes)), st.sampled_from(names))
    backoff = frozenset(draw(st.lists(pairs, max_size=3)))
    pulling = frozenset(draw(st.lists(pairs, max_size=2)))
    return state, cfg, sizes, backoff, pulling


@settings(max_examples=500, deadline=None)
@given(daemon_cases())
def test_the_daemon_path_decides_priority_models_as_the_full_plan(case):
    # full=False skips the models the daemon never acts on, and judges each priority model without
    # a verdict per node unless a step needs them; what it decides must not change.
    state, cfg, sizes, backoff, pulling = case
    full = plan(state, cfg, needs=sizes, backoff=backoff, pulling=pulling)
    daemon = plan(state, cfg, needs=sizes, backoff=backoff, pulling=pulling, full=False)
    assert daemon.actions == full.actions
    assert daemon.nodes == full.nodes
    assert [m.model for m in daemon.models] == [pm.name for pm in cfg.priority_models]
    for pm in cfg.priority_models:
        ours = daemon.model(pm.name)
        assert ours is not None
        assert ours.fits == ()  # the report's plan has the verdicts
        assert replace(ours, fits=full.model(pm.name).fits) == full.model(pm.name)


def test_the_daemon_path_judges_in_full_past_the_best_fits_it_kept():
    # Ollama's model limit refuses the best fits one after another (each holds a model policy
    # protects), more than the daemon's path kept: it must go on to the next fit, as the report.
    fill = {f"x{i}:latest": 1 for i in range(6)}
    nodes = [
        node(
            f"p{i}",
            (8,),
            installed={M: 2, f"x{i}:latest": 1},
            loaded_models=(loaded(f"x{i}:latest", 1, pinned=True),),
        )
        for i in range(5)
    ]
    state = cluster(*nodes, node("free", (24,), installed={M: 2}))
    cfg = replace(config(M, evict="idle"), ollama_env=MappingProxyType({"OLLAMA_MAX_LOADED_MODELS": 1}))
    sizes = needs(m__latest=3, **{k.replace(":", "__"): v for k, v in fill.items()})
    full, daemon = plan(state, cfg, needs=sizes), plan(state, cfg, needs=sizes, full=False)
    assert actions(daemon) == actions(full) == [("load", "free", M)]
    refused = [f for f in full.model(M).fits if f.verdict is Verdict.NO_ROOM]
    assert [f.node for f in refused] == [f"p{i}" for i in range(5)]
    assert all("OLLAMA_MAX_LOADED_MODELS" in f.reason for f in refused)

