"""The HTTP API over real sockets on 127.0.0.1, serving snapshots built by the real planner.

/api/v1/status, /api/v1/route, /healthz, /metrics and the page, with and without a token; the page
is also rendered by a real headless Chromium against a snapshot of an emulated cluster.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest
from builders import cluster, config, gib, loaded, needs, node
from obs_helpers import parse_metrics, request, sample

from gpu_router.api import ApiServer
from gpu_router.config import Config, GpuSpec, NodeConfig, PriorityModel
from gpu_router.emulator import EmulatedCluster, EmulatedNode
from gpu_router.observe import observe_once
from gpu_router.planner import plan
from gpu_router.report import build_report
from gpu_router.snapshot import Telemetry
from gpu_router.state import ClusterState, Gpu, GpuReading, NodeStatus, VramSource

LLAMA = "llama3.2:latest"
EMBED = "nomic-embed-text:latest"
QWEN = "qwen2.5:7b"
HUGE = "huge:latest"  # larger than any GPU here
TOKEN = "tok-3f9a1c0e5b7d"
HEADER_SECRET = "hdr-secret-8c1e"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s


def with_util(n, *utils: float):  # type: ignore[no-untyped-def]
    """The node with its GPUs' utilization set (the health fields are faked, see obs_helpers)."""
    gpus = tuple(
        Gpu(g.index, g.name, g.total_bytes, g.used_bytes, g.free_bytes, utilization_ratio=u)
        for g, u in zip(n.gpu.gpus, utils, strict=True)
    )
    return replace(n, gpu=GpuReading(VramSource.NVML, gpus))


def sample_state() -> tuple[ClusterState, Config]:
    busy = with_util(node("busy", (8,), loaded_models=(loaded(LLAMA, 3, pinned=True),)), 0.9)
    idle = with_util(node("idle", (8,), loaded_models=(loaded(LLAMA, 3, pinned=True),)), 0.1)
    spare = node("spare", (8,), installed={EMBED: 0.3, HUGE: 30})
    cpu = node("cpu", None, loaded_models=(loaded(QWEN, 5, 0),))
    down = node("down", (8,), status=NodeStatus.DOWN, error="GET /api/ps: connection refused")
    state = cluster(busy, idle, spare, cpu, down)
    cfg = config(
        PriorityModel(LLAMA, replicas=2),
        EMBED,
        nodes=("busy", "idle", "spare", "cpu", "down"),
    )
    secret_node = replace(
        cfg.nodes[0], headers=MappingProxyType({"Authorization": f"Bearer {HEADER_SECRET}"})
    )
    return state, replace(cfg, nodes=(secret_node, *cfg.nodes[1:]))


@pytest.fixture
def served() -> Iterator[Callable[..., tuple[ApiServer, Telemetry, FakeClock]]]:
    servers: list[ApiServer] = []

    def serve(
        *,
        token: str | None = None,
        publish: bool = True,
        state_config: tuple[ClusterState, Config] | None = None,
    ) -> tuple[ApiServer, Telemetry, FakeClock]:
        state, cfg = state_config or sample_state()
        cfg = replace(cfg, api_token=token, check_interval_s=60, load_timeout_s=30)
        clock = FakeClock()
        t = Telemetry(cfg, clock=clock)
        if publish:
            p = plan(state, cfg, needs=needs(nomic_embed_text__latest=0.5))
            t.reconciled(state, p, reconcile=1, duration_s=0.2, next_in_s=60)
        api = ApiServer(t, "127.0.0.1", 0, token=token, clock=clock)
        api.start()
        servers.append(api)
        return api, t, clock

    yield serve
    for s in servers:
        s.stop()


# --------------------------------------------------------------------------- /api/v1/status


def test_status_is_the_report_contract_plus_daemon_fields(served) -> None:  # type: ignore[no-untyped-def]
    api, t, _ = served()
    r = request(api.port, "/api/v1/status")
    assert r.status == 200
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    snap = t.snapshot
    assert snap.state is not None
    assert snap.plan is not None
    report = build_report(snap.state, snap.plan)
    assert {k: v for k, v in body.items() if k != "daemon"} == report.to_json()
    d = body["daemon"]
    assert d["reconciles"] == 1
    assert d["priority_models"] == 2
    assert d["priority_models_on_gpu"] == 1  # llama on 2 GPU nodes (wanted 2); nomic nowhere yet
    assert {n["node"]: n["state"] for n in d["nodes"]} == {
        "busy": "up",
        "idle": "up",
        "spare": "up",
        "cpu": "up",
        "down": "down",
    }
    for key in ("started_at", "last_reconcile_at", "next_reconcile_at", "actions", "in_flight", "backoffs"):
        assert key in d


def test_no_secret_is_ever_served(served) -> None:  # type: ignore[no-untyped-def]
    api, _, _ = served(token=TOKEN)
    for path in ("/api/v1/status", "/metrics", "/api/v1/route?model=llama3.2", "/", "/healthz"):
        r = request(api.port, path, token=TOKEN)
        assert r.status == 200, path
        assert TOKEN not in r.text, path
        assert HEADER_SECRET not in r.text, path
    # nor by the config's repr, which a log line might carry
    assert TOKEN not in repr(api.telemetry.snapshot.config)


def test_before_the_first_reconcile_status_says_so(served) -> None:  # type: ignore[no-untyped-def]
    api, _, _ = served(publish=False)
    body = request(api.port, "/api/v1/status").json()
    assert body["daemon"]["reconciles"] == 0
    assert body["nodes"] == []
    assert body["daemon"]["priority_models_on_gpu"] == 0
    route = request(api.port, "/api/v1/route?model=llama3.2")
    assert route.status == 503
    assert "first reconcile" in route.json()["error"]


# --------------------------------------------------------------------------- /api/v1/route


def test_route_picks_the_least_loaded_replica_on_gpu(served) -> None:  # type: ignore[no-untyped-def]
    api, _, _ = served()
    r = request(api.port, "/api/v1/route?model=llama3.2")  # a tag-less name means :latest
    assert r.status == 200
    body = r.json()
    assert body["model"] == LLAMA
    assert body["node"] == "idle"
    assert body["url"] == "http://idle:11434"
    assert body["on_gpu"] is True
    assert body["source"] == "on_gpu"
    assert [x["node"] for x in body["replicas"]] == ["idle", "busy"]
    assert [x["utilization_ratio"] for x in body["replicas"]] == [0.1, 0.9]


def test_route_falls_back_to_the_planned_node(served) -> None:  # type: ignore[no-untyped-def]
    api, _, _ = served()
    # qwen runs on the CPU-only node: that is where a request for it goes, and it says so
    cpu = request(api.port, f"/api/v1/route?model={QWEN}").json()
    assert (cpu["node"], cpu["on_gpu"], cpu["placement"], cpu["source"]) == ("cpu", False, "cpu", "planned")
    body = request(api.port, f"/api/v1/route?model={EMBED}").json()
    assert body["node"] == "spare"
    assert body["on_gpu"] is False
    assert body["source"] == "planned"
    assert body["replicas"] == []
    assert "load on spare" in body["reason"]


def test_route_404_says_why(served) -> None:  # type: ignore[no-untyped-def]
    api, _, _ = served()
    unknown = request(api.port, "/api/v1/route?model=no-such-model")
    assert unknown.status == 404
    assert unknown.json() == {
        "model": "no-such-model:latest",
        "error": "not installed on any node that is up",
    }
    nowhere = request(api.port, f"/api/v1/route?model={HUGE}")
    assert nowhere.status == 404
    assert nowhere.json()["error"].startswith("no node to send it to: no node can hold it on GPU")
    assert nowhere.json()["placement"] == "none"
    missing = request(api.port, "/api/v1/route")
    assert missing.status == 400
    assert "model=NAME" in missing.json()["error"]
    two = request(api.port, "/api/v1/route?model=a&model=b")
    assert two.status == 400


# --------------------------------------------------------------------------- token


@pytest.mark.parametrize("path", ["/metrics", "/api/v1/status", "/api/v1/route?model=llama3.2"])
def test_a_token_guards_every_path_but_healthz_and_the_page_shell(served, path: str) -> None:  # type: ignore[no-untyped-def]
    api, _, _ = served(token=TOKEN)
    for token in (None, "wrong", TOKEN + "x", TOKEN[:-1]):
        r = request(api.port, path, token=token)
        assert r.status == 401, (path, token)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "api_token" in r.json()["error"]
    basic = request(api.port, path, headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status == 401
    assert request(api.port, path, token=TOKEN).status == 200
    lower = request(api.port, path, headers={"Authorization": f"bearer {TOKEN}"})
    assert lower.status == 200
    assert request(api.port, "/healthz").status == 200
    assert request(api.port, "/").status == 200  # static, no data: it asks for the token itself


def test_without_a_token_everything_is_open(served) -> None:  # type: ignore[no-untyped-def]
    api, _, _ = served()
    for path in ("/metrics", "/api/v1/status", "/api/v1/route?model=llama3.2", "/healthz", "/"):
        assert request(api.port, path).status == 200, path


# --------------------------------------------------------------------------- /healthz


def test_healthz_turns_503_when_the_last_reconcile_is_too_old(served) -> None:  # type: ignore[no-untyped-def]
    api, _, clock = served()
    ok = request(api.port, "/healthz")
    assert ok.status == 200
    assert ok.json()["ok"] is True
    clock.now_s += 2 * 60 + 30 - 1  # 2 x check_interval + load_timeout, minus a second
    assert request(api.port, "/healthz").status == 200
    clock.now_s += 2
    stale = request(api.port, "/healthz")
    assert stale.status == 503
    assert stale.json()["ok"] is False
    assert "last reconcile finished 151s ago (limit 150s)" in stale.json()["reason"]


def test_healthz_before_any_reconcile_and_with_a_dead_loop(served) -> None:  # type: ignore[no-untyped-def]
    api, t, clock = served(publish=False)
    assert request(api.port, "/healthz").json()["reason"].startswith("starting")
    clock.now_s += 151
    late = request(api.port, "/healthz")
    assert late.status == 503
    assert "no reconcile has finished" in late.json()["reason"]
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    t.loop_thread = dead
    clock.now_s -= 151
    gone = request(api.port, "/healthz")
    assert gone.status == 503
    assert gone.json()["reason"] == "the main loop is not running"


# --------------------------------------------------------------------------- HTTP details


def test_metrics_over_http(served) -> None:  # type: ignore[no-untyped-def]
    api, _, _ = served()
    r = request(api.port, "/metrics")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    s = parse_metrics(r.text)
    assert sample(s, "gpu_router_node_up", node="down") == 0
    assert sample(s, "gpu_router_gpu_utilization_ratio", node="idle", gpu="0") == 0.1
    assert sample(s, "gpu_router_gpu_memory_total_bytes", node="spare", gpu="0") == gib(8)


def test_head_errors_methods_and_limits(served) -> None:  # type: ignore[no-untyped-def]
    api, _, _ = served()
    head = request(api.port, "/api/v1/status", method="HEAD")
    assert head.status == 200
    assert head.body == b""
    assert int(head.headers["content-length"]) > 100
    missing = request(api.port, "/etc/passwd")
    assert missing.status == 404
    assert missing.json()["error"] == "no such path: /etc/passwd"
    assert request(api.port, "/static/").status == 404  # no directory listing
    put = request(api.port, "/api/v1/status", method="PUT")
    assert put.status == 405
    assert "GET" in put.headers["allow"]
    big = request(api.port, "/api/v1/optimize", method="POST", body=b"x" * 5000)
    assert big.status == 413
    # this server has no daemon behind it to reconcile
    assert request(api.port, "/api/v1/optimize", method="POST").status == 404
    assert request(api.port, "/api/v1/optimize").status == 405


def test_one_connection_serves_many_requests(served) -> None:  # type: ignore[no-untyped-def]
    api, _, _ = served()
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    try:
        for _ in range(3):
            conn.request("GET", "/api/v1/route?model=llama3.2")
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.read()
            assert not resp.will_close
    finally:
        conn.close()


def test_the_page_is_self_contained(served) -> None:  # type: ignore[no-untyped-def]
    api, _, _ = served()
    r = request(api.port, "/")
    assert r.status == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    assert "/api/v1/status" in html
    for external in ('src="http', 'href="http', "@import", "url(http", "//cdn", "fonts.googleapis"):
        assert external not in html
    assert "innerHTML" not in html  # names from the cluster go in as text only


def test_stop_closes_the_port(served) -> None:  # type: ignore[no-untyped-def]
    api, _, _ = served()
    port = api.port
    api.stop()
    with pytest.raises(ConnectionRefusedError):
        request(port, "/healthz", timeout_s=2)


# --------------------------------------------------------------------------- the page in a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def emulated_snapshot() -> Iterator[tuple[ClusterState, Config]]:
    """The real observer and planner over three emulated nodes: one with two GPUs, one down."""
    nodes = [
        EmulatedNode("gpu-big", (24576, 24576), (LLAMA, EMBED, "qwen2.5:14b"), metrics=True),
        EmulatedNode("gpu-small", (4096,), (EMBED, "llama3.1:8b"), metrics=True),
        EmulatedNode("gpu-gone", (8192,), (LLAMA,), metrics=True),
    ]
    with EmulatedCluster(nodes) as c:
        c["gpu-big"].load(LLAMA, keep_alive=-1)
        c["gpu-big"].load("qwen2.5:14b", keep_alive="10m")
        c["gpu-big"].set_other_usage_mib(1, 2048)
        c["gpu-small"].load("llama3.1:8b", keep_alive="30m")
        c["gpu-gone"].stop()
        cfg = Config(
            nodes=tuple(NodeConfig(n.name, n.url, GpuSpec("exporter", n.metrics_url)) for n in c),
            priority_models=(PriorityModel(LLAMA), PriorityModel(EMBED)),
            request_timeout_s=2.0,
            state_dir="/nonexistent",
        )
        state = observe_once(cfg)
        yield state, cfg


def chromium(*args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_page_renders_the_cluster_in_a_real_browser(served, emulated_snapshot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    api, t, _ = served(token=TOKEN, state_config=emulated_snapshot)
    url = f"http://127.0.0.1:{api.port}/#token={TOKEN}"
    dom = chromium("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for name in ("gpu-big", "gpu-small", "gpu-gone"):
        assert f'data-node="{name}"' in html, name
    for gpu in ("gpu-big/0", "gpu-big/1", "gpu-small/0"):
        assert f'data-gpu="{gpu}"' in html, gpu
    assert f'data-model="{LLAMA}"' in html  # a segment of a GPU bar
    assert 'data-model="qwen2.5:14b"' in html
    assert "llama3.1:8b" in html  # partly offloaded on gpu-small, listed as on CPU too
    assert "PRIORITY" in html
    assert "connection refused" in html or "refused" in html  # the down node says why
    assert 'id="conn" class="">updated ' in html  # it fetched /api/v1/status with the token
    # without the token the page explains how to give it
    bare = chromium("--dump-dom", f"http://127.0.0.1:{api.port}/")
    assert "#token=" in bare.stdout
    assert 'id="conn" class="bad">unauthorized' in bare.stdout
    assert 'data-node="gpu-big"' not in bare.stdout

    shot = Path(os.environ.get("GPU_ROUTER_SCREENSHOT", tmp_path / "status-page.png"))
    taken = chromium(f"--screenshot={shot}", "--window-size=1280,860", url)
    assert taken.returncode == 0, taken.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # a rendered page, not a blank one
    assert t.snapshot.state is not None


def test_connections_are_bounded_and_a_freed_slot_is_reused() -> None:
    state, cfg = sample_state()
    t = Telemetry(cfg)
    t.reconciled(state, plan(state, cfg), reconcile=1, duration_s=0.1, next_in_s=60)
    api = ApiServer(t, "127.0.0.1", 0, max_connections=2)
    api.start()
    idle = [socket.create_connection(("127.0.0.1", api.port), timeout=10) for _ in range(2)]
    try:
        # both slots are held by connections that send nothing: the next one is closed unanswered
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            request(api.port, "/healthz", timeout_s=10)
    finally:
        for s in idle:
            s.close()
    # once they are gone the server answers again (their threads notice the close and leave)
    deadline = time.monotonic() + 15
    while True:
        try:
            assert request(api.port, "/healthz").status == 200
            break
        except (http.client.RemoteDisconnected, ConnectionResetError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    api.stop()


def test_status_between_a_reload_and_the_next_reconcile(served) -> None:  # type: ignore[no-untyped-def]
    api, t, _ = served()
    _, cfg = sample_state()
    t.reloaded(replace(cfg, nodes=cfg.nodes[:2]))
    r = request(api.port, "/api/v1/status")
    assert r.status == 200
    body = r.json()
    assert body["nodes"] == []  # the old plan is dropped until the reconcile that follows a reload
    assert [n["node"] for n in body["daemon"]["nodes"]] == ["busy", "idle"]
    s = parse_metrics(request(api.port, "/metrics").text)
    assert sample(s, "gpu_router_node_up", node="busy") == 1
    assert sample(s, "gpu_router_node_up", node="spare") is None


def test_a_bug_answers_500_and_is_logged_not_printed(
    served,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:  # type: ignore[no-untyped-def]
    api, _, _ = served()

    def broken(self: object, now: object = None) -> dict[str, object]:
        raise RuntimeError("a bug")

    monkeypatch.setattr("gpu_router.snapshot.DaemonSnapshot.status_json", broken)
    r = request(api.port, "/api/v1/status")
    assert r.status == 500
    assert r.json() == {"error": "internal error; the daemon's log has the details"}
    assert "a bug" not in r.text
    assert request(api.port, "/healthz").status == 200  # the server goes on
    assert any("GET /api/v1/status failed" in rec.getMessage() for rec in caplog.records)
    assert "Traceback" not in capfd.readouterr().err
