"""Fixtures of the fault suite: a healthy node and a faulty one, and the daemon watching both."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_helpers import MakeNode, wait_until, write_config
from harness import FAST, DaemonRun, _Run

from gpu_router.emulator import EmulatedNode

LLAMA32 = "llama3.2:latest"  # 3.1 GiB on GPU: the healthy node's priority model
GEMMA = "gemma2:2b"  # the faulty node's priority model
EMBED = "nomic-embed-text:latest"  # installed on both, never a priority model here


@dataclass
class Scenario:
    """Two nodes (``ok`` healthy, ``bad`` the one the test breaks), their config, and the daemon."""

    ok: EmulatedNode
    bad: EmulatedNode
    config: Path
    state_dir: Path
    run: DaemonRun
    priority: tuple[str, ...]

    @property
    def nodes(self) -> tuple[EmulatedNode, EmulatedNode]:
        return self.ok, self.bad


MakeScenario = Callable[..., Scenario]


@pytest.fixture
def runs() -> Iterator[list[_Run]]:
    """Every run a test starts; killed and closed at the end whatever happened."""
    started: list[_Run] = []
    yield started
    for r in started:
        r.close()


@pytest.fixture
def scenario(make_node: MakeNode, tmp_path: Path, runs: list[_Run]) -> MakeScenario:
    """Start ``ok`` and ``bad`` and a daemon with the fast settings; both pins are in place on return.

    ``before`` is called with the bad node before the daemon starts (a fault present from the first
    poll); then the bad node's pin is not waited for. ``headers`` go to every node, ``bad_gpu``
    replaces the bad node's ``gpu:``, ``env`` is added to the daemon's environment, and ``settings``
    override :data:`FAST`.
    """

    def make(
        *,
        before: Callable[[EmulatedNode], object] | None = None,
        bad_kw: dict[str, Any] | None = None,
        bad_models: tuple[str, ...] = (GEMMA, EMBED),
        bad_gpu: object = None,
        priority: tuple[str, ...] = (LLAMA32, GEMMA),
        headers: dict[str, str] | None = None,
        env: dict[str, str | None] | None = None,
        **settings: Any,
    ) -> Scenario:
        ok = make_node("ok", models=(LLAMA32, EMBED))
        bad = make_node("bad", models=bad_models, **(bad_kw or {}))
        state = tmp_path / "state"
        all_settings = {**FAST, **settings}
        config = write_config(tmp_path / "config.yaml", [ok, bad], list(priority), state, **all_settings)
        if headers or bad_gpu is not None:
            _edit_nodes(config, headers, bad_gpu)
        if before is not None:
            before(bad)
        run = DaemonRun(config, tmp_path, **(env or {}))
        runs.append(run)
        if before is None and GEMMA in priority and GEMMA in bad_models:
            # Pinned, and the daemon has seen its own load through (so a fault set next does not
            # land on the load's verification instead).
            done = f"action load node=bad model={GEMMA} result=ok"
            wait_until(lambda: done in run.log_text(), what=f"{GEMMA} pinned before the fault")
        done = f"action load node=ok model={LLAMA32} result=ok"
        wait_until(lambda: done in run.log_text(), what=f"{LLAMA32} pinned on the healthy node")
        return Scenario(ok, bad, config, state, run, priority)

    return make


def _edit_nodes(config: Path, headers: dict[str, str] | None, bad_gpu: object) -> None:
    """Give every node ``headers``, and the bad node ``gpu: bad_gpu`` (e.g. static figures)."""
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    for n in data["nodes"]:
        if headers:
            n["headers"] = dict(headers)
        if bad_gpu is not None and n["name"] == "bad":
            n["gpu"] = bad_gpu
    config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
