"""The daemon's window, end to end: a running daemon (in process, and as a real process) against
emulated nodes on 127.0.0.1, scraped and asked over HTTP; ``status``, ``optimize`` and
``--report-only --textfile`` from the command line.
"""

from __future__ import annotations

import dataclasses
import io
import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import (
    REPO_ROOT,
    MakeNode,
    daemon_env,
    fully_on_gpu,
    kill,
    load_requests,
    pinned_on_gpu,
    ps_entry,
    run_cli,
    wait_until,
    write_config,
)
from obs_helpers import parse_metrics, request, sample

from gpu_router.cli import EX_NO_DAEMON, build_parser, cmd_optimize, cmd_status
from gpu_router.config import Config, load_config
from gpu_router.daemon import Daemon
from gpu_router.emulator import EmulatedNode, Fault
from gpu_router.systemd import Notifier

LLAMA = "llama3.2:latest"
EMBED = "nomic-embed-text:latest"
GEMMA = "gemma2:2b"
TOKEN = "obs-token-51d2-7f0e9a3c"  # api_token wants at least 16 characters


def exported_total(node: EmulatedNode, gpu: int) -> int:
    """A GPU's total as its dcgm-exporter endpoint gives it: free + used + reserved, each in whole MiB."""
    g = node.gpu_state()[gpu]
    mib = 2**20
    return sum(g[k] // mib for k in ("free_bytes", "used_bytes", "reserved_bytes")) * mib


def free_port() -> int:
    """A port nothing listens on now (the daemon binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_for(
    tmp_path: Path,
    nodes: list[EmulatedNode],
    priority: list[Any],
    *,
    token: str | None = None,
    **settings: Any,
) -> Config:
    if token is not None:
        settings["api_token"] = token
    path = write_config(
        tmp_path / "config.yaml",
        nodes,
        priority,
        tmp_path / "state",
        listen=f"127.0.0.1:{free_port()}",
        **settings,
    )
    return load_config(path)


@pytest.fixture
def running() -> Iterator[Callable[[Config], Daemon]]:
    """Run daemons in threads (the real loop, the real listener); stopped at the end."""
    started: list[tuple[Daemon, threading.Thread]] = []

    def start(config: Config) -> Daemon:
        daemon = Daemon(config, notifier=Notifier(environ={}))
        t = threading.Thread(target=daemon.run, name="daemon-under-test", daemon=True)
        t.start()
        started.append((daemon, t))
        wait_until(lambda: daemon.api is not None, what="the listener")
        return daemon

    yield start
    for daemon, t in started:
        daemon.request_stop()
        t.join(15)


def port_of(config: Config) -> int:
    assert config.listen is not None
    return int(config.listen.rsplit(":", 1)[1])


def scrape(config: Config, token: str | None = None) -> dict[Any, float]:
    r = request(port_of(config), "/metrics", token=token)
    assert r.status == 200, r.text
    return parse_metrics(r.text)


def status(config: Config, token: str | None = None) -> dict[str, Any]:
    r = request(port_of(config), "/api/v1/status", token=token)
    assert r.status == 200, r.text
    body: dict[str, Any] = r.json()
    return body


# --------------------------------------------------------------------------- in process


def test_metrics_from_a_running_daemon_follow_the_cluster(
    make_node: MakeNode, running: Callable[[Config], Daemon], tmp_path: Path
) -> None:
    a = make_node("gpu-a", (8192,), models=(LLAMA, EMBED))
    b = make_node("gpu-b", (4096, 4096), models=(EMBED,))
    config = config_for(tmp_path, [a, b], [LLAMA], watch_interval="0.2s")
    running(config)

    def placed() -> bool:
        s = scrape(config)
        return sample(s, "gpu_router_priority_model_on_gpu", model=LLAMA) == 1

    wait_until(placed, what="llama on GPU in the metrics")
    s = scrape(config)
    entry = ps_entry(a, LLAMA)
    assert entry is not None
    assert sample(s, "gpu_router_node_up", node="gpu-a") == 1
    assert sample(s, "gpu_router_node_up", node="gpu-b") == 1
    assert sample(s, "gpu_router_node_state", node="gpu-b", state="up") == 1
    assert sample(s, "gpu_router_gpu_memory_total_bytes", node="gpu-a", gpu="0") == exported_total(a, 0)
    assert sample(s, "gpu_router_gpu_memory_total_bytes", node="gpu-b", gpu="1") == exported_total(b, 1)
    assert sample(s, "gpu_router_gpu_memory_used_bytes", node="gpu-a", gpu="0") == (
        a.gpu_state()[0]["used_bytes"] // 2**20 * 2**20
    )
    assert (
        sample(s, "gpu_router_model_loaded_bytes", node="gpu-a", model=LLAMA, processor="gpu")
        == entry["size"]
    )
    assert sample(s, "gpu_router_priority_model_replicas_wanted", model=LLAMA) == 1
    assert sample(s, "gpu_router_priority_models_on_gpu") == 1
    assert sample(s, "gpu_router_actions_total", node="gpu-a", model=LLAMA, action="load", result="ok") == 1
    count = sample(s, "gpu_router_reconcile_duration_seconds_count")
    assert count is not None
    assert count >= 1
    assert sample(s, "gpu_router_last_reconcile_timestamp_seconds") is not None

    # gpu-b goes away: the watch sees it, the metrics say so and count why
    b.set_fault(Fault.REFUSE)

    def b_down() -> bool:
        s = scrape(config)
        return sample(s, "gpu_router_node_up", node="gpu-b") == 0

    wait_until(b_down, what="gpu-b down in the metrics")
    s = scrape(config)
    assert sample(s, "gpu_router_node_state", node="gpu-b", state="down") == 1
    refused = sample(s, "gpu_router_poll_errors_total", node="gpu-b", reason="refused")
    assert refused is not None
    assert refused >= 1
    assert sample(s, "gpu_router_drift_events_total", node="gpu-b", kind="node_down") == 1
    assert sample(s, "gpu_router_poll_errors_total", node="gpu-a", reason="refused") is None

    # and its first good answer brings it back
    b.clear_fault()
    wait_until(lambda: sample(scrape(config), "gpu_router_node_up", node="gpu-b") == 1, what="gpu-b back")
    assert sample(scrape(config), "gpu_router_drift_events_total", node="gpu-b", kind="node_back") == 1

    # the status API shows the action with its result and duration
    d = status(config)["daemon"]
    loads = [x for x in d["actions"] if x["model"] == LLAMA]
    assert loads[0]["result"] == "ok"
    assert loads[0]["node"] == "gpu-a"
    assert loads[0]["duration_s"] is not None


def test_optimize_through_the_api_waits_for_the_result(
    make_node: MakeNode, running: Callable[[Config], Daemon], tmp_path: Path
) -> None:
    a = make_node("gpu-a", (8192,), models=(LLAMA, EMBED), load_delay_s=0.3)
    config = config_for(tmp_path, [a], [LLAMA, EMBED], token=TOKEN)
    running(config)
    wait_until(lambda: pinned_on_gpu(a, LLAMA) and pinned_on_gpu(a, EMBED), what="both pinned")
    wait_until(lambda: status(config, TOKEN)["daemon"]["in_flight"] == [], what="nothing in flight")

    # The last load's result asks for a follow-up reconcile; one optimize lets it run first, so
    # the unload below is seen by the optimize's own reconcile and not by that one.
    assert request(port_of(config), "/api/v1/optimize?wait=20", method="POST", token=TOKEN).status == 200
    a.unload(LLAMA)  # evicted behind the daemon's back; the watch is off (300 s)
    assert request(port_of(config), "/api/v1/optimize", method="POST").status == 401
    r = request(port_of(config), "/api/v1/optimize?wait=20", method="POST", token=TOKEN)
    assert r.status == 200, r.text
    body = r.json()
    assert body["done"] is True
    assert body["error"] is None
    assert [(x["action"], x["model"], x["result"]) for x in body["actions"]] == [("load", LLAMA, "ok")]
    assert body["actions"][0]["duration_s"] >= 0.3
    assert fully_on_gpu(a, LLAMA)

    # nothing to do: answered at once, no action
    again = request(port_of(config), "/api/v1/optimize?wait=20", method="POST", token=TOKEN).json()
    assert again["done"] is True
    assert again["actions"] == []
    assert again["reconcile"] > body["reconcile"]


def test_a_reload_that_removes_a_node_removes_its_metrics(
    make_node: MakeNode, running: Callable[[Config], Daemon], tmp_path: Path
) -> None:
    a = make_node("gpu-a", (8192,), models=(LLAMA,))
    b = make_node("gpu-b", (8192,), models=(LLAMA,))
    b.set_fault(Fault.REFUSE)
    config = config_for(tmp_path, [a, b], [LLAMA])
    daemon = running(config)
    wait_until(lambda: sample(scrape(config), "gpu_router_node_up", node="gpu-b") == 0, what="gpu-b down")
    assert sample(scrape(config), "gpu_router_poll_errors_total", node="gpu-b", reason="refused") is not None

    write_config(tmp_path / "config.yaml", [a], [LLAMA], tmp_path / "state", listen=config.listen)
    daemon.request_reload()

    def gone() -> bool:
        s = scrape(config)
        return all(dict(labels).get("node") != "gpu-b" for _, labels in s) and bool(s)

    wait_until(gone, what="gpu-b gone from the metrics")
    assert sample(scrape(config), "gpu_router_node_up", node="gpu-a") == 1


# --------------------------------------------------------------------------- as a process, from the shell


def start_process(
    config_path: Path, listen: str, stderr: Path, token: str | None = None
) -> subprocess.Popen[bytes]:
    # The token reaches the daemon as an operator would pass it: through the environment (${VAR}).
    env = daemon_env(GPU_ROUTER_TEST_TOKEN=token)
    text = config_path.read_text() + f"listen: '{listen}'\n"
    if token is not None:
        text += "api_token: ${GPU_ROUTER_TEST_TOKEN}\n"
    config_path.write_text(text)
    with open(stderr, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "gpu_router", "--config", str(config_path)],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def run_command(fn: Callable[..., int], config: Config, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    args = build_parser().parse_args(list(argv))
    return fn(config, args, out), out.getvalue()


def test_status_and_optimize_against_a_daemon_process(make_node: MakeNode, tmp_path: Path) -> None:
    a = make_node("gpu-a", (8192,), models=(LLAMA, EMBED))
    path = write_config(tmp_path / "config.yaml", [a], [LLAMA], tmp_path / "state")
    listen = f"127.0.0.1:{free_port()}"
    config = dataclasses.replace(load_config(path), listen=listen, api_token=TOKEN)
    proc = start_process(path, listen, tmp_path / "stderr.log", token=TOKEN)
    try:
        wait_until(lambda: pinned_on_gpu(a, LLAMA), what="llama pinned by the daemon")

        def all_placed() -> bool:
            rc, _ = run_command(cmd_status, config, "status")
            return rc == 0

        wait_until(all_placed, what="status exit 0")
        rc, text = run_command(cmd_status, config, "status")
        assert rc == 0
        for expected in (
            "Daemon",
            "reconciles",
            "Node states",
            "gpu-a",
            "Nodes",
            LLAMA,
            "1/1 priority models on GPU",
        ):
            assert expected in text, expected
        rc, text = run_command(cmd_status, config, "status", "--json")
        body = json.loads(text)
        assert body["summary"]["priority_models_on_gpu"] == 1
        assert body["daemon"]["pid"] == proc.pid
        assert TOKEN not in text

        # a wrong token is refused, and status says no daemon answered it
        rc, _ = run_command(cmd_status, dataclasses.replace(config, api_token="wrong"), "status")
        assert rc == EX_NO_DAEMON

        # SIGUSR1: a reconcile now
        before = run_command(cmd_status, config, "status", "--json")[1]
        n = json.loads(before)["daemon"]["reconciles"]
        proc.send_signal(signal.SIGUSR1)
        wait_until(
            lambda: (
                json.loads(run_command(cmd_status, config, "status", "--json")[1])["daemon"]["reconciles"] > n
            ),
            what="a reconcile after SIGUSR1",
        )

        # optimize: the daemon does it and says what it did
        a.unload(LLAMA)
        loads_before = len(load_requests(a, LLAMA))
        rc, text = run_command(cmd_optimize, config, "optimize")
        assert rc == 0, text
        assert "Actions taken by the daemon" in text
        assert LLAMA in text
        assert "1/1 actions ok" in text
        assert len(load_requests(a, LLAMA)) == loads_before + 1
        assert pinned_on_gpu(a, LLAMA)

        # a priority model that cannot be placed: status exits 1
        write_config(
            tmp_path / "config.yaml",
            [a],
            [LLAMA, GEMMA],
            tmp_path / "state",
            listen=listen,
            api_token="${GPU_ROUTER_TEST_TOKEN}",
        )
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: run_command(cmd_status, config, "status")[0] == 1, what="status exit 1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        kill(proc)
    assert "Traceback" not in (tmp_path / "stderr.log").read_text()


def test_with_no_daemon_status_exits_3_and_optimize_runs_here(make_node: MakeNode, tmp_path: Path) -> None:
    a = make_node("gpu-a", (8192,), models=(LLAMA,))
    path = write_config(tmp_path / "config.yaml", [a], [LLAMA], tmp_path / "state")

    # the real command line: no listen: in the config, so no daemon to ask
    r = run_cli(["--config", str(path), "status"])
    assert r.returncode == EX_NO_DAEMON
    assert "sets no listen: address" in r.stderr
    assert "--report-only" in r.stderr
    assert "Traceback" not in r.stderr

    # a listen address where nothing listens
    config = dataclasses.replace(load_config(path), listen=f"127.0.0.1:{free_port()}")
    rc, text = run_command(cmd_status, config, "status")
    assert rc == EX_NO_DAEMON
    assert text == ""

    # optimize with no daemon: one reconcile here, the same rules, and what it did
    rc, text = run_command(cmd_optimize, config, "optimize")
    assert rc == 0, text
    assert "Actions taken by this process" in text
    assert LLAMA in text
    assert pinned_on_gpu(a, LLAMA)
    # and a second time there is nothing to do
    rc, text = run_command(cmd_optimize, config, "optimize")
    assert rc == 0
    assert "nothing to do" in text

    r = run_cli(["--config", str(path), "optimize", "--dry-run"])
    assert r.returncode == 0, r.stderr
    assert "nothing to do" in r.stdout


def test_report_only_textfile(make_node: MakeNode, tmp_path: Path) -> None:
    a = make_node("gpu-a", (8192,), models=(LLAMA,))
    a.load(LLAMA, keep_alive=-1)
    path = write_config(tmp_path / "config.yaml", [a], [LLAMA], tmp_path / "state")
    prom = tmp_path / "gpu_router.prom"
    r = run_cli(["--config", str(path), "--report-only", "--textfile", str(prom)])
    assert r.returncode == 0, r.stderr
    assert "1/1 priority models on GPU" in r.stdout
    s = parse_metrics(prom.read_text())
    assert sample(s, "gpu_router_node_up", node="gpu-a") == 1
    assert sample(s, "gpu_router_priority_model_on_gpu", model=LLAMA) == 1
    assert not a.mutating_requests()

    bad = run_cli(["--config", str(path), "--report-only", "--textfile", str(tmp_path / "no" / "x.prom")])
    assert bad.returncode == 1
    assert "cannot write" in bad.stderr
    assert "Traceback" not in bad.stderr
    usage = run_cli(["--config", str(path), "--textfile", str(prom)])
    assert usage.returncode == 2
    assert "--textfile works with --report-only" in usage.stderr


def test_a_port_in_use_is_logged_and_the_daemon_runs_on(
    make_node: MakeNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = make_node("gpu-a", (8192,), models=(LLAMA,))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        path = write_config(tmp_path / "config.yaml", [a], [LLAMA], tmp_path / "state")
        config = dataclasses.replace(load_config(path), listen=f"127.0.0.1:{taken.getsockname()[1]}")
        daemon = Daemon(config, notifier=Notifier(environ={}))
        t = threading.Thread(target=daemon.run, daemon=True)
        t.start()
        try:
            wait_until(lambda: pinned_on_gpu(a, LLAMA), what="llama pinned without the API")
            assert daemon.api is None
            assert any(
                r.levelname == "ERROR" and "cannot listen on 127.0.0.1" in r.getMessage()
                for r in caplog.records
            )
        finally:
            daemon.request_stop()
            t.join(15)
