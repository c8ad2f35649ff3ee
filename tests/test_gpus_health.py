"""HealthTracker: XID errors held for a while, keyed per GPU, and one log line per health change."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from gpu_router.gpus.health import HealthTracker, XidSignal
from gpu_router.state import GIB, Gpu


@dataclass
class Clock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


def gpus(*uuids: str) -> tuple[Gpu, ...]:
    return tuple(Gpu(i, f"GPU{i}", 8 * GIB, 0, 8 * GIB, uuid=u) for i, u in enumerate(uuids))


def test_an_xid_hold_expires_after_hold_s() -> None:
    clock = Clock()
    tracker = HealthTracker("test", xid_hold_s=60, clock=clock)
    tracker.apply(gpus("a"), {"a": XidSignal(last_code=0)})
    clock.now += 10
    (gpu,) = tracker.apply(gpus("a"), {"a": XidSignal(last_code=43)})
    assert (gpu.healthy, gpu.health_reason) == (False, "new XID error 43 since the previous scrape")
    clock.now += 59
    assert not tracker.apply(gpus("a"), {"a": XidSignal(last_code=43)})[0].healthy
    clock.now += 2
    assert tracker.apply(gpus("a"), {"a": XidSignal(last_code=43)})[0].healthy


def test_a_second_new_xid_restarts_the_hold() -> None:
    clock = Clock()
    tracker = HealthTracker("test", xid_hold_s=60, clock=clock)
    tracker.apply(gpus("a"), {"a": XidSignal(last_code=0)})
    tracker.apply(gpus("a"), {"a": XidSignal(last_code=13)})
    clock.now += 50
    (gpu,) = tracker.apply(gpus("a"), {"a": XidSignal(last_code=31)})
    assert gpu.health_reason == "new XID error 31 since the previous scrape"
    clock.now += 50
    assert not tracker.apply(gpus("a"), {"a": XidSignal(last_code=31)})[0].healthy


def test_state_is_per_gpu_key() -> None:
    tracker = HealthTracker("test", clock=Clock())
    tracker.apply(gpus("a", "b"), {"a": XidSignal(last_code=0), "b": XidSignal(last_code=0)})
    a, b = tracker.apply(gpus("a", "b"), {"a": XidSignal(last_code=0), "b": XidSignal(last_code=94)})
    assert (a.healthy, b.healthy) == (True, False)
    # without a UUID the index keys the state
    nameless = (Gpu(3, "x", GIB),)
    tracker.apply(nameless, {"index:3": XidSignal(window_count=0)})
    (gpu,) = tracker.apply(nameless, {"index:3": XidSignal(window_count=2)})
    assert (gpu.healthy, gpu.health_reason) == (False, "new XID error since the previous scrape")


@pytest.mark.parametrize(
    ("before", "after", "new"),
    [
        (XidSignal(last_code=0), XidSignal(last_code=0), False),
        (XidSignal(last_code=79), XidSignal(last_code=0), False),  # a reset gauge is no error
        (XidSignal(last_code=79), XidSignal(last_code=13), True),
        (XidSignal(window_count=3), XidSignal(window_count=2), False),  # the window slid
        (XidSignal(window_count=None), XidSignal(window_count=2), False),
        (XidSignal(last_code=None), XidSignal(last_code=13), True),
    ],
)
def test_what_counts_as_a_new_xid(before: XidSignal, after: XidSignal, new: bool) -> None:
    tracker = HealthTracker("test", clock=Clock())
    tracker.apply(gpus("a"), {"a": before})
    assert tracker.apply(gpus("a"), {"a": after})[0].healthy is not new


def test_an_already_unhealthy_gpu_keeps_its_own_reason() -> None:
    tracker = HealthTracker("test", clock=Clock())
    tracker.apply(gpus("a"), {"a": XidSignal(last_code=0)})
    sick = (Gpu(0, "GPU0", GIB, uuid="a", healthy=False, health_reason="gpu_health 0"),)
    (gpu,) = tracker.apply(sick, {"a": XidSignal(last_code=79)})
    assert gpu.health_reason == "gpu_health 0"


def test_each_change_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    tracker = HealthTracker("exporter http://h:9400/metrics", clock=Clock())
    sick = (Gpu(1, "NVIDIA L4", GIB, healthy=False, health_reason="boom"),)
    well = (Gpu(1, "NVIDIA L4", GIB),)
    with caplog.at_level(logging.INFO, logger="gpu_router.gpus.health"):
        for batch in (well, sick, sick, well, well):
            tracker.apply(batch)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "exporter http://h:9400/metrics: GPU 1 (NVIDIA L4) is unhealthy: boom"),
        (logging.INFO, "exporter http://h:9400/metrics: GPU 1 (NVIDIA L4) is healthy again"),
    ]
