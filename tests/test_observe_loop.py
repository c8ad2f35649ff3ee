"""A large pass polls every node from one thread (observe.Loop), on connections opened without waiting."""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from daemon_helpers import MakeNode, write_config
from rawserver import RawServer, Serve, forward_proxy, response, serve_requests
from test_request_counts import api_requests, write_static_config

from gpu_router import observe
from gpu_router.config import load_config
from gpu_router.emulator import EmulatedNode, Fault
from gpu_router.observe import Observer, observe_once
from gpu_router.state import MIB, NodeStatus, VramSource
from gpu_router.transport import HttpClient, Pending, ProxyConfig, TimedOut

LLAMA32 = "llama3.2:latest"
T = 10.0


@pytest.fixture(autouse=True)
def every_pass_is_large(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(observe, "SIDE_BY_SIDE_MAX_CALLS", 0)


def wait_complete(pending: Pending) -> None:
    deadline = time.monotonic() + T
    while not pending.complete():
        assert time.monotonic() < deadline, "no answer"
        time.sleep(0.01)


def wait_writable(sock_owner: object) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(sock_owner, selectors.EVENT_WRITE)  # type: ignore[arg-type]
        assert sel.select(T), "the connect did not complete"


# -------------------------------------------------------------------------------- transport


def test_start_can_open_a_connection_without_waiting_and_keeps_it_for_the_next_call() -> None:
    server = RawServer(serve_requests(lambda req: response(200, json.dumps({"path": req.target}).encode())))
    client = HttpClient(server.url, timeout_s=T, proxies=ProxyConfig())
    try:
        assert client.start("GET", "/api/ps") is None  # without connect: an idle connection or nothing
        pending = client.start("GET", "/api/ps", connect=True)
        assert pending is not None
        assert pending.connecting
        assert pending.events == selectors.EVENT_WRITE
        assert pending.due <= time.monotonic() + client.connect_timeout_s
        assert not pending.complete()
        wait_writable(pending)
        pending.connected()
        assert not pending.connecting
        assert pending.events == selectors.EVENT_READ
        wait_complete(pending)
        assert json.loads(pending.finish().body) == {"path": "/api/ps"}
        again = client.start("GET", "/api/tags")  # the new connection went back to the pool
        assert again is not None
        assert not again.connecting
    finally:
        client.close()
        server.close()


def test_a_connect_refused_at_once_goes_the_blocking_way_which_says_so() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        client = HttpClient(f"http://127.0.0.1:{port}", timeout_s=T, proxies=ProxyConfig())
        pending = client.start("GET", "/api/ps", connect=True)
        if pending is not None:  # refused after EINPROGRESS: the reason comes from finish()
            wait_writable(pending)
            pending.connected()
            assert pending.complete()
            with pytest.raises(Exception, match="connection refused"):
                pending.finish()
        with pytest.raises(Exception, match="connection refused"):
            client.request("GET", "/api/ps")


def test_a_connect_past_its_deadline_times_out_connecting() -> None:
    # A listener whose accept queue is full drops further SYNs: the connect hangs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        client = HttpClient(
            f"http://127.0.0.1:{port}", timeout_s=5, connect_timeout_s=0.3, proxies=ProxyConfig()
        )
        try:
            pending = None
            for _ in range(8):  # fill the queue until a connect stays pending
                candidate = client.start("GET", "/api/ps", connect=True)
                assert candidate is not None
                with selectors.DefaultSelector() as sel:
                    sel.register(candidate, selectors.EVENT_WRITE)
                    if not sel.select(0.5):
                        pending = candidate
                        break
                fillers.append(candidate)
            if pending is None:
                pytest.skip("this kernel accepted every connect (no SYN drop on a full queue)")
            assert pending.connecting
            time.sleep(max(0.0, pending.due - time.monotonic()) + 0.01)
            with pytest.raises(TimedOut, match=r"timed out after 0\.3s connecting"):
                pending.finish()
        finally:
            for f in fillers:
                f.abandon()
            client.close()


def test_what_start_can_connect_to_without_waiting(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    backend = serve(serve_requests(lambda req: response(200, json.dumps({"path": req.target}).encode())))
    proxy = serve(forward_proxy({"gpu-node.invalid:11434": ("127.0.0.1", backend.port)}))
    assert clients(backend.url).selectable
    assert not clients(backend.url.replace("127.0.0.1", "localhost")).selectable  # a name to look up
    assert not clients("https://127.0.0.1:9").selectable  # TLS keeps bytes a selector cannot see
    assert clients("https://127.0.0.1:9").start("GET", "/api/ps", connect=True) is None
    # Through an HTTP proxy at an IP literal: the request goes out in absolute form, as request() sends it.
    environ = {"HTTP_PROXY": f"http://scraper:pa55@127.0.0.1:{proxy.port}"}
    via = clients("http://gpu-node.invalid:11434", proxies=ProxyConfig.from_environ(environ))
    assert via.selectable
    pending = via.start("GET", "/api/ps", connect=True)
    assert pending is not None
    wait_writable(pending)
    pending.connected()
    wait_complete(pending)
    assert json.loads(pending.finish().body) == {"path": "/api/ps"}
    assert proxy.requests[0].target == "http://gpu-node.invalid:11434/api/ps"
    assert proxy.requests[0].headers["proxy-authorization"] == "Basic c2NyYXBlcjpwYTU1"


# -------------------------------------------------------------------------------- the observer


def config_for(tmp_path: Path, nodes: list[EmulatedNode], **settings: object) -> Path:
    return write_static_config(tmp_path / "config.yaml", nodes, [LLAMA32], tmp_path / "state", **settings)


def test_a_large_pass_polls_every_node_from_one_thread(make_node: MakeNode, tmp_path: Path) -> None:
    nodes = [make_node(f"n{i}", (8192,), (LLAMA32,)) for i in range(12)]
    for n in nodes:
        n.load(LLAMA32, keep_alive=-1)
    observer = Observer(load_config(config_for(tmp_path, nodes)))
    try:
        state = observer.observe()
        assert [n.status for n in state.nodes] == [NodeStatus.UP] * 12
        assert all(
            n.version == nodes[0].version and [m.name for m in n.loaded] == [LLAMA32] for n in state.nodes
        )
        # Static GPUs and cached shows aside, only the shows needed threads (one per digest).
        assert observer._pool.threads <= 2
        # ps, tags and version one after another on one connection; the one show (one digest for
        # the whole cluster) goes out from a worker as soon as its tags are in, so it may reach the
        # node before or after that node's version, on a second connection.
        for n in nodes:
            asked = api_requests(n)
            assert [p for p in asked if p != "/api/show"][:3] == ["/api/ps", "/api/tags", "/api/version"]
            if "/api/show" in asked:
                assert asked.index("/api/show") > asked.index("/api/tags")
        opened = [n.connections_accepted for n in nodes]
        assert sum(opened) <= len(nodes) + 1
        again = observer.observe()
        assert [n.status for n in again.nodes] == [NodeStatus.UP] * 12
        assert [n.connections_accepted for n in nodes] == opened  # the next pass reuses them
    finally:
        observer.close()


def test_a_large_pass_gives_each_broken_node_its_due(make_node: MakeNode, tmp_path: Path) -> None:
    names = ("ok", "hung", "refused", "http500", "garbage", "drip", "restarted", "by-name")
    nodes = {name: make_node(name, (8192,), (LLAMA32,)) for name in names}
    for n in nodes.values():
        n.load(LLAMA32, keep_alive=-1)
    path = config_for(tmp_path, list(nodes.values()), request_timeout="2s")
    data = yaml.safe_load(path.read_text())
    for entry in data["nodes"]:
        if entry["url"] == nodes["by-name"].url:
            # A host name is looked up in a worker thread (name resolution cannot be interrupted).
            entry["url"] = entry["url"].replace("127.0.0.1", "localhost")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    observer = Observer(load_config(path))
    try:
        first = {n.name: n for n in observer.observe().nodes}
        assert all(n.status is NodeStatus.UP for n in first.values()), {k: n.error for k, n in first.items()}
        nodes["hung"].set_fault(Fault.HANG, paths=("/api/ps",))
        nodes["refused"].stop()
        nodes["http500"].set_fault(Fault.HTTP500, paths=("/api/ps",))
        nodes["garbage"].set_fault(Fault.GARBAGE, paths=("/api/ps",))
        nodes["drip"].set_fault(Fault.DRIP, rate_bps=4000, paths=("/api/ps",))
        nodes["restarted"].restart()
        seen = {n.name: n for n in observer.observe().nodes}
        for name in ("ok", "drip", "by-name"):
            assert seen[name].status is NodeStatus.UP, (name, seen[name].error)
            assert [m.name for m in seen[name].loaded] == [LLAMA32]
        assert seen["restarted"].status is NodeStatus.UP, seen["restarted"].error
        assert seen["restarted"].loaded == ()  # a restart unloads
        errors = {name: seen[name].error or "" for name in ("hung", "refused", "http500", "garbage")}
        assert errors["hung"].startswith("GET /api/ps: timed out after 2s waiting for the response headers")
        assert errors["refused"].startswith("GET /api/ps: connection refused")
        assert errors["http500"].startswith("HTTP 500: GET /api/ps: internal server error")
        assert errors["garbage"].startswith("GET /api/ps: invalid JSON")
        for name in ("hung", "refused", "http500", "garbage"):
            assert seen[name].status is not NodeStatus.UP, name
    finally:
        observer.close()


def test_a_one_shot_report_of_a_large_cluster_reads_the_same_as_threads(
    make_node: MakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = [make_node(f"n{i}", (8192,), (LLAMA32, "all-minilm")) for i in range(4)]
    nodes[0].load(LLAMA32, keep_alive=-1)
    config = load_config(config_for(tmp_path, nodes))
    looped = observe_once(config).nodes
    monkeypatch.setattr(observe, "SIDE_BY_SIDE_MAX_CALLS", 10_000)
    threaded = observe_once(config).nodes

    def facts(states: tuple[object, ...]) -> list[tuple[object, ...]]:
        return [
            (s.name, s.status, s.version, s.loaded, s.installed, sorted(s.info))  # type: ignore[attr-defined]
            for s in states
        ]

    assert facts(looped) == facts(threaded)


def test_a_large_pass_scrapes_exporters_on_the_loop_and_waits_only_for_answered_nodes(
    make_node: MakeNode, tmp_path: Path
) -> None:
    nodes = {name: make_node(name, (8192, 16384), (LLAMA32,)) for name in ("a", "b", "dead", "mute")}
    path = write_config(tmp_path / "config.yaml", list(nodes.values()), [LLAMA32], tmp_path / "state")
    observer = Observer(load_config(path))
    try:
        first = {n.name: n for n in observer.observe().nodes}
        for name in nodes:
            assert first[name].gpu.source is VramSource.EXPORTER, (name, first[name].gpu.error)
            assert [g.total_bytes for g in first[name].gpu.gpus] == [8192 * MIB, 16384 * MIB]
        assert observer._pool.threads <= 1  # the one show; every ps, tags, version and scrape on the loop
        # "dead" refuses and its exporter hangs: the pass ends without waiting for that exporter.
        nodes["dead"].set_fault(Fault.REFUSE, paths=("/api/ps",))
        nodes["dead"].add_fault(Fault.HANG, paths=("/metrics",))
        seen = {n.name: n for n in observer.observe().nodes}
        assert seen["a"].gpu.source is VramSource.EXPORTER
        assert seen["dead"].status is not NodeStatus.UP
        assert seen["dead"].gpu.error == "GPU source not waited for (node failed)"
        # "mute" answers and its exporter hangs: waited for, until the scrape's own timeout.
        nodes["dead"].clear_fault()
        nodes["mute"].set_fault(Fault.HANG, paths=("/metrics",))
        seen = {n.name: n for n in observer.observe().nodes}
        assert seen["mute"].status is NodeStatus.UP
        url = nodes["mute"].metrics_url
        assert (
            seen["mute"].gpu.error == f"exporter {url}: timed out after 2s waiting for the response headers"
        )
    finally:
        observer.close()


def test_passes_on_the_loop_leave_no_descriptor_or_thread_behind(make_node: MakeNode, tmp_path: Path) -> None:
    nodes = [make_node(f"n{i}", (8192,), (LLAMA32,)) for i in range(3)]
    nodes[0].load(LLAMA32, keep_alive=-1)
    observer = Observer(load_config(write_config(tmp_path / "c.yaml", nodes, [LLAMA32], tmp_path / "state")))
    try:
        observer.observe()
        observer.watch()
        fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
        nodes[1].set_fault(Fault.DRIP, rate_bps=20000, paths=("/api/ps",))  # handed to a worker each time
        for _ in range(15):
            observer.observe()
            observer.watch()
        nodes[1].clear_fault()
        observer.observe()
        assert len(os.listdir("/proc/self/fd")) <= fds
        assert threading.active_count() <= threads + 1  # the worker the drip needed stays for reuse
    finally:
        observer.close()


def test_the_switch_interval_is_raised_only_for_what_the_loop_hands_to_threads(
    make_node: MakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On the loop, hundreds of nodes are one thread: the interval stays (an API answer is not held
    # up by it). A node only a thread can ask (a host name) counts again.
    monkeypatch.setattr(observe, "COARSE_SWITCH_FROM_CALLS", 1)
    node = make_node("solo", (8192,), (LLAMA32,))
    seen: list[float] = []
    node.on_request("/api/ps", lambda _: seen.append(round(sys.getswitchinterval(), 6)), once=False)
    path = config_for(tmp_path, [node])
    before = round(sys.getswitchinterval(), 6)
    assert observe_once(load_config(path)).nodes[0].up
    path.write_text(path.read_text().replace("127.0.0.1", "localhost"))
    assert observe_once(load_config(path)).nodes[0].up
    assert seen == [before, observe.COARSE_SWITCH_S]
