"""The daemon in-process against emulated Ollama nodes over real HTTP on 127.0.0.1.

Each test writes a YAML config in tmp_path, builds a :class:`Daemon` from ``load_config`` and drives
``reconcile()``/``watch()`` (or ``run``) itself; the emulator records every request the daemon sends.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from daemon_helpers import (
    WAIT_S,
    FakeClock,
    MakeDaemon,
    MakeNode,
    expires_year,
    fully_on_gpu,
    load_requests,
    pinned_on_gpu,
    ps_entry,
    settle,
    unload_requests,
    wait_until,
)

from gpu_router.emulator import Fault
from gpu_router.executor import Backoff
from gpu_router.state import NodeStatus
from gpu_router.store import SizeStore

LLAMA32 = "llama3.2:latest"  # 3.1 GiB on GPU at the default context
EMBED = "nomic-embed-text:latest"  # embedding only: loaded through /api/embed
LLAMA31 = "llama3.1:8b"  # 6.0 GiB
QWEN7 = "qwen2.5:7b"  # 5.4 GiB: with llama3.1:8b more than one 8 GiB card holds


# --------------------------------------------------------------------------- 1. load and pin


def test_priority_models_are_loaded_fully_on_gpu_and_pinned(
    make_node: MakeNode, make_daemon: MakeDaemon
) -> None:
    a = make_node("gpu-a", models=(LLAMA32, EMBED, QWEN7))
    daemon = make_daemon([a], [LLAMA32, "nomic-embed-text"])  # a tag-less name means :latest

    settle(daemon)

    for model in (LLAMA32, EMBED):
        entry = ps_entry(a, model)
        assert entry is not None, f"{model} not loaded: {a.loaded()}"
        assert entry["size_vram"] == entry["size"], f"{model} not fully on GPU: {entry}"
        assert expires_year(entry) > 2300, f"{model} not pinned: expires_at {entry['expires_at']}"
    assert ps_entry(a, QWEN7) is None, "a model that is not a priority was loaded"
    sent = sorted((r.method, r.path, r.body) for r in a.mutating_requests())
    # Exactly model + keep_alive as a number: options would make Ollama reload on the next real request.
    assert sent == [
        ("POST", "/api/embed", {"model": EMBED, "keep_alive": -1}),
        ("POST", "/api/generate", {"model": LLAMA32, "keep_alive": -1}),
    ]


def test_a_model_already_pinned_on_gpu_is_left_alone(make_node: MakeNode, make_daemon: MakeDaemon) -> None:
    a = make_node("gpu-a", models=(LLAMA32,))
    a.load(LLAMA32, keep_alive=-1)
    daemon = make_daemon([a], [LLAMA32])
    settle(daemon, 3)
    assert a.mutating_requests() == []


# --------------------------------------------------------------------------- 2. nothing wrong, nothing sent


def test_idle_cycles_send_no_mutating_request(make_node: MakeNode, make_daemon: MakeDaemon) -> None:
    a = make_node("gpu-a", models=(LLAMA32, EMBED, "all-minilm"))
    b = make_node("gpu-b", models=(LLAMA32, "gemma2:2b"))
    cpu = make_node("cpu-1", gpus_mib=(), models=("all-minilm",))
    # Non-priority models in every state: idle with a timer, pinned, on CPU.
    a.load("all-minilm", keep_alive="5m")
    b.load("gemma2:2b", keep_alive=-1)
    cpu.load("all-minilm", keep_alive="10m")
    daemon = make_daemon([a, b, cpu], [LLAMA32, EMBED])
    settle(daemon)
    assert pinned_on_gpu(a, EMBED)  # only gpu-a has it
    assert pinned_on_gpu(a, LLAMA32) or pinned_on_gpu(b, LLAMA32)
    for n in (a, b, cpu):
        n.clear_requests()

    for _ in range(100):
        daemon.reconcile()
        assert daemon.watch() is False
    assert daemon.executor.wait_idle(WAIT_S)

    for n in (a, b, cpu):
        assert n.mutating_requests() == [], f"{n.name}: {n.mutating_requests()}"
        assert any(r.path == "/api/ps" for r in n.requests), "the cycles did not poll the node"
    assert ps_entry(a, "all-minilm:latest") is not None
    assert ps_entry(b, "gemma2:2b") is not None


# --------------------------------------------------------------------------- 3. room made by policy


def test_evict_idle_unloads_an_idle_model_to_make_room(make_node: MakeNode, make_daemon: MakeDaemon) -> None:
    a = make_node("gpu-a", models=(LLAMA31, QWEN7))
    a.load(QWEN7, keep_alive="5m")
    daemon = make_daemon([a], [LLAMA31], evict="idle")

    settle(daemon)

    assert unload_requests(a, QWEN7) == [{"model": QWEN7, "keep_alive": 0}]
    bodies = [r.body for r in a.mutating_requests()]
    assert bodies.index({"model": QWEN7, "keep_alive": 0}) < bodies.index(
        {"model": LLAMA31, "keep_alive": -1}
    ), "the load went out before the room was made"
    assert pinned_on_gpu(a, LLAMA31)
    assert ps_entry(a, QWEN7) is None


@pytest.mark.parametrize(("policy", "unloaded"), [("idle", False), ("any", True)])
def test_a_pinned_model_is_only_unloaded_under_evict_any(
    make_node: MakeNode, make_daemon: MakeDaemon, policy: str, unloaded: bool
) -> None:
    a = make_node("gpu-a", models=(LLAMA31, QWEN7))
    a.load(QWEN7, keep_alive=-1)  # pinned by someone else, not a priority model here
    daemon = make_daemon([a], [LLAMA31], evict=policy)

    settle(daemon, 2)

    if unloaded:
        assert unload_requests(a, QWEN7) == [{"model": QWEN7, "keep_alive": 0}]
        assert pinned_on_gpu(a, LLAMA31)
    else:
        # No unload, and no load either: Ollama would evict the pinned model itself to make room.
        assert a.mutating_requests() == []
        assert pinned_on_gpu(a, QWEN7)
        assert ps_entry(a, LLAMA31) is None


def test_a_priority_model_is_never_unloaded_for_another(
    make_node: MakeNode, make_daemon: MakeDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gpu_router")
    a = make_node("gpu-a", models=(LLAMA31, QWEN7))
    a.load(LLAMA31, keep_alive=-1)
    daemon = make_daemon([a], [QWEN7, LLAMA31], evict="any")  # the missing one listed first

    settle(daemon, 3)

    assert unload_requests(a, LLAMA31) == []
    assert load_requests(a, QWEN7) == [], "loading it would make Ollama evict the other priority model"
    assert pinned_on_gpu(a, LLAMA31)
    assert "reconcile #3: 1/2 priority models on GPU" in caplog.text


def test_evict_never_unloads_nothing(make_node: MakeNode, make_daemon: MakeDaemon) -> None:
    a = make_node("gpu-a", models=(LLAMA31, QWEN7))
    a.load(QWEN7, keep_alive="5m")
    daemon = make_daemon([a], [LLAMA31], evict="never")

    settle(daemon, 2)

    assert a.mutating_requests() == []
    assert fully_on_gpu(a, QWEN7)
    assert ps_entry(a, LLAMA31) is None


def test_room_is_made_on_another_node_when_one_fits_without(
    make_node: MakeNode, make_daemon: MakeDaemon
) -> None:
    a = make_node("gpu-a", models=(LLAMA31, QWEN7))
    b = make_node("gpu-b", models=(LLAMA31,))
    a.load(QWEN7, keep_alive="5m")
    daemon = make_daemon([a, b], [LLAMA31], evict="idle")

    settle(daemon)

    assert a.mutating_requests() == [], "evicted although another node had room"
    assert pinned_on_gpu(b, LLAMA31)


# --------------------------------------------------------------------------- 4. node restart


def test_watch_sees_a_restart_and_the_next_reconcile_reloads(
    make_node: MakeNode, make_daemon: MakeDaemon
) -> None:
    a = make_node("gpu-a", models=(LLAMA32, EMBED))
    daemon = make_daemon([a], [LLAMA32, EMBED])
    settle(daemon)
    assert pinned_on_gpu(a, LLAMA32)
    assert pinned_on_gpu(a, EMBED)
    assert daemon.watch() is False

    a.restart()
    assert a.loaded() == []
    assert daemon.watch() is True
    settle(daemon)

    assert pinned_on_gpu(a, LLAMA32)
    assert pinned_on_gpu(a, EMBED)
    assert daemon.watch() is False


def test_the_run_loop_recovers_a_restarted_node(make_node: MakeNode, make_daemon: MakeDaemon) -> None:
    a = make_node("gpu-a", models=(LLAMA32,))
    daemon = make_daemon([a], [LLAMA32], watch_interval="0.2s", check_interval="300s")
    codes: list[int] = []
    loop = threading.Thread(target=lambda: codes.append(daemon.run()), name="daemon-loop", daemon=True)
    loop.start()
    try:
        # Idle executor too: a restart between the load's answer and its check would fail the load.
        wait_until(
            lambda: pinned_on_gpu(a, LLAMA32) and not daemon.executor.busy_nodes(), what="the first load"
        )
        loads_before = len(load_requests(a, LLAMA32))
        a.restart()
        # Only the 0.2 s watch can notice: the next full reconcile is 300 s away.
        wait_until(lambda: pinned_on_gpu(a, LLAMA32), what="the reload after the restart")
        assert len(load_requests(a, LLAMA32)) == loads_before + 1
    finally:
        daemon.request_stop()
        loop.join(WAIT_S)
    assert not loop.is_alive()
    assert codes == [0]


def test_a_restart_while_down_for_a_while_is_recovered(make_node: MakeNode, make_daemon: MakeDaemon) -> None:
    a = make_node("gpu-a", models=(LLAMA32,))
    clock = FakeClock()
    daemon = make_daemon([a], [LLAMA32], request_timeout="1s", watch_interval="10s", clock=clock)
    settle(daemon)
    a.restart(down_s=1.0, wait=False)
    wait_until(lambda: daemon.watch(), what="the watch to notice the node going down")
    settle(daemon)  # the second failed poll: the node is down now, nothing can be done, nothing breaks
    assert daemon.observer.health.status("gpu-a") is NodeStatus.DOWN
    wait_until(lambda: a.running, what="the node to come back")
    # Down nodes are polled with a backoff (starting at watch_interval): not yet...
    requests_before = len(a.requests)
    assert daemon.watch() is False
    assert len(a.requests) == requests_before, "a down node was polled during its backoff"
    clock.advance(10)
    assert daemon.watch() is True  # ...then its first good answer brings it back
    settle(daemon)
    assert daemon.observer.health.status("gpu-a") is NodeStatus.UP
    assert pinned_on_gpu(a, LLAMA32)


# --------------------------------------------------------------------------- 5. a hung node


def test_a_node_hanging_in_a_load_does_not_stall_the_others(
    make_node: MakeNode, make_daemon: MakeDaemon
) -> None:
    a = make_node("gpu-a", models=(LLAMA32,))
    b = make_node("gpu-b", models=("gemma2:2b",))
    a.set_fault(Fault.HANG, paths=("/api/generate",))
    daemon = make_daemon([a, b], [LLAMA32, "gemma2:2b"], request_timeout="1s", load_timeout="60s")

    daemon.reconcile()
    wait_until(
        lambda: pinned_on_gpu(b, "gemma2:2b") and "gpu-b" not in daemon.executor.busy_nodes(),
        what="gpu-b's load, checked and done",
    )
    assert ps_entry(a, LLAMA32) is None
    assert len(load_requests(a, LLAMA32)) == 1
    assert daemon.executor.busy_nodes() == {"gpu-a"}

    # Cycles go on (the node still answers /api/ps) and nothing more is sent to the busy node.
    for _ in range(3):
        daemon.reconcile()
        assert daemon.watch() is False
    assert len(load_requests(a, LLAMA32)) == 1

    a.clear_fault()  # the hung request now completes: the load in flight finishes
    assert daemon.executor.wait_idle(WAIT_S)
    daemon.collect_results()
    assert pinned_on_gpu(a, LLAMA32)
    assert daemon.backoff.blocked() == frozenset()


def test_a_reload_sends_no_second_load_to_a_node_still_loading(
    make_node: MakeNode, make_daemon: MakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reload must neither wait for the hung load nor let the new executor load again.
    monkeypatch.setattr("gpu_router.daemon.STOP_GRACE_S", 0.3)
    a = make_node("gpu-a", models=(LLAMA32,))
    a.set_fault(Fault.HANG, paths=("/api/generate",))
    daemon = make_daemon([a], [LLAMA32], watch_interval="0.2s", load_timeout="60s")
    loop = threading.Thread(target=daemon.run, name="daemon-loop", daemon=True)
    loop.start()
    try:
        wait_until(lambda: load_requests(a, LLAMA32), what="the first load")
        before = daemon.reconciles
        daemon.request_reload()
        wait_until(lambda: daemon.reconciles > before, what="a reconcile after the reload")
        threading.Event().wait(0.5)  # room for a second request to arrive, if one was sent
        assert len(load_requests(a, LLAMA32)) == 1, "a second load went to a node with one in flight"
    finally:
        a.clear_fault()
        daemon.request_stop()
        loop.join(WAIT_S)


# --------------------------------------------------------------------------- 6. failover without flapping


def test_failover_to_another_node_and_no_flapping_back(make_node: MakeNode, make_daemon: MakeDaemon) -> None:
    a = make_node("gpu-a", models=(LLAMA32,))
    b = make_node("gpu-b", models=(LLAMA32,))
    clock = FakeClock()
    daemon = make_daemon([a, b], [LLAMA32], request_timeout="1s", watch_interval="10s", clock=clock)
    settle(daemon)
    assert pinned_on_gpu(a, LLAMA32)
    assert ps_entry(b, LLAMA32) is None

    a.set_fault(Fault.REFUSE)
    assert daemon.watch() is True  # the first failed poll: a is degraded, its pin still counts
    settle(daemon)  # the second: a is down (down_after 2), and the model fails over to b
    assert pinned_on_gpu(b, LLAMA32)

    a.restart()  # comes back empty, as after a real crash
    a.clear_fault()
    for n in (a, b):
        n.clear_requests()
    clock.advance(10)  # a down node is polled again after its backoff
    assert daemon.watch() is True  # "node is back": look again
    settle(daemon, 4)
    for _ in range(4):
        daemon.watch()

    assert a.mutating_requests() == [], "loaded back onto the node that returned"
    assert b.mutating_requests() == [], "the copy on the failover node was touched"
    assert pinned_on_gpu(b, LLAMA32)
    assert ps_entry(a, LLAMA32) is None


# --------------------------------------------------------------------------- 7. backoff


def test_a_failing_load_is_not_retried_every_cycle(make_node: MakeNode, make_daemon: MakeDaemon) -> None:
    clock = FakeClock()
    a = make_node("gpu-a", models=(LLAMA32,))
    a.set_fault(Fault.HTTP500, paths=("/api/generate",))
    daemon = make_daemon([a], [LLAMA32], clock=clock)

    settle(daemon)
    assert len(load_requests(a, LLAMA32)) == 1
    assert (LLAMA32, "gpu-a") in daemon.backoff.blocked()

    for _ in range(5):
        clock.advance(5)
        settle(daemon)
    assert len(load_requests(a, LLAMA32)) == 1, "retried during the backoff"

    a.clear_fault()
    clock.advance(30)  # past the first backoff step (30 s from the failure)
    settle(daemon)
    assert len(load_requests(a, LLAMA32)) == 2
    assert pinned_on_gpu(a, LLAMA32)
    assert daemon.backoff.blocked() == frozenset()


def test_backoff_doubles_caps_and_clears_on_success() -> None:
    clock = FakeClock(0.0)
    b = Backoff(base_s=30.0, cap_s=100.0, clock=clock)
    assert b.blocked() == frozenset()

    assert b.failed("m", "n1") == 30.0
    assert b.blocked() == {("m", "n1")}
    clock.advance(29.9)
    assert b.blocked() == {("m", "n1")}
    clock.advance(0.2)
    assert b.blocked() == frozenset()

    assert b.failed("m", "n1") == 60.0
    assert b.failed("m", "n1") == 100.0  # 120 capped
    assert b.failed("m", "n1") == 100.0
    assert b.failed("m", "n2") == 30.0  # pairs are independent
    assert b.blocked() == {("m", "n1"), ("m", "n2")}

    b.succeeded("m", "n1")
    assert b.blocked() == {("m", "n2")}
    assert b.failed("m", "n1") == 30.0  # counting starts over after a success


# --------------------------------------------------------------------------- 8. dry run, monitor only


@pytest.mark.parametrize(
    ("dry_run", "settings", "why", "mode"),
    [
        (True, {}, "dry run", "dry run"),
        (False, {"auto_optimize": False}, "auto_optimize is off", "monitor only"),
    ],
)
def test_dry_run_and_monitor_only_log_the_plan_and_send_nothing(
    make_node: MakeNode,
    make_daemon: MakeDaemon,
    caplog: pytest.LogCaptureFixture,
    dry_run: bool,
    settings: dict[str, Any],
    why: str,
    mode: str,
) -> None:
    a = make_node("gpu-a", models=(LLAMA31, QWEN7))
    a.load(QWEN7, keep_alive="5m")
    daemon = make_daemon([a], [LLAMA31], dry_run=dry_run, **settings)
    caplog.set_level(logging.INFO, logger="gpu_router")

    settle(daemon, 3)

    assert a.mutating_requests() == []
    assert fully_on_gpu(a, QWEN7)
    assert ps_entry(a, LLAMA31) is None
    text = caplog.text
    assert f"would unload {QWEN7} on gpu-a ({why})" in text
    assert f"would load {LLAMA31} on gpu-a ({why})" in text
    assert f"reconcile #3: 0/1 priority models on GPU, 2 actions not taken ({mode})" in text


# --------------------------------------------------------------------------- 9. cpu_fallback


@pytest.mark.parametrize("fallback", [True, False])
def test_cpu_fallback_loads_on_a_cpu_node_when_no_gpu_has_room(
    make_node: MakeNode, make_daemon: MakeDaemon, caplog: pytest.LogCaptureFixture, fallback: bool
) -> None:
    small = make_node("gpu-small", (4096,), models=(LLAMA31,))
    cpu = make_node("cpu-1", (), models=(LLAMA31,))
    daemon = make_daemon([small, cpu], [LLAMA31], cpu_fallback=fallback)
    caplog.set_level(logging.INFO, logger="gpu_router")

    settle(daemon, 3)

    assert small.mutating_requests() == []
    if not fallback:
        assert cpu.mutating_requests() == []
        return
    assert load_requests(cpu, LLAMA31) == [{"model": LLAMA31, "keep_alive": -1}], (
        "one load, not one per cycle"
    )
    entry = ps_entry(cpu, LLAMA31)
    assert entry is not None
    assert entry["size_vram"] == 0
    assert f"load {LLAMA31} on cpu-1: cpu_fallback" in caplog.text
    # Where it was meant to go: a success, not a failure to back off from.
    assert f"action load node=cpu-1 model={LLAMA31} result=ok" in caplog.text
    assert "result=failed" not in caplog.text
    assert daemon.backoff.blocked() == frozenset()
    digest = entry["digest"]
    assert not [k for k in daemon.store.sizes if k.digest == digest], (
        "a size on CPU was learned as the VRAM it needs"
    )


def test_a_failing_cpu_fallback_load_is_backed_off(make_node: MakeNode, make_daemon: MakeDaemon) -> None:
    small = make_node("gpu-small", (4096,), models=(LLAMA31,))
    cpu = make_node("cpu-1", (), models=(LLAMA31,))
    cpu.set_fault(Fault.HTTP500, paths=("/api/generate",))
    daemon = make_daemon([small, cpu], [LLAMA31], cpu_fallback=True)

    settle(daemon, 4)

    assert (LLAMA31, "cpu-1") in daemon.backoff.blocked()
    assert len(load_requests(cpu, LLAMA31)) == 1, "retried every cycle despite the backoff"


# --------------------------------------------------------------------------- 10. replicas


def test_replicas_go_to_distinct_gpu_nodes(
    make_node: MakeNode, make_daemon: MakeDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gpu_router")
    nodes = [make_node(f"gpu-{c}", models=(LLAMA32,)) for c in "abc"]
    daemon = make_daemon(nodes, [{"name": LLAMA32, "replicas": 2}])

    settle(daemon, 3)

    holders = [n.name for n in nodes if pinned_on_gpu(n, LLAMA32)]
    assert len(holders) == 2, f"on {holders}"
    assert sum(len(load_requests(n, LLAMA32)) for n in nodes) == 2
    assert "reconcile #3: 1/1 priority models on GPU" in caplog.text


def test_an_unexpected_error_in_a_reconcile_is_logged_and_the_loop_goes_on(
    make_node: MakeNode, make_daemon: MakeDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    a = make_node("gpu-a", models=(LLAMA32,))
    daemon = make_daemon([a], [LLAMA32], check_interval="0.05s", watch_interval=0)
    real = daemon.observer.observe
    calls = {"n": 0}

    def flaky(**kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug, not a node fault")
        return real(**kwargs)

    daemon.observer.observe = flaky  # type: ignore[method-assign]
    loop = threading.Thread(target=daemon.run, name="daemon-loop", daemon=True)
    with caplog.at_level(logging.INFO, logger="gpu_router"):
        loop.start()
        try:
            wait_until(lambda: pinned_on_gpu(a, LLAMA32), what="the load after the failed cycle")
        finally:
            daemon.request_stop()
            loop.join(WAIT_S)
    assert not loop.is_alive()
    assert "reconcile #1 failed; trying again next cycle" in caplog.text
    assert "RuntimeError: a bug, not a node fault" in caplog.text


def test_sizes_are_learned_under_their_whole_key(make_node: MakeNode, make_daemon: MakeDaemon) -> None:
    a = make_node("gpu-a", models=(LLAMA32,))
    daemon = make_daemon([a], [LLAMA32])
    settle(daemon)
    entry = ps_entry(a, LLAMA32)
    assert entry is not None
    keys = [k for k in daemon.store.sizes if k.digest == entry["digest"]]
    assert len(keys) == 1
    (key,) = keys
    assert (key.context_length, key.num_parallel, key.kv_cache_type) == (entry["context_length"], 1, "f16")
    assert daemon.store.sizes[key] == entry["size"]
    # Saved, so a restart (or a report) sizes from it without the model being loaded.
    again = SizeStore(daemon.store.path)
    assert again.load() == {key: entry["size"]}
