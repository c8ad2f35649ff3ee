"""The daemon against emulated nodes of different Ollama versions: each node sized as its own Ollama.

The emulator follows each version's rules (default context by VRAM from v0.15.5, the classic
estimate before, llama-server's pre-load check and evict-all from v0.30), so these tests check the
whole loop: the plan's need per node, the load it sends, and what the node then shows.
"""

from __future__ import annotations

import threading

import pytest
from daemon_helpers import (
    WAIT_S,
    MakeDaemon,
    MakeNode,
    expires_year,
    fully_on_gpu,
    load_requests,
    pinned_on_gpu,
    ps_entry,
    settle,
    wait_until,
)

from gpu_router.emulator import Fault

LLAMA31 = "llama3.1:8b"
LLAMA32 = "llama3.2:latest"
QWEN7 = "qwen2.5:7b"
EMBED = "nomic-embed-text:latest"


def test_a_v016_and_a_v012_node_need_different_sizes_and_both_load_fully_on_gpu(
    make_node: MakeNode, make_daemon: MakeDaemon
) -> None:
    big = make_node("big", (24576,), (LLAMA31,), version="0.16.1")
    small = make_node("small", (8192,), (LLAMA31,), version="0.12.6")
    daemon = make_daemon([big, small], [{"name": LLAMA31, "replicas": 2}])
    p = daemon.reconcile()
    mp = p.model(LLAMA31)
    assert mp is not None
    on_big, on_small = mp.need_on("big"), mp.need_on("small")
    # v0.16.1 on 24 GiB runs it at 32768 (the VRAM tier of server/routes.go@v0.15.5), v0.12.6 at 4096.
    assert (on_big.context_length, on_small.context_length) == (32768, 4096)
    assert on_big.need_bytes is not None
    assert on_small.need_bytes is not None
    assert on_big.need_bytes > on_small.need_bytes
    assert daemon.executor.wait_idle(WAIT_S)
    daemon.collect_results()
    for node, ctx in ((big, 32768), (small, 4096)):
        assert pinned_on_gpu(node, LLAMA31), node.loaded()
        entry = ps_entry(node, LLAMA31)
        assert entry is not None
        assert entry["context_length"] == ctx
        # The need planned for the node is what the node then holds, within the era's fit margin.
        need = mp.need_on(node.name).need_bytes
        assert need is not None
        assert entry["size"] <= need
    # No options were sent: each node uses its own default context, as its clients will.
    assert all("options" not in b for n in (big, small) for b in load_requests(n, LLAMA31))


def test_a_client_reload_at_another_context_is_pinned_in_place(
    make_node: MakeNode, make_daemon: MakeDaemon
) -> None:
    a = make_node("gpu-a", (24576,), (LLAMA32,), version="0.12.6")
    daemon = make_daemon([a], [LLAMA32])
    settle(daemon)
    assert pinned_on_gpu(a, LLAMA32)
    # Another client asks for it at 8192 with keep_alive 6s: Ollama reloads it there, expiring soon.
    a.client_request(LLAMA32, keep_alive="6s", num_ctx=8192)
    entry = ps_entry(a, LLAMA32)
    assert entry is not None
    assert entry["context_length"] == 8192
    assert expires_year(entry) < 2300
    a.clear_events()
    settle(daemon)
    entry = ps_entry(a, LLAMA32)
    assert entry is not None
    assert pinned_on_gpu(a, LLAMA32), entry
    assert entry["context_length"] == 8192  # pinned where it is, at the context the client uses
    last = load_requests(a, LLAMA32)[-1]
    assert last == {"model": LLAMA32, "keep_alive": -1, "options": {"num_ctx": 8192}}
    assert [e.kind for e in a.events() if e.kind in ("load", "reload")] == [], "the pin reloaded the model"


def test_clients_that_keep_reloading_at_their_context_get_one_warning(
    make_node: MakeNode, make_daemon: MakeDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    a = make_node("gpu-a", (24576,), (LLAMA32,), version="0.12.6")
    daemon = make_daemon([a], [LLAMA32])
    settle(daemon)
    for _ in range(3):
        a.client_request(LLAMA32, keep_alive="6s", num_ctx=8192)
        settle(daemon)
    warnings = [r.getMessage() for r in caplog.records if "keep reloading" in r.getMessage()]
    assert len(warnings) == 1
    assert "num_ctx 8192" in warnings[0]
    assert "num_ctx: 8192" in warnings[0]


def test_a_failed_load_on_a_v030_node_that_evicts_everything_is_recovered_within_a_watch(
    make_node: MakeNode, make_daemon: MakeDaemon
) -> None:
    # v0.30: a load that runs out of VRAM makes Ollama evict every other model (pinned ones too)
    # and retry once. The daemon's watch must notice the pins it lost and put them back.
    a = make_node("gpu-a", (24576,), (LLAMA32, EMBED, QWEN7), version="0.30.0", load_delay_s=0.05)
    daemon = make_daemon([a], [LLAMA32, EMBED], check_interval="300s", watch_interval="0.5s")
    loop = threading.Thread(target=daemon.run, name="daemon", daemon=True)
    loop.start()
    try:
        # Both pinned, and the daemon done verifying them (its results taken in), before the fault.
        wait_until(
            lambda: pinned_on_gpu(a, LLAMA32) and pinned_on_gpu(a, EMBED) and not daemon.busy_nodes(),
            what="both pinned",
        )
        before = len(load_requests(a, LLAMA32)) + len(load_requests(a, EMBED))
        a.set_fault(Fault.LOAD_OOM, model=QWEN7, count=1)
        a.client_request(QWEN7, keep_alive="5m")  # another client's load: OOM, evict all, retry
        assert not fully_on_gpu(a, LLAMA32)
        assert not fully_on_gpu(a, EMBED)
        # The next watch (0.5 s) sees the pins gone and reconciles at once; loads take 0.05 s.
        wait_until(
            lambda: pinned_on_gpu(a, LLAMA32) and pinned_on_gpu(a, EMBED),
            timeout_s=5,
            what="the pins back within a watch interval and the loads",
        )
        after = len(load_requests(a, LLAMA32)) + len(load_requests(a, EMBED))
        assert after == before + 2  # each put back once, not retried in a loop
    finally:
        daemon.request_stop()
        loop.join(WAIT_S)
    assert not loop.is_alive()
