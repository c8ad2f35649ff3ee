"""Rows 1-3 of issue 7: hostile bodies (deep nesting, 200 MB, a gzip bomb) and replies dripped at 1 B/s.

Each is served by the ``bad`` node (its Ollama API, or its exporter) while the daemon runs; the
healthy node's pin is knocked out and must come back, and ``--report-only`` must still report.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from conftest import LLAMA32, MakeScenario
from daemon_helpers import MakeNode, daemon_env, run_cli, write_config
from harness import DEADLINE_S, FAST, DaemonRun, _Run, common_checks, restore_pin

from gpu_router.emulator import Fault

MIB = 1024 * 1024
# Half the unit's MemoryMax=512M. The daemon idles at about 30 MB; before the fixes one node's gzip
# bombs took it to 178 MB and three nodes' to 495 MB.
RSS_LIMIT_BYTES = 256 * MIB
OLLAMA_PATHS = ("/api/ps", "/api/tags", "/api/show", "/api/version")


def report(config: Path) -> tuple[int, dict[str, dict[str, object]], str, float]:
    """``--report-only --json``: exit code, nodes by name, stderr, and wall time."""
    start = time.monotonic()
    result = run_cli(["--config", str(config), "--report-only", "--json"], daemon_env())
    took = time.monotonic() - start
    nodes: dict[str, dict[str, object]] = {}
    if result.stdout.strip():
        nodes = {n["name"]: n for n in json.loads(result.stdout)["nodes"]}
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, nodes, result.stderr, took


# --------------------------------------------------------------------------------------------- row 1


@pytest.mark.parametrize("watch", ["0.3s", 0], ids=["watch-on", "watch-off"])
def test_row1_deeply_nested_json_degrades_only_that_node(scenario: MakeScenario, watch: str | int) -> None:
    # Before: RecursionError escaped watch (exit 1 at every restart); with the watch off every
    # reconcile failed, so a pin lost on a healthy node was never restored.
    s = scenario(watch_interval=watch)
    s.bad.set_fault(Fault.DEEP_JSON, paths=OLLAMA_PATHS)
    s.run.wait_reconciles(3)
    restore_pin(s.run, s.ok, LLAMA32)
    said = r"node bad is degraded: GET /api/\w+: invalid JSON \(nested too deep\)"
    assert re.search(said, s.run.log_text())

    rc, nodes, _, _ = report(s.config)
    assert rc == 0
    assert nodes["ok"]["status"] == "up"
    assert nodes["bad"]["status"] == "degraded"
    assert "nested too deep" in str(nodes["bad"]["error"])
    common_checks(s.run, s.nodes, s.priority)


# --------------------------------------------------------------------------------------------- row 2


@pytest.mark.parametrize(
    ("fault", "paths"),
    [
        (Fault.HUGE_BODY, OLLAMA_PATHS),
        (Fault.GZIP_BOMB, OLLAMA_PATHS),
        (Fault.HUGE_BODY, ("/metrics",)),
        (Fault.GZIP_BOMB, ("/metrics",)),
    ],
    ids=["200MB-ollama", "gzip-bomb-ollama", "200MB-exporter", "gzip-bomb-exporter"],
)
def test_row2_huge_bodies_and_gzip_bombs_stay_far_below_memorymax(
    scenario: MakeScenario, fault: Fault, paths: tuple[str, ...]
) -> None:
    # Before: peak RSS 648 MB / 854 MB / 1.66 GB, and the unit's MemoryMax=512M killed it.
    s = scenario()
    s.bad.set_fault(fault, paths=paths)
    s.run.wait_reconciles(4)
    restore_pin(s.run, s.ok, LLAMA32)
    s.run.wait_reconciles(2)
    peak = s.run.peak_rss_bytes()
    assert peak < RSS_LIMIT_BYTES, f"peak RSS {peak / MIB:.0f} MiB while a node sent {fault.value}"
    text = s.run.log_text()
    if paths == ("/metrics",):
        assert "over the 16 MiB cap" in text or "over the 4 MiB cap" in text, text[-2000:]
    else:
        # Whichever of its requests came back first: /api/ps, /api/tags or /api/version.
        assert re.search(r"node bad is degraded: GET /api/\w+: response body .*over the 16 MiB cap", text)
    common_checks(s.run, s.nodes, s.priority)


# --------------------------------------------------------------------------------------------- row 3


@pytest.mark.parametrize(
    "paths", [OLLAMA_PATHS, ("/metrics",), None], ids=["ollama-drips", "exporter-drips", "everything-drips"]
)
def test_row3_a_reply_dripped_at_1_byte_per_second(
    scenario: MakeScenario, paths: tuple[str, ...] | None
) -> None:
    # Before: request_timeout bounded each read, not the request; 1 watchdog ping in 40 s, SIGTERM
    # ignored for 20 s, --report-only still running after 60 s.
    s = scenario()
    s.bad.set_fault(Fault.DRIP, rate_bps=1.0, paths=paths)
    s.run.wait_reconciles(4)
    restore_pin(s.run, s.ok, LLAMA32)

    rc, nodes, _, took = report(s.config)
    assert rc == 0
    assert nodes["ok"]["status"] == "up"
    # One observation deadline, the interpreter's start and the report itself; a dripped /api/ps
    # (hundreds of bytes at 1 B/s) would take minutes.
    assert took < DEADLINE_S + 8.0, f"--report-only took {took:.1f}s against a dripping node"
    if paths != ("/metrics",):
        assert nodes["bad"]["status"] == "down"
        assert "timed out" in str(nodes["bad"]["error"])
    # The stop comes while a dripped reply is in flight: it must not wait for it.
    common_checks(s.run, s.nodes, s.priority)


def test_row2_gzip_bombs_from_several_nodes_at_once(
    make_node: MakeNode, tmp_path: Path, runs: list[_Run]
) -> None:
    # Found by the suite: each body was capped, but not all of them together. Three nodes sending
    # bombs at once took the daemon to 495 MB; now every body past 1 MiB shares one 48 MiB budget.
    ok = make_node("ok", models=(LLAMA32,))
    bombs = [make_node(f"bomb{i}", models=(LLAMA32,)) for i in range(3)]
    for b in bombs:
        b.set_fault(Fault.GZIP_BOMB, paths=OLLAMA_PATHS)
    config = write_config(tmp_path / "config.yaml", [ok, *bombs], [LLAMA32], tmp_path / "state", **FAST)
    run = DaemonRun(config, tmp_path)
    runs.append(run)
    run.wait_reconciles(5)
    restore_pin(run, ok, LLAMA32)
    run.wait_reconciles(3)
    peak = run.peak_rss_bytes()
    assert peak < RSS_LIMIT_BYTES, f"peak RSS {peak / MIB:.0f} MiB while three nodes sent gzip bombs"
    common_checks(run, [ok, *bombs], [LLAMA32])
