"""How many requests gpu-router sends, counted in the emulated nodes' request logs.

Asking less is a feature (issue "Fast at every scale"): an idle reconcile asks one ``/api/ps`` per
node; ``/api/tags`` only when ``/api/ps`` moved, after an action, or every ``TAGS_EVERY``
observations; ``/api/version`` once; ``/api/show`` once per digest, ever (the state directory keeps
it across runs). A one-node report with an empty cache is 4 requests in 2 round trips. Nothing here
times anything: the round trips are proved with hooks that hold a request until the others arrive.
"""

from __future__ import annotations

import io
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_helpers import MakeNode, write_config

from gpu_router.cli import main
from gpu_router.config import load_config
from gpu_router.daemon import Daemon
from gpu_router.emulator import EmulatedNode
from gpu_router.observe import TAGS_EVERY
from gpu_router.systemd import Notifier

LLAMA32 = "llama3.2:latest"
EMBED = "nomic-embed-text:latest"
HOLD_S = 4.0  # how long a hook holds a request for the others; only reached when the client is wrong


def api_requests(node: EmulatedNode) -> list[str]:
    """The Ollama API paths the node received, in order (its exporter's /metrics left out)."""
    return [r.path for r in node.requests if r.path.startswith("/api/")]


def static_gpu(node: EmulatedNode) -> dict[str, Any]:
    return {"name": node.name, "url": node.url, "gpu": {"vram_mb": list(node.gpus_mib)}}


def write_static_config(
    path: Path, nodes: list[EmulatedNode], priority: list[str], state_dir: Path, **settings: Any
) -> Path:
    """A config whose GPU figures are static, so the nodes' logs hold only what Ollama was asked."""
    write_config(path, nodes, priority, state_dir, **settings)
    data = yaml.safe_load(path.read_text())
    data["nodes"] = [static_gpu(n) for n in nodes]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def idle_cluster(make_node: MakeNode) -> list[EmulatedNode]:
    """Three nodes with both priority models already pinned on GPU: every reconcile is idle."""
    nodes = [make_node(f"n{i}", (8192,), (LLAMA32, EMBED, "all-minilm")) for i in range(3)]
    for n in nodes:
        n.load(LLAMA32, keep_alive=-1)
        n.load(EMBED, keep_alive=-1)
    return nodes


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[[list[EmulatedNode], list[str]], Daemon]]:
    daemons: list[Daemon] = []

    def make(nodes: list[EmulatedNode], priority: list[str]) -> Daemon:
        path = write_static_config(tmp_path / "config.yaml", nodes, priority, tmp_path / "state")
        daemon = Daemon(load_config(path), notifier=Notifier(environ={}))
        daemons.append(daemon)
        return daemon

    yield make
    for d in daemons:
        d.observer.close()
        d.links.close()


def test_an_idle_reconcile_asks_one_ps_per_node(idle_cluster: list[EmulatedNode], make_daemon: Any) -> None:
    daemon = make_daemon(idle_cluster, [LLAMA32, EMBED])
    first = daemon.reconcile()
    assert first.actions == ()
    shows = 0
    for n in idle_cluster:
        # The first reconcile learns everything: ps, tags and version of each node, and each
        # model's show once in the whole cluster (the three nodes hold the same three digests).
        asked = Counter(api_requests(n))
        shows += asked.pop("/api/show", 0)
        assert asked == {"/api/ps": 1, "/api/tags": 1, "/api/version": 1}
        n.clear_requests()
    assert shows == 3
    opened = [n.connections_accepted for n in idle_cluster]
    idle = TAGS_EVERY - 1  # observations 2 .. TAGS_EVERY ask /api/ps alone
    for _ in range(idle):
        assert daemon.reconcile().actions == ()
    for n in idle_cluster:
        assert api_requests(n) == ["/api/ps"] * idle
        n.clear_requests()
    daemon.reconcile()  # the (TAGS_EVERY + 1)-th observation looks at the disks again
    for n in idle_cluster:
        assert sorted(api_requests(n)) == ["/api/ps", "/api/tags"]
    # Kept-alive connections: the idle reconciles reused those the first one opened.
    assert [n.connections_accepted for n in idle_cluster] == opened


def test_a_watch_asks_only_ps(idle_cluster: list[EmulatedNode], make_daemon: Any) -> None:
    daemon = make_daemon(idle_cluster, [LLAMA32, EMBED])
    daemon.reconcile()
    for n in idle_cluster:
        n.clear_requests()
    opened = [n.connections_accepted for n in idle_cluster]
    for _ in range(3):
        assert daemon.watch() is False
    for n in idle_cluster:
        assert api_requests(n) == ["/api/ps"] * 3
    assert [n.connections_accepted for n in idle_cluster] == opened  # on the kept-alive connections


def test_tags_are_asked_again_where_ps_moved_or_the_daemon_acted(
    idle_cluster: list[EmulatedNode], make_daemon: Any
) -> None:
    a, b, c = idle_cluster
    daemon = make_daemon(idle_cluster, [LLAMA32, EMBED])
    daemon.reconcile()
    for n in idle_cluster:
        n.clear_requests()
    a.client_request("all-minilm")  # a client loads a model on a: its /api/ps changes
    daemon.observer.refresh_tags({"n2"})  # what the daemon does after acting on c
    daemon.reconcile()
    assert sorted(api_requests(a)) == ["/api/ps", "/api/tags"]
    assert api_requests(b) == ["/api/ps"]
    assert sorted(api_requests(c)) == ["/api/ps", "/api/tags"]
    for n in idle_cluster:
        n.clear_requests()
    daemon.reconcile()  # nothing moved since: ps alone again
    for n in idle_cluster:
        assert api_requests(n) == ["/api/ps"]


def report(config: Path) -> dict[str, Any]:
    out = io.StringIO()
    assert main(["--config", str(config), "--report-only", "--json"], out=out) == 0
    data: dict[str, Any] = json.loads(out.getvalue())
    return data


def test_a_one_node_report_is_four_requests_in_two_round_trips(make_node: MakeNode, tmp_path: Path) -> None:
    node = make_node("solo", (8192,), (LLAMA32,))
    node.load(LLAMA32, keep_alive=-1)
    # A timeout well above the holds: a hold that runs out fails the test, not the poll.
    config = write_static_config(
        tmp_path / "config.yaml", [node], [LLAMA32], tmp_path / "state", request_timeout="20s"
    )
    # Round 1: ps, tags and version are in flight together (each is held until all three have
    # arrived). Round 2: the show goes out as soon as the tags are back, while ps is still held.
    first_round = threading.Barrier(3, timeout=HOLD_S)
    show_arrived = threading.Event()
    seen: dict[str, bool] = {}

    def together(path: str) -> Callable[[EmulatedNode], None]:
        def hook(_: EmulatedNode) -> None:
            try:
                first_round.wait()
                seen[path] = True
            except threading.BrokenBarrierError:
                seen[path] = False
            if path == "/api/ps":
                seen["show before ps answered"] = show_arrived.wait(HOLD_S)

        return hook

    for path in ("/api/ps", "/api/tags", "/api/version"):
        node.on_request(path, together(path))
    node.on_request("/api/show", lambda _: show_arrived.set())

    data = report(config)
    assert data["nodes"][0]["status"] == "up"
    assert sorted(api_requests(node)) == ["/api/ps", "/api/show", "/api/tags", "/api/version"]
    assert seen == {
        "/api/ps": True,
        "/api/tags": True,
        "/api/version": True,
        "show before ps answered": True,
    }


def test_a_repeat_report_asks_no_show(make_node: MakeNode, tmp_path: Path) -> None:
    # Models whose /api/show has tensors, a vision encoder and a projector: the whole record
    # must come back from the state directory, or every report asks again.
    models = (LLAMA32, EMBED, "qwen2.5vl:7b", "gemma3n:e4b")
    node = make_node("solo", (24576,), models)
    config = write_static_config(tmp_path / "config.yaml", [node], [LLAMA32], tmp_path / "state")
    first = report(config)
    assert Counter(api_requests(node))["/api/show"] == len(models)
    node.clear_requests()
    again = report(config)
    assert sorted(api_requests(node)) == ["/api/ps", "/api/tags", "/api/version"]
    # And the cached metadata sizes every model exactly as the fresh answers did.
    assert [(m["model"], m["need_bytes"], m["size_source"]) for m in again["models"]] == [
        (m["model"], m["need_bytes"], m["size_source"]) for m in first["models"]
    ]
