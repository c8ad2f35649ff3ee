"""The daemon as a real process: ``python -m gpu_router --config PATH``, emulated nodes in this process.

sd_notify goes to a real abstract AF_UNIX datagram socket bound here; signals are real signals;
stderr goes to a real file so journald detection (``JOURNAL_STREAM`` = dev:ino) can be exercised.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import (
    WAIT_S,
    Datagram,
    MakeNode,
    NotifyListener,
    daemon_env,
    kill,
    load_requests,
    pinned_on_gpu,
    ps_entry,
    run_cli,
    start_daemon,
    wait_until,
    write_config,
)

from gpu_router.emulator import Fault

LLAMA32 = "llama3.2:latest"
EMBED = "nomic-embed-text:latest"
GEMMA = "gemma2:2b"
STOP_WAIT_S = 10.0  # a stop must fit well inside the unit's TimeoutStopSec

_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
_JOURNAL_LINE = re.compile(r"^<[0-7]>")


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    """systemd's notify socket, stood in for by a real datagram socket."""
    sock = NotifyListener()
    yield sock
    sock.close()


def has(key: str, value: str = "1") -> Callable[[Datagram], bool]:
    """Predicate: the datagram carries ``key=value``."""
    return lambda d: d.fields.get(key) == value


def status_matches(pattern: str) -> Callable[[Datagram], bool]:
    """Predicate: the datagram's STATUS matches ``pattern``."""
    return lambda d: re.search(pattern, d.fields.get("STATUS", "")) is not None


def stop_and_wait(proc: Any) -> int:
    """SIGTERM, then the exit code (a hang past STOP_WAIT_S fails the test)."""
    proc.send_signal(signal.SIGTERM)
    return int(proc.wait(STOP_WAIT_S))


# --------------------------------------------------------------------------- 11. sd_notify lifecycle


def test_notify_lifecycle_reload_and_stop(
    make_node: MakeNode, listener: NotifyListener, tmp_path: Path
) -> None:
    a = make_node("gpu-a", models=(LLAMA32, EMBED))
    config = tmp_path / "config.yaml"
    settings: dict[str, Any] = {"watch_interval": "0.2s", "check_interval": "300s"}
    write_config(config, [a], [LLAMA32], tmp_path / "state", **settings)
    stderr = tmp_path / "stderr.log"
    env = daemon_env(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="400000")
    proc = start_daemon(["--config", str(config)], stderr, env)
    try:
        i = listener.wait_for(has("READY"), what="READY=1")
        assert listener.messages[i].fields.get("STATUS"), "READY=1 without a STATUS"
        i = listener.wait_for(status_matches(r"^reconcile #\d+: 1/1 priority models on GPU"), after=i)
        assert pinned_on_gpu(a, LLAMA32)
        listener.wait_for(has("WATCHDOG"), after=i, what="WATCHDOG=1")

        # A valid edit: a second priority model.
        write_config(config, [a], [LLAMA32, EMBED], tmp_path / "state", **settings)
        mark = len(listener.messages)
        proc.send_signal(signal.SIGHUP)
        i = listener.wait_for(has("RELOADING"), after=mark, what="RELOADING=1")
        reloading = listener.messages[i]
        assert re.fullmatch(r"\d+", reloading.fields.get("MONOTONIC_USEC", "")), reloading.raw
        i = listener.wait_for(has("READY"), after=i, what="READY=1 after the reload")
        listener.wait_for(status_matches(r"2/2 priority models on GPU"), after=i, what="the new model placed")
        assert pinned_on_gpu(a, EMBED)

        # An invalid edit: the running configuration stays.
        config.write_text(config.read_text() + "evict: sometimes\n", encoding="utf-8")
        bad_line = len(config.read_text().splitlines())
        mark = len(listener.messages)
        proc.send_signal(signal.SIGHUP)
        i = listener.wait_for(has("RELOADING"), after=mark, what="RELOADING=1 (invalid config)")
        i = listener.wait_for(has("READY"), after=i, what="READY=1 after a rejected reload")
        listener.wait_for(has("WATCHDOG"), after=i + 1, what="WATCHDOG=1 after a rejected reload")
        assert proc.poll() is None, "the daemon exited on a bad config reload"
        wait_until(lambda: "reload failed" in stderr.read_text(), what="the reload error in the log")
        log = stderr.read_text()
        assert f"{config}:{bad_line}: evict: expected one of never, idle, any" in log
        assert "Traceback" not in log

        # Still running the old configuration: both models come back after a restart.
        a.restart()
        wait_until(lambda: pinned_on_gpu(a, LLAMA32) and pinned_on_gpu(a, EMBED), what="reload after restart")

        mark = len(listener.messages)
        assert stop_and_wait(proc) == 0
        listener.wait_for(has("STOPPING"), after=mark, what="STOPPING=1")
    finally:
        kill(proc)


# --------------------------------------------------------------------------- 5. watchdog during a hang


def test_watchdog_keeps_pinging_while_a_node_hangs_in_a_load(
    make_node: MakeNode, listener: NotifyListener, tmp_path: Path
) -> None:
    a = make_node("gpu-a", models=(LLAMA32,))
    b = make_node("gpu-b", models=(GEMMA,))
    a.set_fault(Fault.HANG, paths=("/api/generate",))
    config = write_config(
        tmp_path / "config.yaml",
        [a, b],
        [LLAMA32, GEMMA],
        tmp_path / "state",
        request_timeout="1s",
        load_timeout="60s",
        watch_interval="300s",
    )
    env = daemon_env(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="400000")
    stderr = tmp_path / "stderr.log"
    proc = start_daemon(["--config", str(config)], stderr, env)
    try:
        wait_until(lambda: load_requests(a, LLAMA32), what="the load on gpu-a")
        wait_until(lambda: pinned_on_gpu(b, GEMMA), what="gpu-b's load while gpu-a hangs")

        start = time.monotonic()
        time.sleep(2.0)
        pings = [
            m for m in listener.messages if m.fields.get("WATCHDOG") == "1" and m.at_monotonic_s >= start
        ]
        assert ps_entry(a, LLAMA32) is None, "gpu-a stopped hanging: the window proves nothing"
        # Every 0.2 s: about 10 in 2 s. Several is the point, not the exact count.
        assert len(pings) >= 4, f"only {len(pings)} watchdog pings in 2 s while a load hung"
        assert proc.poll() is None

        # A load hung on a node never holds up a stop: the grace period ends, the daemon exits 0.
        mark = len(listener.messages)
        assert stop_and_wait(proc) == 0
        listener.wait_for(has("STOPPING"), after=mark, what="STOPPING=1")
    finally:
        kill(proc)
        a.clear_fault()
    assert "leaving actions in flight on gpu-a" in stderr.read_text()


# --------------------------------------------------------------------------- 12. SIGTERM during a load


def test_sigterm_during_a_load_lets_it_finish_and_exits_0(make_node: MakeNode, tmp_path: Path) -> None:
    a = make_node("gpu-a", models=(LLAMA32,), load_delay_s=2.0)
    config = write_config(tmp_path / "config.yaml", [a], [LLAMA32], tmp_path / "state")
    stderr = tmp_path / "stderr.log"
    proc = start_daemon(["--config", str(config)], stderr)
    try:
        wait_until(lambda: load_requests(a, LLAMA32), what="the load request")
        time.sleep(0.5)
        # (The emulator lists a model in /api/ps while it loads, so ask the daemon's log instead.)
        assert "result=" not in stderr.read_text(), (
            "the load finished before the signal; the test proves nothing"
        )
        assert stop_and_wait(proc) == 0
    finally:
        kill(proc)
    assert pinned_on_gpu(a, LLAMA32)
    log = stderr.read_text()
    assert "waiting up to" in log
    # The daemon saw the move through itself, rather than leaving it to the node.
    assert f"action load node=gpu-a model={LLAMA32} result=ok" in log
    assert "Traceback" not in log


# --------------------------------------------------------------------------- 13. journald prefixes


def _run_once_with_trouble(make_node: MakeNode, tmp_path: Path, journal: str | None) -> list[str]:
    """``--once`` against one node whose loads fail and one that is down; returns stderr's lines."""
    a = make_node("gpu-a", models=(LLAMA32,))
    down = make_node("gpu-down", models=(LLAMA32,))
    a.set_fault(Fault.HTTP500, paths=("/api/generate",))
    down.set_fault(Fault.REFUSE)
    config = write_config(
        tmp_path / "config.yaml",
        [a, down],
        [LLAMA32],
        tmp_path / "state",
        log_level="INFO",
        request_timeout="1s",
    )
    stderr = tmp_path / "stderr.log"
    stderr.write_bytes(b"")
    if journal == "match":
        st = os.stat(stderr)
        env = daemon_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    elif journal == "other":
        # Set, but naming another file: inherited by a redirected child, so not the journal.
        st = os.stat(config)
        env = daemon_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    else:
        env = daemon_env()
    proc = start_daemon(["--config", str(config), "--once"], stderr, env)
    try:
        assert proc.wait(WAIT_S + 10) == 0
    finally:
        kill(proc)
    return [line for line in stderr.read_text().splitlines() if line.strip()]


def test_under_journald_every_line_has_a_priority_prefix(make_node: MakeNode, tmp_path: Path) -> None:
    lines = _run_once_with_trouble(make_node, tmp_path, "match")
    assert lines
    bad = [line for line in lines if not _JOURNAL_LINE.match(line)]
    assert bad == [], f"lines without <N>: {bad}"
    assert not any(_TIMESTAMP.search(line) for line in lines), "journald adds the time itself"
    warnings = [line for line in lines if line.startswith("<4>")]
    assert any("gpu-down" in line for line in warnings), f"no <4> line for the down node: {lines}"
    assert any("result=failed" in line for line in warnings), f"no <4> line for the failed load: {lines}"
    assert any(line.startswith("<6>") for line in lines)


@pytest.mark.parametrize("journal", [None, "other"])
def test_without_journald_lines_are_timestamped(
    make_node: MakeNode, tmp_path: Path, journal: str | None
) -> None:
    lines = _run_once_with_trouble(make_node, tmp_path, journal)
    assert lines
    assert all(
        re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) ", line) for line in lines
    ), lines
    assert not any(re.match(r"^<\d>", line) for line in lines)
    assert any("WARNING" in line and "gpu-down" in line for line in lines)


# --------------------------------------------------------------------------- 14. exit codes, --dry-run


def test_a_bad_config_exits_78_with_file_line_and_key(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("nodes:\n  - http://127.0.0.1:9\nevict: sometimes\n", encoding="utf-8")
    for args in (["--config", str(config)], ["--config", str(config), "--check-config"]):
        result = run_cli(args)
        assert result.returncode == 78, result
        assert f"{config}:3: evict: expected one of never, idle, any" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_missing_config_exits_78(tmp_path: Path) -> None:
    result = run_cli(["--config", str(tmp_path / "nope.yaml")])
    assert result.returncode == 78
    assert "nope.yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_accepts_a_valid_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"nodes:\n  - http://127.0.0.1:9\npriority_models:\n  - llama3.2\nstate_dir: {tmp_path / 'state'}\n",
        encoding="utf-8",
    )
    result = run_cli(["--config", str(config), "--check-config"])
    assert result.returncode == 0, result
    assert f"{config}: OK (1 nodes, 1 priority models)" in result.stdout


def test_once_dry_run_logs_the_plan_and_sends_nothing(make_node: MakeNode, tmp_path: Path) -> None:
    a = make_node("gpu-a", models=(LLAMA32,))
    config = write_config(tmp_path / "config.yaml", [a], [LLAMA32], tmp_path / "state")
    result = run_cli(["--config", str(config), "--once", "--dry-run"])
    assert result.returncode == 0, result
    assert f"would load {LLAMA32} on gpu-a (dry run)" in result.stderr
    assert a.mutating_requests() == []


# --------------------------------------------------------------------------- signals in a storm


def test_a_storm_of_signals_never_wedges_the_loop(make_node: MakeNode, tmp_path: Path) -> None:
    """Signals land at any bytecode: one that arrives while the loop holds a lock its handler wants
    would wedge the daemon for good (seen under load as a SIGHUP never acted on). Thousands of them,
    then a reload and a stop, must all be acted on."""
    a = make_node("gpu-a", models=(LLAMA32, EMBED))
    config = tmp_path / "config.yaml"
    # A short watch interval keeps the loop waking, clearing and waiting: where a handler can collide.
    settings: dict[str, Any] = {"watch_interval": "0.01s", "check_interval": "300s"}
    write_config(config, [a], [LLAMA32], tmp_path / "state", **settings)
    stderr = tmp_path / "stderr.log"
    proc = start_daemon(["--config", str(config)], stderr)
    try:
        wait_until(lambda: pinned_on_gpu(a, LLAMA32), what="llama pinned")
        end = time.monotonic() + 3.0
        sent = 0
        while time.monotonic() < end:
            proc.send_signal(signal.SIGUSR1 if sent % 2 else signal.SIGHUP)
            sent += 1
            time.sleep(0.0005)
        write_config(config, [a], [LLAMA32, EMBED], tmp_path / "state", **settings)
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: pinned_on_gpu(a, EMBED), what=f"the reload after {sent} signals acted on")
        assert stop_and_wait(proc) == 0
    finally:
        kill(proc)
    assert "Traceback" not in stderr.read_text()
