"""The node state machine: up, degraded within the grace, down after down_after, backoff, recovery."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import pytest

from gpu_router.config import NodeConfig
from gpu_router.observe import NodeHealth
from gpu_router.ollama import BadResponse, NodeUnreachable
from gpu_router.state import LoadedModel, NodeState, NodeStatus

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.s = 1000.0

    def __call__(self) -> float:
        return self.s

    def wall(self) -> datetime:
        return T0 + timedelta(seconds=self.s - 1000.0)


def good(name: str = "a") -> NodeState:
    m = LoadedModel("m:latest", 100, 100)
    return NodeState(name, f"http://{name}:11434", NodeStatus.UP, loaded=(m,))


def bare(name: str = "a") -> NodeState:
    return NodeState(name, f"http://{name}:11434", NodeStatus.UP)


def health(clock: Clock, down_after: int = 2) -> NodeHealth:
    return NodeHealth(
        down_after=down_after, backoff_start_s=10, backoff_cap_s=300, clock=clock, wall_clock=clock.wall
    )


def test_grace_then_down_then_backoff_doubling_to_the_cap_then_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    h = health(clock)
    first = h.record(good(), None)
    assert (first.state.status, first.changed, first.recovered) == (NodeStatus.UP, True, False)
    refused = NodeUnreachable("a", "GET /api/ps: connection refused")

    clock.s += 5
    with caplog.at_level(logging.WARNING, logger="gpu_router.observe"):
        one = h.record(bare(), refused)
    # Within the grace: degraded, its last good picture kept (marked stale), still polled.
    assert one.state.status is NodeStatus.DEGRADED
    assert one.state.stale
    assert [m.name for m in one.state.loaded] == ["m:latest"]
    assert "down after 1 more failed poll" in (one.state.error or "")
    assert h.due("a")

    clock.s += 5
    with caplog.at_level(logging.WARNING, logger="gpu_router.observe"):
        two = h.record(bare(), refused)
    assert two.state.status is NodeStatus.DOWN
    assert two.state.loaded == ()
    assert two.state.state_since == clock.wall()
    # Each change logged once at warning level, with the reason and how long the state before lasted.
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines == [
        "node a is degraded: GET /api/ps: connection refused (down after 1 more failed poll) (was up for 5s)",
        "node a is down after 2 failed polls: GET /api/ps: connection refused (was degraded for 5s)",
    ]

    # Down: polled after 10 s, then 20, 40 ... up to check_interval (300).
    waits = []
    for _ in range(7):
        assert not h.due("a")
        start = clock.s
        while not h.due("a"):
            clock.s += 1
        waits.append(round(clock.s - start))
        h.record(bare(), refused)
    assert waits == [10, 20, 40, 80, 160, 300, 300]
    skipped = h.skipped(NodeConfig("a", "http://a:11434"))
    assert skipped.status is NodeStatus.DOWN
    assert (skipped.error or "").startswith("no answer; next try in")

    # The first good answer brings it back (and says so: the daemon reconciles on it).
    while not h.due("a"):
        clock.s += 1
    back = h.record(good(), None)
    assert (back.state.status, back.changed, back.recovered) == (NodeStatus.UP, True, True)
    assert h.due("a")


def test_a_node_that_answers_badly_is_degraded_not_down() -> None:
    clock = Clock()
    h = health(clock, down_after=2)
    h.record(good(), None)
    broken = BadResponse("a", "GET /api/ps: invalid JSON")
    for _ in range(5):
        clock.s += 1
        j = h.record(bare(), broken)
        assert j.state.status is NodeStatus.DEGRADED
        assert h.due("a")  # it answers: no backoff
    # Past the grace the stale picture is dropped: it cannot be trusted any longer.
    assert j.state.loaded == ()
    assert not j.state.stale


def test_down_after_one_is_down_at_once_and_a_first_failure_says_so() -> None:
    clock = Clock()
    h = health(clock, down_after=1)
    j = h.record(bare(), NodeUnreachable("a", "timed out"))
    assert (j.state.status, j.changed, j.recovered) == (NodeStatus.DOWN, True, False)


def test_nodes_that_leave_the_config_are_forgotten() -> None:
    clock = Clock()
    h = health(clock)
    h.record(good("a"), None)
    h.record(good("b"), None)
    h.forget({"a"})
    assert h.status("a") is NodeStatus.UP
    assert h.status("b") is None
