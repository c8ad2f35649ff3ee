"""Metrics from a snapshot: names, labels and values, counters, pruning on reload, the textfile.

Snapshots are built from ClusterStates made with tests/builders.py and planned by the real planner;
every scrape is parsed with prometheus-client's own parser.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from builders import NOW, cluster, config, gib, loaded, needs, node
from obs_helpers import parse_metrics, sample, series
from prometheus_client import generate_latest

from gpu_router import __version__
from gpu_router.config import PriorityModel
from gpu_router.executor import ActionResult
from gpu_router.metrics import (
    EXPORTED,
    Scraper,
    TelemetryCollector,
    registry_for,
    render,
    write_textfile,
)
from gpu_router.planner import Action, ActionKind, plan
from gpu_router.snapshot import (
    Telemetry,
    gpu_health,
    node_state_name,
    poll_error_reason,
    static_snapshot,
)
from gpu_router.state import Gpu, GpuReading, NodeStatus, VramSource

LLAMA = "llama3.2:latest"
EMBED = "nomic-embed-text:latest"
QWEN = "qwen2.5:7b"


def _state_and_config():  # type: ignore[no-untyped-def]
    a = node(
        "gpu-a",
        (8, 8),
        loaded_models=(loaded(LLAMA, 3, pinned=True), loaded(QWEN, 6, 2)),
        installed={EMBED: 0.3},
    )
    b = node("gpu-b", (4,), installed={EMBED: 0.3})
    down = node("gone", (8,), status=NodeStatus.DOWN, error="GET /api/ps: connection refused")
    sick = node("sick", (8,), status=NodeStatus.ERROR, error="GET /api/ps: HTTP 500: boom")
    state = cluster(a, b, down, sick)
    cfg = config(
        LLAMA,
        PriorityModel(EMBED, replicas=2),
        nodes=("gpu-a", "gpu-b", "gone", "sick"),
        vram_safety_margin=0.9,
    )
    return state, cfg


def scrape(t: Telemetry) -> str:
    return render(registry_for(TelemetryCollector(t))).decode()


def published(state, cfg) -> Telemetry:  # type: ignore[no-untyped-def]
    t = Telemetry(cfg)
    p = plan(state, cfg, needs=needs(nomic_embed_text__latest=0.5))
    t.reconciled(state, p, reconcile=1, duration_s=0.3, next_in_s=300)
    return t


def test_gauges_describe_the_observed_cluster() -> None:
    state, cfg = _state_and_config()
    s = parse_metrics(scrape(published(state, cfg)))

    assert sample(s, "gpu_router_build_info", version=__version__) == 1
    assert sample(s, "gpu_router_node_up", node="gpu-a") == 1
    assert sample(s, "gpu_router_node_up", node="gone") == 0
    assert sample(s, "gpu_router_node_up", node="sick") == 0
    # one state at 1 per node; the older "error" status is shown as degraded
    assert sample(s, "gpu_router_node_state", node="gpu-a", state="up") == 1
    assert sample(s, "gpu_router_node_state", node="gone", state="down") == 1
    assert sample(s, "gpu_router_node_state", node="sick", state="degraded") == 1
    assert sample(s, "gpu_router_node_state", node="sick", state="up") == 0
    assert (
        sum(v for labels, v in series(s, "gpu_router_node_state").items() if ("node", "sick") in labels) == 1
    )

    # GPU memory: two GPUs on gpu-a, the models' VRAM filling GPU 0 first
    assert sample(s, "gpu_router_gpu_memory_total_bytes", node="gpu-a", gpu="0") == gib(8)
    assert sample(s, "gpu_router_gpu_memory_total_bytes", node="gpu-a", gpu="1") == gib(8)
    assert sample(s, "gpu_router_gpu_memory_used_bytes", node="gpu-a", gpu="0") == gib(5)
    assert sample(s, "gpu_router_gpu_memory_free_bytes", node="gpu-a", gpu="0") == gib(3)
    assert sample(s, "gpu_router_gpu_memory_usable_bytes", node="gpu-b", gpu="0") == int(gib(4) * 0.9)
    assert sample(s, "gpu_router_gpu_healthy", node="gpu-b", gpu="0") == 1

    # models: processor label, size as /api/ps says
    assert sample(s, "gpu_router_model_loaded_bytes", node="gpu-a", model=LLAMA, processor="gpu") == gib(3)
    assert sample(s, "gpu_router_model_loaded_bytes", node="gpu-a", model=QWEN, processor="partial") == gib(6)
    assert sample(s, "gpu_router_model_vram_bytes", node="gpu-a", model=QWEN) == gib(2)

    # priority models: replicas on GPU, wanted; the one count of priority models on GPU
    assert sample(s, "gpu_router_priority_model_on_gpu", model=LLAMA) == 1
    assert sample(s, "gpu_router_priority_model_replicas_wanted", model=LLAMA) == 1
    assert sample(s, "gpu_router_priority_model_on_gpu", model=EMBED) == 0
    assert sample(s, "gpu_router_priority_model_replicas_wanted", model=EMBED) == 2
    assert sample(s, "gpu_router_priority_models") == 2
    assert sample(s, "gpu_router_priority_models_on_gpu") == 1

    assert sample(s, "gpu_router_reconciles_total") == 1
    assert sample(s, "gpu_router_reconcile_duration_seconds_count") == 1
    assert sample(s, "gpu_router_reconcile_duration_seconds_bucket", le="0.25") == 0
    assert sample(s, "gpu_router_reconcile_duration_seconds_bucket", le="0.5") == 1
    assert sample(s, "gpu_router_reconcile_duration_seconds_bucket", le="+Inf") == 1
    assert sample(s, "gpu_router_reconcile_duration_seconds_sum") == pytest.approx(0.3)
    assert sample(s, "gpu_router_last_reconcile_timestamp_seconds") is not None


def test_the_scrape_uses_only_node_and_gpu_labels_never_instance() -> None:
    state, cfg = _state_and_config()
    s = parse_metrics(scrape(published(state, cfg)))
    names = {name for name, _ in s}
    labels = {k for _, ls in s for k, _ in ls}
    assert "instance" not in labels
    assert "job" not in labels
    assert labels <= {
        "node",
        "gpu",
        "model",
        "processor",
        "state",
        "version",
        "reason",
        "action",
        "result",
        "kind",
        "le",
    }
    # every exposed name is in EXPORTED (what the dashboard and rules tests check against)
    assert names <= set(EXPORTED), names - set(EXPORTED)


def test_poll_errors_are_counted_per_node_and_reason() -> None:
    state, cfg = _state_and_config()
    t = published(state, cfg)
    p = plan(state, cfg)
    t.reconciled(state, p, reconcile=2, duration_s=0.1, next_in_s=300)
    t.poll_error("gone", "down", "GET /api/ps: connect timed out after 3s")
    s = parse_metrics(scrape(t))
    assert sample(s, "gpu_router_poll_errors_total", node="gone", reason="refused") == 2
    assert sample(s, "gpu_router_poll_errors_total", node="gone", reason="timeout") == 1
    assert sample(s, "gpu_router_poll_errors_total", node="sick", reason="http_error") == 2
    assert sample(s, "gpu_router_poll_errors_total", node="gpu-a", reason="refused") is None


@pytest.mark.parametrize(
    ("status", "message", "reason"),
    [
        ("down", "GET /api/ps: connection refused", "refused"),
        ("down", "GET /api/ps: read timed out after 5s", "timeout"),
        ("down", "GET /api/ps: name does not resolve", "unreachable"),
        ("error", "GET /api/ps: HTTP 500: boom", "http_error"),
        ("error", "GET /api/ps: invalid JSON ('<html>')", "bad_response"),
    ],
)
def test_poll_error_reasons_are_a_small_fixed_set(status: str, message: str, reason: str) -> None:
    assert poll_error_reason(status, message) == reason


def test_node_state_names() -> None:
    assert [node_state_name(s) for s in ("up", "degraded", "down", "error")] == [
        "up",
        "degraded",
        "down",
        "degraded",
    ]


def test_gpu_utilization_temperature_and_health_where_the_source_has_them() -> None:
    gpus = (
        Gpu(0, "A", gib(8), gib(1), gib(7), utilization_ratio=0.25, temperature_c=61.0),
        Gpu(
            1, "A", gib(8), gib(1), gib(7), healthy=False, health_reason="XID 79: GPU has fallen off the bus"
        ),
    )
    a = replace(node("gpu-a", (8, 8)), gpu=GpuReading(VramSource.EXPORTER, gpus))
    cfg = config(nodes=("gpu-a",))
    state = cluster(a)
    t = Telemetry(cfg)
    t.reconciled(state, plan(state, cfg), reconcile=1, duration_s=0.01, next_in_s=300)
    s = parse_metrics(scrape(t))
    assert sample(s, "gpu_router_gpu_utilization_ratio", node="gpu-a", gpu="0") == 0.25
    assert sample(s, "gpu_router_gpu_temperature_celsius", node="gpu-a", gpu="0") == 61.0
    # unknown is absent, never 0
    assert sample(s, "gpu_router_gpu_utilization_ratio", node="gpu-a", gpu="1") is None
    assert sample(s, "gpu_router_gpu_healthy", node="gpu-a", gpu="0") == 1
    assert sample(s, "gpu_router_gpu_healthy", node="gpu-a", gpu="1") == 0
    assert gpu_health(gpus[1]).health_reason.startswith("XID 79")


def test_actions_and_drift_are_counted_with_results() -> None:
    state, cfg = _state_and_config()
    t = published(state, cfg)
    load = Action(ActionKind.LOAD, "gpu-b", EMBED, "priority model not on GPU anywhere")
    unload = Action(ActionKind.UNLOAD, "gpu-a", QWEN, "make room")
    t.actions_started(1, [load, unload])
    assert {(a.node, a.result) for a in t.snapshot.in_flight} == {
        ("gpu-b", "in_flight"),
        ("gpu-a", "in_flight"),
    }
    t.action_finished(ActionResult(load, False, "loaded as 42%/58% CPU/GPU, not fully on GPU", 2.5))
    t.action_finished(ActionResult(unload, True, "unload requested", 0.1))
    t.drift("gpu-a", "model_lost")
    s = parse_metrics(scrape(t))
    assert (
        sample(s, "gpu_router_actions_total", node="gpu-b", model=EMBED, action="load", result="failed") == 1
    )
    assert sample(s, "gpu_router_actions_total", node="gpu-a", model=QWEN, action="unload", result="ok") == 1
    assert sample(s, "gpu_router_drift_events_total", node="gpu-a", kind="model_lost") == 1
    assert sample(s, "gpu_router_actions_in_flight") == 0
    recent = t.snapshot.recent_actions
    assert [(r.model, r.result, r.reconcile) for r in recent] == [(EMBED, "failed", 1), (QWEN, "ok", 1)]
    assert recent[0].duration_s == 2.5
    assert "42%/58%" in recent[0].detail


def test_a_node_or_model_that_leaves_the_config_leaves_the_metrics() -> None:
    state, cfg = _state_and_config()
    t = published(state, cfg)
    t.drift("gone", "node_down")
    t.poll_error("gpu-b", "down", "refused")
    smaller = config(LLAMA, nodes=("gpu-a", "gpu-b"))
    t.reloaded(smaller)
    s = parse_metrics(scrape(t))
    nodes = {dict(labels).get("node") for (_, labels) in s} - {None}
    assert nodes == {"gpu-a", "gpu-b"}
    assert sample(s, "gpu_router_drift_events_total", node="gone", kind="node_down") is None
    assert sample(s, "gpu_router_poll_errors_total", node="gone", reason="refused") is None
    assert sample(s, "gpu_router_poll_errors_total", node="gpu-b", reason="refused") == 1
    # the plan that named the old models is dropped until the next reconcile
    assert series(s, "gpu_router_priority_model_on_gpu") == {}
    # after the next reconcile only the configured priority model is there
    new_state = cluster(*(n for n in state.nodes if n.name in ("gpu-a", "gpu-b")))
    t.reconciled(new_state, plan(new_state, smaller), reconcile=2, duration_s=0.1, next_in_s=300)
    s = parse_metrics(scrape(t))
    assert set(series(s, "gpu_router_priority_model_on_gpu")) == {frozenset({("model", LLAMA)})}


def test_node_state_ages_follow_state_changes() -> None:
    state, cfg = _state_and_config()
    clock = {"now": NOW}
    t = Telemetry(cfg, wall_clock=lambda: clock["now"])
    p = plan(state, cfg)
    t.reconciled(state, p, reconcile=1, duration_s=0.1, next_in_s=300)
    first = dict(t.snapshot.node_since)
    clock["now"] = NOW + timedelta(seconds=60)
    back = cluster(
        *(replace(n, status=NodeStatus.UP, error=None) if n.name == "gone" else n for n in state.nodes)
    )
    t.reconciled(back, plan(back, cfg), reconcile=2, duration_s=0.1, next_in_s=300)
    assert t.snapshot.node_since["gpu-a"] == first["gpu-a"] == NOW
    assert t.snapshot.node_since["gone"] == NOW + timedelta(seconds=60)
    nodes = {n["node"]: n for n in t.snapshot.daemon_json(NOW + timedelta(seconds=90))["nodes"]}
    assert nodes["gone"]["state"] == "up"
    assert nodes["gone"]["for_s"] == 30
    assert nodes["sick"]["state"] == "degraded"
    assert nodes["sick"]["for_s"] == 90


def test_textfile_is_written_atomically_and_parses(tmp_path: Path) -> None:
    state, cfg = _state_and_config()
    target = tmp_path / "gpu_router.prom"
    target.write_text("old contents\n")
    write_textfile(target, static_snapshot(cfg, state, plan(state, cfg)))
    s = parse_metrics(target.read_text())
    assert sample(s, "gpu_router_node_up", node="gpu-a") == 1
    assert sample(s, "gpu_router_model_loaded_bytes", node="gpu-a", model=LLAMA, processor="gpu") == gib(3)
    # gauges only: no daemon counters or reconcile timestamps in a one-shot file
    assert not any(name.endswith("_total") for name, _ in s)
    assert sample(s, "gpu_router_last_reconcile_timestamp_seconds") is None
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_router.prom"]  # no temporary left


def test_textfile_in_a_missing_directory_fails_and_leaves_nothing(tmp_path: Path) -> None:
    state, cfg = _state_and_config()
    with pytest.raises(FileNotFoundError):
        write_textfile(tmp_path / "missing" / "x.prom", static_snapshot(cfg, state, plan(state, cfg)))
    assert list(tmp_path.iterdir()) == []


def test_the_fast_renderer_writes_exactly_what_generate_latest_writes() -> None:
    state, cfg = _state_and_config()
    odd = 'we"ird\\model\nname:latest'  # label values that need escaping
    a = replace(state.nodes[0], loaded=(*state.nodes[0].loaded, loaded(odd, 0.5)))
    state = cluster(a, *state.nodes[1:])
    t = published(state, cfg)
    t.action_finished(ActionResult(Action(ActionKind.LOAD, "gpu-a", odd, "r"), True, "ok", 0.5))
    t.reconcile_seconds.observe(1e6)  # +Inf bucket
    registry = registry_for(TelemetryCollector(t))
    fast = render(registry)
    assert fast == generate_latest(registry)
    assert b'model="we\\"ird\\\\model\\nname:latest"' in fast


@pytest.mark.parametrize("value", [0.0, 1.0, -2.5, 1e-9, 123456.0, 1234567.0, 8.588886016e9, 1e16, 1e300])
def test_sample_values_are_written_as_go_writes_them(value: float) -> None:
    from prometheus_client.utils import floatToGoString

    from gpu_router.metrics import _go_float

    assert _go_float(value) == floatToGoString(value)
    for special in (float("inf"), float("-inf"), float("nan")):
        assert _go_float(special) == floatToGoString(special)


def test_the_scraper_serves_what_the_collector_says_and_follows_new_observations() -> None:
    state, cfg = _state_and_config()
    t = published(state, cfg)
    scraper = Scraper(t)
    scraper.prime()
    assert scraper.scrape() == render(registry_for(TelemetryCollector(t)))
    # an action result: counters move, the observation's gauges are reused, the answer is still exact
    t.action_finished(ActionResult(Action(ActionKind.LOAD, "gpu-b", EMBED, "r"), True, "ok", 1.0))
    assert scraper.scrape() == render(registry_for(TelemetryCollector(t)))
    s = parse_metrics(scraper.scrape().decode())
    assert sample(s, "gpu_router_actions_total", node="gpu-b", model=EMBED, action="load", result="ok") == 1
    # a new observation: gpu-b has the model now, and the gauges say so
    b = replace(state.nodes[1], loaded=(loaded(EMBED, 0.5, pinned=True),))
    newer = cluster(state.nodes[0], b, *state.nodes[2:])
    t.reconciled(newer, plan(newer, cfg), reconcile=2, duration_s=0.1, next_in_s=300)
    s = parse_metrics(scraper.scrape().decode())
    assert sample(s, "gpu_router_model_loaded_bytes", node="gpu-b", model=EMBED, processor="gpu") == gib(0.5)
    assert scraper.scrape() == render(registry_for(TelemetryCollector(t)))


def test_what_a_snapshot_derived_survives_an_action_result_but_not_a_new_observation() -> None:
    state, cfg = _state_and_config()
    t = published(state, cfg)
    routes = t.snapshot.routes
    report = t.snapshot.report
    t.actions_started(1, [Action(ActionKind.LOAD, "gpu-b", EMBED, "r")])
    assert t.snapshot.routes is routes
    assert t.snapshot.report is report
    assert t.snapshot.daemon_json()["in_flight"][0]["model"] == EMBED
    t.reconciled(state, plan(state, cfg), reconcile=2, duration_s=0.1, next_in_s=300)
    assert t.snapshot.routes is not routes
