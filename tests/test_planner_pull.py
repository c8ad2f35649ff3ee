"""Pulls in the plan: a priority model short of its replicas is pulled where it is missing and would fit."""

from __future__ import annotations

from dataclasses import replace

import pytest
from builders import cluster, config, gib, loaded, needs, node

from gpu_router.config import PriorityModel, is_cloud_name
from gpu_router.planner import ActionKind, Plan, Verdict, plan
from gpu_router.snapshot import static_snapshot
from gpu_router.state import Gpu, GpuReading, InstalledModel, NodeStatus, VramSource

M = "m:latest"


def verdicts(p: Plan, model: str = M) -> dict[str, Verdict]:
    mp = p.model(model)
    assert mp is not None
    return {f.node: f.verdict for f in mp.fits}


def pulls(p: Plan) -> list[tuple[str, str]]:
    return [(a.node, a.model) for a in p.actions if a.kind is ActionKind.PULL]


def two(**kw: object) -> PriorityModel:
    return PriorityModel(M, replicas=2, **kw)  # type: ignore[arg-type]


def test_the_second_replica_is_pulled_to_an_allowed_up_node_that_would_fit() -> None:
    state = cluster(
        node("a", (8,), loaded_models=(loaded(M, 3, pinned=True),)),
        node("small", (2,)),  # too small for 3 GiB
        node("cpu", None),  # CPU-only
        node("down", (24,), status=NodeStatus.DOWN, error="connection refused"),
        node("fits", (8,)),
        node("other", (24,)),  # not in the model's nodes list
    )
    pm = PriorityModel(M, replicas=2, nodes=("a", "small", "cpu", "down", "fits"))
    p = plan(state, config(pm, pull_missing=True), needs=needs(m__latest=3))
    assert pulls(p) == [("fits", M)]
    assert verdicts(p) == {
        "a": Verdict.RESIDENT,
        "small": Verdict.NOT_INSTALLED,
        "cpu": Verdict.NOT_INSTALLED,
        "down": Verdict.NODE_DOWN,
        "fits": Verdict.PULL,
        "other": Verdict.NOT_ALLOWED,
    }
    mp = p.model(M)
    assert mp is not None
    fit = next(f for f in mp.fits if f.node == "fits")
    assert not fit.fits  # not there yet: nothing counts it as a replica
    assert fit.reason == "not installed; would pull it here: it needs 3.0 GiB and would fit on GPU 0"
    assert mp.decision.reason.endswith("; would pull it to fits")
    pull = next(a for a in p.actions if a.kind is ActionKind.PULL)
    assert pull.reason == "1 of 2 replicas placed: not installed where it would fit"
    assert pull.need_bytes == gib(3)


def test_nothing_is_pulled_with_pull_off_and_per_model_pull_wins() -> None:
    state = cluster(node("a", (8,), loaded_models=(loaded(M, 3, pinned=True),)), node("b", (8,)))
    fixed = needs(m__latest=3)
    assert pulls(plan(state, config(two()), needs=fixed)) == []  # pull_missing defaults to false
    assert pulls(plan(state, config(two(pull=False), pull_missing=True), needs=fixed)) == []
    assert pulls(plan(state, config(two(pull=True)), needs=fixed)) == [("b", M)]
    assert verdicts(plan(state, config(two()), needs=fixed))["b"] is Verdict.NOT_INSTALLED


def test_no_pull_when_the_wanted_replicas_are_placed() -> None:
    state = cluster(node("a", (8,), installed={M: 2}), node("b", (8,)))
    p = plan(state, config(M, pull_missing=True), needs=needs(m__latest=3))
    assert [(a.kind, a.node) for a in p.actions] == [(ActionKind.LOAD, "a")]
    assert verdicts(p)["b"] is Verdict.NOT_INSTALLED


def test_a_model_that_fits_nowhere_installed_is_pulled_where_it_would() -> None:
    # Installed on a, but a is full of another priority model: b lacks it and has the room.
    state = cluster(
        node("a", (8,), installed={M: 4}, loaded_models=(loaded("p:latest", 6, pinned=True),)),
        node("b", (8,)),
    )
    p = plan(state, config("p:latest", M, pull_missing=True), needs=needs(m__latest=4, p__latest=6))
    assert pulls(p) == [("b", M)]
    mp = p.model(M)
    assert mp is not None
    assert (
        mp.decision.reason
        == "no node can hold it on GPU: no room on 1, not installed on 1; would pull it to b"
    )
    assert pulls(p)[0] == (p.actions[-1].node, p.actions[-1].model)  # pulls come after every load


def test_best_fit_first_up_to_the_replicas_missing() -> None:
    state = cluster(
        node("big", (24,)),
        node("snug", (4,)),
        node("mid", (8,)),
        node("a", (8,), loaded_models=(loaded(M, 3, pinned=True),)),
    )
    p = plan(state, config(PriorityModel(M, replicas=3), pull_missing=True), needs=needs(m__latest=3))
    assert pulls(p) == [("snug", M), ("mid", M)]  # the least room left first; big stays open
    assert verdicts(p)["big"] is Verdict.NOT_INSTALLED


def test_room_taken_earlier_in_the_pass_counts() -> None:
    # b has 6.4 GiB usable: the first priority model is loaded there, leaving no room for M.
    state = cluster(
        node("a", (8,), loaded_models=(loaded(M, 3, pinned=True),)),
        node("b", (8,), installed={"first:latest": 5}),
    )
    p = plan(
        state, config("first:latest", two(), pull_missing=True), needs=needs(first__latest=5, m__latest=3)
    )
    assert [(a.kind, a.node, a.model) for a in p.actions] == [(ActionKind.LOAD, "b", "first:latest")]
    assert verdicts(p)["b"] is Verdict.NOT_INSTALLED


@pytest.mark.parametrize(("evict", "pulled"), [("idle", True), ("never", False)])
def test_room_that_evict_would_make_counts(evict: str, pulled: bool) -> None:
    state = cluster(
        node("a", (8,), loaded_models=(loaded(M, 3, pinned=True),)),
        node("b", (8,), loaded_models=(loaded("idle:latest", 5, expires_in_s=60),)),
    )
    p = plan(state, config(two(), pull_missing=True, evict=evict), needs=needs(m__latest=3))
    assert pulls(p) == ([("b", M)] if pulled else [])
    if pulled:
        mp = p.model(M)
        assert mp is not None
        fit = next(f for f in mp.fits if f.node == "b")
        assert fit.reason.endswith("would fit on GPU 0 once what evict: idle allows is unloaded")


def test_a_node_backing_off_is_skipped_for_the_next_best() -> None:
    state = cluster(
        node("a", (8,), loaded_models=(loaded(M, 3, pinned=True),)), node("b", (4,)), node("c", (8,))
    )
    p = plan(state, config(two(), pull_missing=True), needs=needs(m__latest=3), backoff={(M, "b")})
    assert pulls(p) == [("c", M)]


def test_a_pull_in_flight_counts_towards_the_replicas() -> None:
    state = cluster(
        node("a", (8,), loaded_models=(loaded(M, 3, pinned=True),)), node("b", (4,)), node("c", (8,))
    )
    p = plan(state, config(two(), pull_missing=True), needs=needs(m__latest=3), pulling={(M, "c")})
    assert pulls(p) == []
    assert verdicts(p)["c"] is Verdict.PULLING
    mp = p.model(M)
    assert mp is not None
    assert mp.decision.reason.endswith("; pulling it to c")
    # Even with pull turned off since: the pull in flight is still shown for what it is.
    assert verdicts(plan(state, config(two()), needs=needs(m__latest=3), pulling={(M, "c")}))["c"] is (
        Verdict.PULLING
    )


def test_nodes_with_unknown_or_unhealthy_gpus_get_no_pull() -> None:
    sick = replace(
        node("sick", (8,)),
        gpu=GpuReading(
            VramSource.NVML, (Gpu(0, "GPU0", gib(8), 0, gib(8), healthy=False, health_reason="XID 79"),)
        ),
    )
    state = cluster(
        node("a", (8,), loaded_models=(loaded(M, 3, pinned=True),)),
        node("unknown", (), source=VramSource.UNKNOWN),
        sick,
    )
    p = plan(state, config(two(), pull_missing=True), needs=needs(m__latest=3))
    assert pulls(p) == []


def test_a_model_installed_nowhere_goes_to_the_node_with_the_most_usable_vram() -> None:
    # No node that is up has it: no file size, no /api/show, no need to judge a fit by.
    state = cluster(
        node("b", (8,)),
        node("c", (24,)),
        node("gone", (48,), status=NodeStatus.DOWN, error="connection refused"),
    )
    p = plan(state, config(two(), pull_missing=True))
    assert pulls(p) == [("c", M)]  # one pull at a time: once it is there, it is sized
    mp = p.model(M)
    assert mp is not None
    fit = next(f for f in mp.fits if f.node == "c")
    assert fit.verdict is Verdict.PULL
    assert "size unknown until it is on a node" in fit.reason
    action = p.actions[-1]
    assert action.reason == (
        "priority model not on GPU anywhere: installed on no node that is up;"
        " the node with the most usable VRAM"
    )
    # A pull of it in flight anywhere: no second blind pull.
    assert pulls(plan(state, config(two(), pull_missing=True), pulling={(M, "b")})) == []


@pytest.mark.parametrize("name", ["gpt-oss:20b-cloud", "gpt-oss:cloud", "deepseek-v3.1:671b-cloud"])
def test_a_cloud_name_is_never_pulled(name: str) -> None:
    state = cluster(node("b", (24,)))
    p = plan(state, config(PriorityModel(name), pull_missing=True))
    assert pulls(p) == []
    assert verdicts(p, name) == {"b": Verdict.NOT_INSTALLED}


def test_a_model_a_node_lists_as_remote_is_never_pulled() -> None:
    cloud = "qwen3-coder:480b-cloud-stub"  # a name with no cloud suffix: /api/tags says it is remote
    a = replace(node("a", (8,)), installed=(InstalledModel(cloud, 384, remote=True),))
    state = cluster(a, node("b", (24,)))
    p = plan(state, config(PriorityModel(cloud, replicas=2), pull_missing=True))
    assert pulls(p) == []
    assert set(verdicts(p, cloud).values()) == {Verdict.CLOUD}


@pytest.mark.parametrize(
    ("name", "cloud"),
    [
        ("gpt-oss:20b-cloud", True),
        ("gpt-oss:cloud", True),
        ("gpt-oss:CLOUD", True),
        ("library/gpt-oss:20b-Cloud", True),
        ("gpt-oss:20b", False),
        ("gpt-oss:20b:local", False),
        ("cloud:latest", False),
        ("registry.local:5000/team/cloud-model:latest", False),
        ("host:5000/x-cloud", False),  # the part after the last ':' holds a '/': a port and a path
    ],
)
def test_cloud_names_follow_ollamas_rule(name: str, cloud: bool) -> None:
    assert is_cloud_name(name) is cloud


def test_the_report_json_has_the_pull_action_and_verdict() -> None:
    state = cluster(node("a", (8,), loaded_models=(loaded(M, 3, pinned=True),)), node("b", (8,)))
    cfg = config(two(), pull_missing=True)
    data = static_snapshot(cfg, state, plan(state, cfg, needs=needs(m__latest=3))).status_json()
    assert data["actions"] == [
        {
            "action": "pull",
            "node": "b",
            "model": M,
            "reason": "1 of 2 replicas placed: not installed where it would fit",
            "endpoint": "/api/pull",
        }
    ]
    fit = next(f for f in data["models"][0]["fits"] if f["node"] == "b")
    assert (fit["verdict"], fit["fits"]) == ("pull", False)
    assert fit["reason"] == "not installed; would pull it here: it needs 3.0 GiB and would fit on GPU 0"
