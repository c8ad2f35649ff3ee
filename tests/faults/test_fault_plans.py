"""Pure planner checks for faults the suite found at the daemon level (no I/O)."""

from __future__ import annotations

from datetime import timedelta

from builders import NOW, cluster, config, gib, node

from gpu_router.planner import ActionKind, plan
from gpu_router.state import LoadedModel


def test_a_re_pin_that_failed_waits_out_its_backoff() -> None:
    # Found by the suite (row 7): a pin in place that failed was planned again by the reconcile its
    # failure started, which failed and started another: hundreds of requests a second.
    m = LoadedModel("p1:latest", gib(5), gib(5), expires_at=NOW + timedelta(seconds=20), context_length=8192)
    state = cluster(node("a", (8,), loaded_models=(m,)))
    assert [a.kind for a in plan(state, config("p1:latest")).actions] == [ActionKind.PIN]
    assert plan(state, config("p1:latest"), backoff=frozenset({("p1:latest", "a")})).actions == ()
    # Another node's backoff does not hold this one up.
    other = plan(state, config("p1:latest"), backoff=frozenset({("p1:latest", "b")}))
    assert [a.kind for a in other.actions] == [ActionKind.PIN]
