"""What keeps a pass over many nodes quick: its worker threads, one deadline, fewer calls when large."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from daemon_helpers import MakeNode, wait_until
from rawserver import Conn, RawServer
from test_request_counts import api_requests, write_static_config

from gpu_router import observe
from gpu_router.config import load_config
from gpu_router.emulator import Fault
from gpu_router.observe import Workers, observe_once
from gpu_router.ollama import OllamaError
from gpu_router.transport import HttpClient, ProxyConfig, TimedOut

LLAMA32 = "llama3.2:latest"


@pytest.fixture
def workers() -> Iterator[Workers]:
    w = Workers()
    yield w
    w.close()


def test_reserved_threads_take_the_calls_queued_after(workers: Workers) -> None:
    workers.reserve(8)
    assert workers.threads == 8
    gate = threading.Event()
    futures = [workers.submit(gate.wait, 10) for _ in range(8)]
    assert workers.threads == 8  # every call found a reserved thread idle
    wait_until(lambda: all(f.running() for f in futures), what="all eight calls to run at once")
    gate.set()
    assert [f.result(10) for f in futures] == [True] * 8
    workers.reserve(8)
    assert workers.threads == 8  # idle again: nothing more to start


def test_a_call_beyond_the_reserve_starts_its_own_thread(workers: Workers) -> None:
    gate = threading.Event()
    held = [workers.submit(gate.wait, 10) for _ in range(3)]
    assert workers.threads == 3
    wait_until(lambda: all(f.running() for f in held), what="three calls running")
    gate.set()
    for f in held:
        f.result(10)


def test_results_and_errors_come_back_through_the_future(workers: Workers) -> None:
    assert workers.submit(sum, [1, 2, 3]).result(10) == 6
    with pytest.raises(ZeroDivisionError):
        workers.submit(lambda: 1 / 0).result(10)


def test_close_ends_the_threads_and_cancels_what_no_thread_took(workers: Workers) -> None:
    gate = threading.Event()
    workers.reserve(1)
    running = workers.submit(gate.wait, 10)
    wait_until(running.running, what="the call to start")
    workers.close()
    gate.set()
    assert running.result(10) is True  # a call in progress finishes
    wait_until(lambda: workers.threads == 0, what="the threads to end")
    assert workers.submit(lambda: "ran").cancelled()


def test_a_deadline_ends_a_request_before_its_timeout() -> None:
    # The calls of one poll share the poll's deadline: a hung node costs one timeout from the
    # start of the pass, however late its call got a thread. The error still names the timeout.
    server = RawServer(lambda conn: conn.stopped.wait(60))
    client = HttpClient(server.url, timeout_s=60, proxies=ProxyConfig())
    errors: list[TimedOut] = []

    def call() -> None:
        try:
            client.request("GET", "/api/ps", deadline=time.monotonic() + 0.2)
        except TimedOut as exc:
            errors.append(exc)

    worker = threading.Thread(target=call)
    try:
        worker.start()
        worker.join(30)  # far under the 60 s timeout: only the deadline can end it this soon
        assert not worker.is_alive()
        assert [str(e) for e in errors] == ["timed out after 60s waiting for the response headers"]
    finally:
        server.close()
        client.close()
        worker.join(60)


def test_a_large_pass_asks_tags_and_version_after_ps_on_one_connection(
    make_node: MakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(observe, "SIDE_BY_SIDE_MAX_CALLS", 0)  # any pass counts as large
    node = make_node("solo", (8192,), (LLAMA32,))
    node.load(LLAMA32, keep_alive=-1)
    config = load_config(write_static_config(tmp_path / "config.yaml", [node], [LLAMA32], tmp_path / "state"))
    state = observe_once(config)
    assert state.nodes[0].up
    assert state.nodes[0].version == node.version
    asked = api_requests(node)
    assert asked[:2] == ["/api/ps", "/api/tags"]  # a dead node is found by its ps alone
    assert sorted(asked) == ["/api/ps", "/api/show", "/api/tags", "/api/version"]
    # ps, tags and version one after another on one kept-alive connection (the show, sent while
    # the version is asked, may need a second).
    assert node.connections_accepted <= 2


def test_a_dead_nodes_exporter_is_not_waited_for(make_node: MakeNode, tmp_path: Path) -> None:
    # The node refuses, its exporter hangs: the pass ends with the node's refusal, not at the
    # exporter's timeout (the exporter of a node that did not answer is no use to anyone).
    node = make_node("gone", (8192,), (LLAMA32,))
    hung = RawServer(_hang)
    try:
        path = write_static_config(
            tmp_path / "config.yaml", [node], [LLAMA32], tmp_path / "state", request_timeout="60s"
        )
        text = path.read_text().replace("vram_mb:\n    - 8192", f"exporter: {hung.url}/metrics")
        path.write_text(text)
        config = load_config(path)
        assert config.nodes[0].gpu.kind == "exporter"
        node.stop()
        result: list[tuple[str, str | None]] = []

        def one_pass() -> None:
            state = observe_once(config).nodes[0]
            result.append((state.status.value, state.gpu.error))

        worker = threading.Thread(target=one_pass)
        worker.start()
        worker.join(30)  # the exporter's own timeout is 60 s
        assert not worker.is_alive()
        # ... and the reading says it was not waited for, not that it "timed out" at once
        assert result == [("down", "GPU source not waited for (node failed)")]
    finally:
        hung.close()


def _hang(conn: Conn) -> None:
    conn.stopped.wait(90)


def test_a_watch_reads_every_kind_of_answer_from_one_thread_or_hands_it_on(
    make_node: MakeNode, tmp_path: Path
) -> None:
    # One node answers whole, one in drips (read by a worker), one restarted (its kept-alive
    # connection is gone: asked again), one hangs (no answer by the deadline): each gets its due.
    whole, drip, restarted, hung = (make_node(f"n{i}", (8192,), (LLAMA32,)) for i in range(4))
    for n in (whole, drip, restarted, hung):
        n.load(LLAMA32, keep_alive=-1)
    nodes = [whole, drip, restarted, hung]
    config = load_config(
        write_static_config(
            tmp_path / "config.yaml", nodes, [LLAMA32], tmp_path / "state", request_timeout="3s"
        )
    )
    observer = observe.Observer(config)
    try:
        first = observer.watch()
        assert all(isinstance(r, tuple) for r in first.values())
        opened = [n.connections_accepted for n in nodes]
        drip.set_fault(Fault.DRIP, rate_bps=4000, paths=("/api/ps",))
        restarted.restart()
        hung.set_fault(Fault.HANG, paths=("/api/ps",))
        seen = observer.watch()
        for n, models in ((whole, [LLAMA32]), (drip, [LLAMA32]), (restarted, [])):  # a restart unloads
            result = seen[n.name]
            assert isinstance(result, tuple), (n.name, result)
            assert [m.name for m in result] == models
        assert isinstance(seen[hung.name], OllamaError)
        assert whole.connections_accepted == opened[0]  # asked again on the same connection
        assert restarted.connections_accepted == opened[2] + 1  # its old one died with the restart
    finally:
        observer.close()


def test_a_one_shot_observation_runs_its_meanwhile_once_while_a_hung_node_is_asked(
    make_node: MakeNode, tmp_path: Path
) -> None:
    # The report imports the planner and the report while the nodes are asked: the hook runs once
    # (not once per wait slice, of which a hung node makes several) and the pass is unchanged.
    node = make_node("gpu-a", (8192,), (LLAMA32,))
    hung = RawServer(_hang)
    try:
        path = write_static_config(
            tmp_path / "config.yaml", [node], [LLAMA32], tmp_path / "state", request_timeout="2s"
        )
        data = yaml.safe_load(path.read_text())
        data["nodes"].append({"url": hung.url, "gpu": {"vram_mb": [8192]}})
        path.write_text(yaml.safe_dump(data))
        config = load_config(path)
        calls: list[str] = []
        state = observe_once(config, meanwhile=lambda: calls.append("meanwhile"))
        assert calls == ["meanwhile"]
        assert [n.status.value for n in state.nodes] == ["up", "down"]
    finally:
        hung.close()


def test_the_report_imports_its_planner_while_the_nodes_are_asked(tmp_path: Path) -> None:
    # In a fresh interpreter: after cli._observe alone, the planner and the report are loaded.
    path = tmp_path / "config.yaml"
    path.write_text(
        f"nodes:\n  - url: http://127.0.0.1:9\n    gpu: {{vram_mb: [8192]}}\nstate_dir: {tmp_path}/s\n"
    )
    code = (
        "import sys\n"
        "from gpu_router import cli\n"
        "from gpu_router.config import load_config\n"
        "assert 'gpu_router.planner' not in sys.modules\n"
        f"cli._observe(load_config({str(path)!r}))\n"
        "assert {'gpu_router.planner', 'gpu_router.report'} <= set(sys.modules), sorted(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_a_large_pass_switches_threads_coarsely_while_it_runs(
    make_node: MakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The emulator answers in this interpreter: its handler sees the interval the pass set.
    monkeypatch.setattr(observe, "COARSE_SWITCH_FROM_CALLS", 2)  # a pass of 3 calls counts as large
    node = make_node("solo", (8192,), (LLAMA32,))
    seen: list[float] = []
    node.on_request("/api/ps", lambda _: seen.append(sys.getswitchinterval()), once=False)
    config = load_config(write_static_config(tmp_path / "config.yaml", [node], [LLAMA32], tmp_path / "state"))
    before = sys.getswitchinterval()
    assert before < observe.COARSE_SWITCH_S
    assert observe_once(config).nodes[0].up
    # (the interpreter keeps the interval in microseconds: compare to the microsecond)
    assert [round(s, 6) for s in seen] == [observe.COARSE_SWITCH_S]
    assert sys.getswitchinterval() == before  # process-wide: put back once the pass is over
    monkeypatch.setattr(observe, "COARSE_SWITCH_FROM_CALLS", 100)  # now a small pass: left alone
    assert observe_once(config).nodes[0].up
    assert [round(s, 6) for s in seen] == [observe.COARSE_SWITCH_S, round(before, 6)]


def test_coarse_switching_puts_the_interval_back_after_a_failure() -> None:
    before = sys.getswitchinterval()
    during: list[float] = []

    def failing_pass() -> None:
        with observe.coarse_switching(observe.COARSE_SWITCH_FROM_CALLS):
            during.append(round(sys.getswitchinterval(), 6))
            raise RuntimeError("a pass that failed")

    with pytest.raises(RuntimeError):
        failing_pass()
    assert during == [observe.COARSE_SWITCH_S]
    assert sys.getswitchinterval() == before
