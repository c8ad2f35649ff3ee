"""The daemon pulls a missing priority model where it would fit, then places it; pull faults back off.

In-process daemons against emulated nodes over real HTTP on 127.0.0.1; the watchdog is measured on
a real AF_UNIX NOTIFY_SOCKET (``NotifyListener``).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import (
    WAIT_S,
    FakeClock,
    MakeDaemon,
    MakeNode,
    NotifyListener,
    pinned_on_gpu,
    wait_until,
    write_config,
)

from gpu_router.cli import _print_optimized, daemon_tables, main
from gpu_router.daemon import Daemon
from gpu_router.emulator import CATALOGUE, EmulatedNode, Fault
from gpu_router.metrics import Scraper
from gpu_router.systemd import Notifier

LLAMA32 = "llama3.2:latest"  # 1.9 GiB on disk, 3.1 GiB on GPU
GEMMA = "gemma2:2b"
PULL_S = 1.5  # how long an emulated pull of LLAMA32 takes in these tests


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    sock = NotifyListener()
    yield sock
    sock.close()


@pytest.fixture
def make_daemon(make_daemon: MakeDaemon) -> MakeDaemon:
    """conftest's daemon maker, with ``pull_missing`` on unless a test says otherwise."""

    def make(nodes: list[EmulatedNode], priority: list[Any], **settings: Any) -> Daemon:
        settings.setdefault("pull_missing", True)
        return make_daemon(nodes, priority, **settings)

    return make


def watchdog_notifier(listener: NotifyListener) -> Notifier:
    """A notifier sending to ``listener`` with a 0.4 s watchdog (pings due every 0.2 s)."""
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())}
    return Notifier(environ=env)


def run_in_thread(daemon: Daemon) -> tuple[threading.Thread, list[int]]:
    codes: list[int] = []
    loop = threading.Thread(target=lambda: codes.append(daemon.run()), name="daemon-loop", daemon=True)
    loop.start()
    return loop, codes


def stop(daemon: Daemon, loop: threading.Thread) -> None:
    daemon.request_stop()
    loop.join(WAIT_S)
    assert not loop.is_alive(), "the daemon loop did not stop"


def pull_requests(node: EmulatedNode, model: str | None = None) -> list[dict[str, Any]]:
    return [
        r.body or {}
        for r in node.mutating_requests()
        if r.path == "/api/pull" and (model is None or (r.body or {}).get("model") == model)
    ]


def settle(daemon: Daemon) -> None:
    """One reconcile, then wait for what it started (loads and pulls) and take in the results."""
    daemon.reconcile()
    assert daemon.executor.wait_idle(WAIT_S), "actions still in flight"
    assert daemon.pulls.wait_idle(WAIT_S), "pulls still in flight"
    daemon.collect_results()


# --------------------------------------------------------------------------- a new node joins


def test_a_node_that_joins_without_the_model_gets_it_pulled_then_pinned(
    make_node: MakeNode,
    make_daemon: MakeDaemon,
    tmp_path: Path,
    listener: NotifyListener,
    caplog: pytest.LogCaptureFixture,
) -> None:
    size = CATALOGUE[LLAMA32].file_size_bytes
    a = make_node("gpu-a", models=(LLAMA32,))
    b = make_node("gpu-b", models=(), pull_speed_bps=size / PULL_S)  # the new box: an empty disk
    priority = [{"name": LLAMA32, "replicas": "all"}]  # one on every GPU node, new ones too
    settings = {"watch_interval": "0.2s", "check_interval": "300s"}
    daemon = make_daemon([a], priority, notifier=watchdog_notifier(listener), **settings)
    caplog.set_level(logging.INFO, logger="gpu_router")
    loop, codes = run_in_thread(daemon)
    try:
        wait_until(lambda: pinned_on_gpu(a, LLAMA32), what="the first replica on gpu-a")
        assert pull_requests(a) == []  # installed there: nothing to pull

        # gpu-b joins the cluster: the operator adds it to the config and reloads.
        write_config(
            tmp_path / "config.yaml", [a, b], priority, tmp_path / "state", pull_missing=True, **settings
        )
        daemon.request_reload()

        wait_until(lambda: daemon.pulls.in_flight(), what="the pull to gpu-b")
        status = daemon.telemetry.snapshot.daemon_json()
        [pull] = status["pulls"]
        assert (pull["node"], pull["model"]) == ("gpu-b", LLAMA32)
        assert pull["reason"] == "1 of 2 replicas placed: not installed where it would fit"
        metrics = Scraper(daemon.telemetry).scrape().decode()
        assert "gpu_router_pulls_in_flight 1.0" in metrics
        wait_until(
            lambda: any(p.total_bytes and p.completed_bytes for p in daemon.pulls.in_flight()),
            what="progress on the pull",
        )
        tables = daemon_tables(daemon.telemetry.snapshot.daemon_json())
        pulls_table = next(t for t in tables if t.title == "Pulls in flight")
        node, model, progress = pulls_table.rows[0][:3]
        assert (node, model) == ("gpu-b", LLAMA32)
        assert re.fullmatch(r"pulling \d{1,2}% of 1\.9 GiB", progress), progress

        # Pulled, then placed by the reconcile that follows, and pinned there.
        wait_until(lambda: pinned_on_gpu(b, LLAMA32), what="the model pulled to and pinned on gpu-b")
        assert [r.path for r in b.mutating_requests()] == ["/api/pull", "/api/generate"]
        assert [r.body for r in b.mutating_requests()][1] == {"model": LLAMA32, "keep_alive": -1}
        assert pinned_on_gpu(a, LLAMA32)
        wait_until(lambda: not daemon.telemetry.snapshot.daemon_json()["pulls"], what="no pull in flight")
        assert "gpu_router_pulls_in_flight 0.0" in Scraper(daemon.telemetry).scrape().decode()
        done = [a for a in daemon.telemetry.snapshot.daemon_json()["actions"] if a["action"] == "pull"]
        assert [(d["node"], d["result"], d["detail"]) for d in done] == [("gpu-b", "ok", "pulled 1.9 GiB")]
    finally:
        stop(daemon, loop)
    assert codes == [0]
    text = caplog.text
    assert f"pull {LLAMA32} on gpu-b: 1 of 2 replicas placed: not installed where it would fit" in text
    assert f"action pull node=gpu-b model={LLAMA32} result=ok" in text
    assert f"load {LLAMA32} on gpu-b: add a replica" in text
    assert "Traceback" not in text


def test_the_only_node_with_the_model_goes_down_and_another_gets_it(
    make_node: MakeNode, make_daemon: MakeDaemon
) -> None:
    a = make_node("gpu-a", models=(LLAMA32,))
    b = make_node("gpu-b", (8192,), ())
    c = make_node("gpu-c", (4096,), ())
    daemon = make_daemon([a, b, c], [LLAMA32], request_timeout="1s", down_after=1)
    settle(daemon)
    assert pinned_on_gpu(a, LLAMA32)
    assert pull_requests(b) == pull_requests(c) == []

    a.set_fault(Fault.REFUSE)
    settle(daemon)  # a is down: no node that is up has the model, nor its size
    assert pull_requests(b, LLAMA32) == [{"model": LLAMA32}]  # the node with the most usable VRAM
    assert pull_requests(c) == []
    settle(daemon)  # b has it now: sized and placed
    assert pinned_on_gpu(b, LLAMA32)
    assert pull_requests(b, LLAMA32) == [{"model": LLAMA32}]


# --------------------------------------------------------------------------- faults


def test_a_stalled_pull_never_blocks_the_loop_or_the_nodes_loads(
    make_node: MakeNode,
    make_daemon: MakeDaemon,
    listener: NotifyListener,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = make_node("gpu-a", models=(LLAMA32,))
    b = make_node("gpu-b", models=(GEMMA,))
    b.set_fault(Fault.PULL_STALL)  # the pull stops half-way and the connection stays open
    daemon = make_daemon(
        [a, b],
        [{"name": LLAMA32, "replicas": 2}, GEMMA],
        notifier=watchdog_notifier(listener),
        watch_interval="0.2s",
        pull_timeout="2s",
    )
    caplog.set_level(logging.INFO, logger="gpu_router")
    loop, codes = run_in_thread(daemon)
    try:
        wait_until(lambda: daemon.pulls.pulling() == {(LLAMA32, "gpu-b")}, what="the pull to gpu-b")
        # The pull holds no lock on its node: the other priority model is loaded there meanwhile.
        wait_until(lambda: pinned_on_gpu(b, GEMMA), what="gemma2 loaded on gpu-b during the pull")
        mark = len(listener.messages)
        for i in range(5):  # the main loop keeps feeding the watchdog while the pull is stuck
            mark = (
                listener.wait_for(lambda m: m.fields.get("WATCHDOG") == "1", after=mark, what=f"ping {i}") + 1
            )
        assert daemon.pulls.pulling() == {(LLAMA32, "gpu-b")}, "the pull ended: the window proves nothing"

        # pull_timeout ends it; it backs off like a failed load.
        wait_until(
            lambda: any(b_[:2] == (LLAMA32, "gpu-b") for b_ in daemon.backoff.entries()), what="backoff"
        )
        wait_until(lambda: daemon.telemetry.snapshot.backoffs, what="the backoff published")
        mark = len(listener.messages)
        listener.wait_for(
            lambda m: m.fields.get("WATCHDOG") == "1", after=mark, what="a ping after the failure"
        )
    finally:
        b.clear_fault()
        stop(daemon, loop)
    assert codes == [0]
    assert len(pull_requests(b, LLAMA32)) == 1  # not retried during the backoff
    text = caplog.text
    assert f"action pull node=gpu-b model={LLAMA32} result=failed" in text
    assert "POST /api/pull: timed out after 2s reading the stream" in text
    assert f"not trying {LLAMA32} on gpu-b again for 30s" in text


def test_stop_abandons_a_pull_in_flight_without_waiting(
    make_node: MakeNode, make_daemon: MakeDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    a = make_node("gpu-a", models=(LLAMA32,))
    b = make_node("gpu-b", models=())
    b.set_fault(Fault.PULL_STALL)
    daemon = make_daemon([a, b], [{"name": LLAMA32, "replicas": 2}], watch_interval="0.2s")  # 1 h timeout
    caplog.set_level(logging.INFO, logger="gpu_router")
    loop, codes = run_in_thread(daemon)
    try:
        wait_until(lambda: daemon.pulls.pulling(), what="the pull to gpu-b")
    finally:
        stop(daemon, loop)  # well inside WAIT_S: the stall would otherwise hold it for an hour
        b.clear_fault()
    assert codes == [0]
    assert daemon.pulls.in_flight() == ()
    assert f"abandoning pulls in flight: {LLAMA32} on gpu-b" in caplog.text
    assert daemon.backoff.entries() == []  # a stop is not the node's fault


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Fault.PULL_ERROR, "max retries exceeded: unexpected EOF"),
        (Fault.PULL_NO_SPACE, "-partial: no space left on device"),
    ],
)
def test_a_failed_pull_backs_off_like_a_failed_load(
    make_node: MakeNode,
    make_daemon: MakeDaemon,
    caplog: pytest.LogCaptureFixture,
    fault: Fault,
    message: str,
) -> None:
    clock = FakeClock()
    a = make_node("gpu-a", models=(LLAMA32,))
    b = make_node("gpu-b", models=())
    b.set_fault(fault)
    daemon = make_daemon([a, b], [{"name": LLAMA32, "replicas": 2}], clock=clock)
    caplog.set_level(logging.INFO, logger="gpu_router")

    settle(daemon)
    settle(daemon)  # the pull failed in the first cycle; the second waits
    assert len(pull_requests(b, LLAMA32)) == 1
    [(model, node, failures, _)] = daemon.backoff.entries()
    assert (model, node, failures) == (LLAMA32, "gpu-b", 1)
    assert f"action pull node=gpu-b model={LLAMA32} result=failed" in caplog.text
    assert message in caplog.text
    assert f"not trying {LLAMA32} on gpu-b again for 30s" in caplog.text
    failed = [x for x in daemon.telemetry.snapshot.daemon_json()["actions"] if x["action"] == "pull"]
    assert [(x["result"], message in x["detail"]) for x in failed] == [("failed", True)]
    report = daemon.telemetry.snapshot.status_json()
    fit = next(f for f in report["models"][0]["fits"] if f["node"] == "gpu-b")
    assert fit["verdict"] == "not_installed"  # no "would pull" while it waits

    clock.advance(31)  # the backoff is over; the next pull fails again and waits twice as long
    settle(daemon)
    assert len(pull_requests(b, LLAMA32)) == 2
    assert f"not trying {LLAMA32} on gpu-b again for 60s" in caplog.text

    b.clear_fault()
    clock.advance(61)
    settle(daemon)  # pulled
    settle(daemon)  # placed
    assert pinned_on_gpu(b, LLAMA32)
    assert daemon.backoff.entries() == []


# --------------------------------------------------------------------------- would pull


@pytest.mark.parametrize(
    ("dry_run", "settings", "why"),
    [(True, {}, "dry run"), (False, {"auto_optimize": False}, "auto_optimize is off")],
)
def test_dry_run_and_monitor_only_say_would_pull_and_never_pull(
    make_node: MakeNode,
    make_daemon: MakeDaemon,
    caplog: pytest.LogCaptureFixture,
    dry_run: bool,
    settings: dict[str, Any],
    why: str,
) -> None:
    a = make_node("gpu-a", models=(LLAMA32,))
    a.load(LLAMA32, keep_alive=-1)
    b = make_node("gpu-b", models=())
    daemon = make_daemon([a, b], [{"name": LLAMA32, "replicas": 2}], dry_run=dry_run, **settings)
    caplog.set_level(logging.INFO, logger="gpu_router")
    settle(daemon)
    settle(daemon)
    assert b.mutating_requests() == []
    assert daemon.pulls.in_flight() == ()
    assert (
        f"would pull {LLAMA32} on gpu-b ({why}): 1 of 2 replicas placed: not installed where it would fit"
        in caplog.text
    )


def test_a_cloud_priority_model_is_never_pulled(make_node: MakeNode, make_daemon: MakeDaemon) -> None:
    a = make_node("gpu-a", models=(LLAMA32,), version="0.12.6")
    daemon = make_daemon([a], [LLAMA32, "gpt-oss:20b-cloud"])
    settle(daemon)
    settle(daemon)
    assert pull_requests(a) == []
    assert pinned_on_gpu(a, LLAMA32)


# --------------------------------------------------------------------------- the report


def test_the_report_says_would_pull_and_sends_nothing(make_node: MakeNode, tmp_path: Path) -> None:
    a = make_node("gpu-a", models=(LLAMA32,))
    a.load(LLAMA32, keep_alive=-1)
    b = make_node("gpu-b", models=())
    config = write_config(
        tmp_path / "config.yaml",
        [a, b],
        [{"name": LLAMA32, "replicas": 2, "pull": True}],
        tmp_path / "state",
    )
    out = io.StringIO()
    assert main(["--config", str(config), "--report-only", "--json"], out=out) == 0
    data = json.loads(out.getvalue())
    assert data["actions"] == [
        {
            "action": "pull",
            "node": "gpu-b",
            "model": LLAMA32,
            "reason": "1 of 2 replicas placed: not installed where it would fit",
            "endpoint": "/api/pull",
        }
    ]
    [model] = data["models"]
    fits = {f["node"]: (f["verdict"], f["reason"]) for f in model["fits"]}
    verdict, reason = fits["gpu-b"]
    assert verdict == "pull"
    assert re.fullmatch(
        r"not installed; would pull it here: it needs \d\.\d GiB and would fit on GPU 0", reason
    )
    assert model["decision"]["reason"].endswith("; would pull it to gpu-b")

    text = io.StringIO()
    assert main(["--config", str(config), "--report-only"], out=text) == 0
    lines = text.getvalue().splitlines()
    header = next(line for line in lines if line.startswith("MODEL "))
    row = next(line for line in lines if line.startswith(LLAMA32))
    assert row[header.index("gpu-b") :].startswith("would pull")
    assert any(line.split()[:4] == ["gpu-b", "pull", LLAMA32, "/api/pull"] for line in lines)
    assert a.mutating_requests() == []  # the test's own load went through the emulator's API, not HTTP
    assert b.mutating_requests() == []


# --------------------------------------------------------------------------- --once, reload, optimize


def test_once_sees_its_pull_through(make_node: MakeNode, make_daemon: MakeDaemon) -> None:
    a = make_node("gpu-a", models=(LLAMA32,))
    a.load(LLAMA32, keep_alive=-1)
    b = make_node("gpu-b", models=(), pull_speed_bps=CATALOGUE[LLAMA32].file_size_bytes / 0.5)
    daemon = make_daemon([a, b], [{"name": LLAMA32, "replicas": 2}])
    assert daemon.run(once=True) == 0
    assert pull_requests(b, LLAMA32) == [{"model": LLAMA32}]
    assert LLAMA32 in {s.name for s in b.installed()}  # pulled; the next cycle would place it
    done = [x for x in daemon.telemetry.snapshot.daemon_json()["actions"] if x["action"] == "pull"]
    assert [x["result"] for x in done] == ["ok"]


def test_a_reload_that_drops_the_node_abandons_its_pull(
    make_node: MakeNode, make_daemon: MakeDaemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = make_node("gpu-a", models=(LLAMA32,))
    b = make_node("gpu-b", models=())
    b.set_fault(Fault.PULL_STALL)
    priority = [{"name": LLAMA32, "replicas": "all"}]
    daemon = make_daemon([a, b], priority, watch_interval="0.2s")
    caplog.set_level(logging.INFO, logger="gpu_router")
    loop, codes = run_in_thread(daemon)
    try:
        wait_until(lambda: daemon.pulls.pulling() == {(LLAMA32, "gpu-b")}, what="the pull to gpu-b")
        write_config(tmp_path / "config.yaml", [a], priority, tmp_path / "state", pull_missing=True)
        daemon.request_reload()
        wait_until(lambda: not daemon.pulls.pulling(), what="the pull abandoned")
        wait_until(lambda: pinned_on_gpu(a, LLAMA32), what="the model on gpu-a")
    finally:
        b.clear_fault()
        stop(daemon, loop)
    assert codes == [0]
    assert f"abandoning pulls to nodes no longer configured: {LLAMA32} on gpu-b" in caplog.text
    assert daemon.backoff.entries() == []
    pulls = [x for x in daemon.telemetry.snapshot.daemon_json()["actions"] if x["action"] == "pull"]
    assert [x["result"] for x in pulls] == ["abandoned"]
    assert daemon.telemetry.snapshot.in_flight == ()
    assert daemon.telemetry.actions.value("gpu-b", LLAMA32, "pull", "failed") == 0  # not the node's fault


def test_optimize_counts_a_pull_in_the_background_as_no_failure() -> None:
    body = {
        "done": True,
        "reconcile": 4,
        "error": None,
        "summary": "",
        "planned": [],
        "actions": [
            {
                "action": "load",
                "node": "a",
                "model": "x",
                "reason": "r",
                "result": "ok",
                "detail": "",
                "duration_s": 1.0,
            },
            {
                "action": "pull",
                "node": "b",
                "model": "y",
                "reason": "r",
                "result": "in_flight",
                "detail": "",
                "duration_s": None,
            },
        ],
    }
    out = io.StringIO()
    args = argparse.Namespace(json=False)
    assert _print_optimized(body, args, out, by="the daemon") == 0
    assert "reconcile #4 by the daemon: 1/1 actions ok, 1 pull in the background" in out.getvalue()
    body["actions"][0]["result"] = "failed"
    assert _print_optimized(body, args, io.StringIO(), by="the daemon") == 1
