"""Rows 4-10 of issue 7's table, each driven through the daemon as a real process.

Row 11 (``install.sh --root`` produces a tree that works once copied elsewhere) is the slow test
``tests/test_install.py::test_real_venv_install``: it stages into one directory, copies the tree
to another, removes the first and runs the command from the copy.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import EMBED, GEMMA, LLAMA32, MakeScenario
from daemon_helpers import (
    MakeNode,
    daemon_env,
    expires_year,
    load_requests,
    pinned_on_gpu,
    ps_entry,
    run_cli,
    wait_until,
    write_config,
)
from harness import DaemonRun, _Run, assert_backed_off, common_checks, load_attempts, restore_pin

from gpu_router.emulator import Fault

LLAMA31 = "llama3.1:8b"  # 6.0 GiB: partly on CPU on a 4 GiB card


def _report(config: Path, **env: str) -> tuple[int, dict[str, Any], str]:
    result = run_cli(["--config", str(config), "--report-only", "--json"], daemon_env(**env))
    assert "Traceback" not in result.stderr, result.stderr
    nodes = {n["name"]: n for n in json.loads(result.stdout)["nodes"]} if result.stdout.strip() else {}
    return result.returncode, nodes, result.stderr


# --------------------------------------------------------------------------------------------- row 4


def test_row4_a_redirect_to_another_host_is_never_followed(
    scenario: MakeScenario, make_node: MakeNode
) -> None:
    # Before: every request, POST /api/show included, was repeated at the redirect's target with
    # the node's custom headers (X-Api-Key: ${TOKEN}).
    other = make_node("other", models=(GEMMA,))  # the other host: it records every request it gets
    stolen = f"{other.url}/collect"
    token = "row4-token-7f3a9c"
    s = scenario(
        # POSTs first (the model's /api/show and the load), with 307 which keeps the method and body.
        before=lambda bad: bad.set_fault(
            Fault.REDIRECT, status=307, location=stolen, paths=("/api/show", "/api/generate")
        ),
        headers={"X-Api-Key": "${ROW4_TOKEN}"},
        env={"ROW4_TOKEN": token},
    )
    wait_until(lambda: load_attempts(s.bad, GEMMA), what="the load sent to the redirecting node")
    s.run.wait_reconciles(2)
    assert_backed_off(s.run, s.bad, GEMMA)
    # Then every GET as well, with a 302.
    s.bad.set_fault(Fault.REDIRECT, status=302, location=stolen)
    s.run.wait_reconciles(3)
    restore_pin(s.run, s.ok, LLAMA32)

    rc, nodes, stderr = _report(s.config, ROW4_TOKEN=token)
    assert rc == 0
    assert token not in stderr
    assert nodes["bad"]["status"] == "degraded"
    assert f"redirect refused: HTTP 302 to {stolen}" in str(nodes["bad"]["error"])
    text = s.run.log_text()
    assert f"POST /api/show: redirect refused: HTTP 307 to {stolen}" in text
    assert f"redirect refused: HTTP 307 to {stolen}" in text
    assert other.requests == [], "a request followed the redirect to the other host"
    assert token not in text
    common_checks(s.run, s.nodes, s.priority)


# --------------------------------------------------------------------------------------------- row 5


def _plant(path: Path, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "invalid-utf8":
        path.write_bytes(b'{"version": 2, "sizes": {"caf\xe9\xff": 1}}')
    else:
        path.write_bytes(b"[" * 200_000)


@pytest.mark.parametrize("name", ["learned-sizes.json", "model-info.json"])
@pytest.mark.parametrize("kind", ["invalid-utf8", "deep-nesting", "fifo"])
def test_row5_a_broken_state_file_is_logged_and_rebuilt(
    scenario: MakeScenario, tmp_path: Path, name: str, kind: str
) -> None:
    # Before: UnicodeDecodeError / RecursionError and exit 1 at every start; a FIFO hung start-up.
    path = tmp_path / "state" / name
    _plant(path, kind)
    s = scenario()  # started: READY, and both pins placed
    s.run.wait_reconciles(2)
    text = s.run.log_text()
    assert str(path) in text
    assert ("not a regular file" if kind == "fifo" else "is corrupt") in text
    # Rebuilt: a regular file again, holding what this run learned.
    wait_until(lambda: path.is_file() and path.stat().st_size > 2, what=f"{name} written again")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data, f"{name} was rewritten empty"
    if name == "learned-sizes.json":
        assert data["sizes"], "nothing learned into the rebuilt file"
    common_checks(s.run, s.nodes, s.priority)


# --------------------------------------------------------------------------------------------- row 6


@pytest.mark.parametrize("keep_alive", [-1, "5m"], ids=["pinned-by-someone", "loaded-by-a-client"])
def test_row6_a_load_finishing_between_observe_and_act_is_not_sent_again(
    make_node: MakeNode, tmp_path: Path, runs: list[_Run], keep_alive: int | str
) -> None:
    # Before: the plan from the older /api/ps sent the same load again, 3 runs out of 3.
    small = make_node("small", gpus_mib=(6144,), models=(LLAMA32,))  # the best fit: the plan picks it
    big = make_node("big", gpus_mib=(8192,), models=(LLAMA32,))
    polls = {"n": 0}

    def finish_load_out_of_band(node: Any) -> None:
        polls["n"] += 1
        if polls["n"] == 2:  # the first /api/ps is the observation; the second, the act's fresh look
            node.client_request(LLAMA32, keep_alive=keep_alive)

    small.on_request("/api/ps", finish_load_out_of_band, once=False)
    config = write_config(tmp_path / "config.yaml", [small, big], [LLAMA32], tmp_path / "state")
    run = DaemonRun(config, tmp_path)
    runs.append(run)
    wait_until(lambda: "action " in run.log_text(), what="the action's result")
    # The result starts the second reconcile at once (check_interval is 300 s here).
    wait_until(lambda: run.last_reconcile() >= 2, what="the reconcile after the action")
    assert polls["n"] >= 2, "the race never happened: the test proves nothing"
    events = [e for n in (small, big) for e in n.events()]
    loads = [e for e in events if e.kind in ("load", "reload") and e.model == LLAMA32]
    assert [(e.kind, e.model) for e in loads] == [("load", LLAMA32)], "a second load or replica"
    assert ps_entry(big, LLAMA32) is None, "a second replica where one was wanted"
    assert pinned_on_gpu(small, LLAMA32)
    sent = load_requests(small, LLAMA32)
    if keep_alive == -1:
        assert sent == [], "a load sent for a model already pinned"
    else:
        # Pinned where it is, at the context it runs with: a pin, not a reload.
        assert [b.get("keep_alive") for b in sent] == [-1]
    common_checks(run, [small, big], [LLAMA32], check_interval_s=300)


# --------------------------------------------------------------------------------------------- row 7


def test_row7_a_priority_model_loaded_with_a_short_keep_alive_is_re_pinned_before_it_expires(
    scenario: MakeScenario,
) -> None:
    # Before: counted as placed, never pinned; it expired and came back only after the watch noticed.
    s = scenario(check_interval="300s", watch_interval="0.5s")
    s.ok.clear_requests()
    s.ok.clear_events()
    s.ok.client_request(LLAMA32, keep_alive="6s")
    entry = ps_entry(s.ok, LLAMA32)
    assert entry is not None
    assert expires_year(entry) < 2300, "the client's keep_alive did not take: the test proves nothing"
    wait_until(lambda: pinned_on_gpu(s.ok, LLAMA32), timeout_s=5.0, what="the pin back before the expiry")
    kinds = [e.kind for e in s.ok.events() if e.model == LLAMA32]
    assert kinds == ["client"], f"it was unloaded or reloaded meanwhile: {kinds}"
    (pin,) = load_requests(s.ok, LLAMA32)
    context = ps_entry(s.ok, LLAMA32)["context_length"]  # type: ignore[index]
    assert pin["keep_alive"] == -1
    assert pin.get("options") == {"num_ctx": context}
    common_checks(s.run, s.nodes, s.priority, check_interval_s=300)


# --------------------------------------------------------------------------------------------- row 8


def test_row8_a_load_ending_partly_on_cpu_is_not_left_pinned(scenario: MakeScenario) -> None:
    # Before: logged as failed, but left loaded with keep_alive -1, holding the GPU for ever.
    # 0.13.0: /api/ps ``size`` of a partial load is its whole allocation there, so it can be learned
    # (the classic estimate's partial figure cannot: gpu_router.sizing.Sizer.learnable).
    s = scenario(
        bad_kw={"gpus_mib": (4096,), "version": "0.13.0"},
        bad_models=(LLAMA31, EMBED),
        bad_gpu={"vram_mb": [8192]},  # the config claims twice the card
        priority=(LLAMA32, LLAMA31),
    )
    wait_until(lambda: f"action load node=bad model={LLAMA31}" in s.run.log_text(), what="the load's result")
    s.run.wait_reconciles(3)
    restore_pin(s.run, s.ok, LLAMA32)
    text = s.run.log_text()
    assert f"action load node=bad model={LLAMA31} result=failed" in text
    assert "not fully on GPU; unloaded it again" in text
    assert ps_entry(s.bad, LLAMA31) is None, "the partial load was left loaded"
    assert_backed_off(s.run, s.bad, LLAMA31)
    digest = next(m.digest for m in s.bad.installed() if m.name == LLAMA31)
    load = next(e for e in s.bad.events() if e.kind == "load" and e.model == LLAMA31)
    size = int(load.detail.split("size=")[1].split()[0])  # what /api/ps said while it was loaded
    learned = json.loads((s.state_dir / "learned-sizes.json").read_text(encoding="utf-8"))["sizes"]
    mine = [e["size_bytes"] for e in learned if e["digest"] == digest.removeprefix("sha256:")]
    assert mine == [size], f"the real size of the partial load was not learned: {learned}"
    common_checks(s.run, s.nodes, [LLAMA32])


# --------------------------------------------------------------------------------------------- row 9


def test_row9_a_header_that_is_not_latin1_after_expansion_is_a_config_error(
    make_node: MakeNode, tmp_path: Path
) -> None:
    # Before: --check-config said OK; the report and the daemon died with UnicodeEncodeError.
    node = make_node("gpu-a", models=(LLAMA32,))
    config = write_config(tmp_path / "config.yaml", [node], [LLAMA32], tmp_path / "state")
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["nodes"][0]["headers"] = {"Authorization": "Bearer ${ROW9_TOKEN}"}
    config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    secret = "tøken→✓-Zq81x"  # "→" and "✓" are not Latin-1
    env = daemon_env(ROW9_TOKEN=secret)
    for args in (["--check-config"], ["--report-only"], ["--report-only", "--json"], ["--once"], []):
        result = run_cli(["--config", str(config), *args], env)
        out = result.stdout + result.stderr
        assert result.returncode == 78, (args, out)
        assert "nodes[0].headers.Authorization" in out, out
        assert "Latin-1" in out
        for part in (secret, "tøken", "Zq81x"):
            assert part not in out, f"{args}: the header value leaked"
        assert "Traceback" not in out
    assert node.requests == []


# --------------------------------------------------------------------------------------------- row 10


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        (Fault.PS_NEGATIVE, "ignored: a negative size"),
        (Fault.PS_HUGE, "ignored: an impossible size"),
        (Fault.PS_VRAM_OVER, "ignored: size_vram larger than size"),
        (Fault.PS_DUPLICATE, f"/api/ps lists {GEMMA} 2 times; kept the entry that expires last"),
    ],
    ids=["negative", "10^30", "vram-over-size", "duplicates"],
)
def test_row10_impossible_figures_are_rejected_not_learned_and_never_acted_on(
    scenario: MakeScenario, fault: Fault, said: str
) -> None:
    # Before: accepted as "observed", 10^30 learned, and a plan to unload and reload a priority
    # model already on GPU.
    s = scenario()
    sent_before = len(s.bad.mutating_requests())
    s.bad.set_fault(fault)
    s.run.wait_reconciles(4)
    restore_pin(s.run, s.ok, LLAMA32)
    assert len(s.bad.mutating_requests()) == sent_before, "the daemon acted on a node's impossible figures"
    assert pinned_on_gpu(s.bad, GEMMA)
    assert [e.kind for e in s.bad.events() if e.model == GEMMA] == ["load"]
    assert f"node bad: {said}" in s.run.log_text() or said in s.run.log_text()

    rc, _, stderr = _report(s.config)
    assert rc == 0
    assert said in stderr, "the report does not say what was wrong"
    learned = json.loads((s.state_dir / "learned-sizes.json").read_text(encoding="utf-8"))
    sizes = [v for v in _numbers(learned) if v > 1000]
    assert sizes, "nothing learned at all: the check below proves nothing"
    assert all(0 < v < 2**50 for v in sizes), f"an impossible size was learned: {sizes}"
    common_checks(s.run, s.nodes, s.priority)


def _numbers(obj: object) -> list[int]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int):
        return [obj]
    if isinstance(obj, dict):
        return [n for v in obj.values() for n in _numbers(v)]
    if isinstance(obj, list):
        return [n for v in obj for n in _numbers(v)]
    return []


def test_row7_a_re_pin_that_fails_is_left_to_the_backoff_not_retried_at_every_watch(
    scenario: MakeScenario,
) -> None:
    s = scenario(check_interval="300s", watch_interval="0.3s")
    s.ok.set_fault(Fault.HTTP500, paths=("/api/generate",))  # the re-pin will fail
    s.ok.client_request(LLAMA32, keep_alive="20s")
    wait_until(lambda: "not trying llama3.2:latest on ok again" in s.run.log_text(), what="the failed re-pin")
    before = s.run.last_reconcile()
    time.sleep(3.0)  # ten watches: each would start a reconcile if the drift were seen again and again
    assert s.run.last_reconcile() - before <= 1, "the watch kept asking for reconciles"
    assert len(load_attempts(s.ok, LLAMA32)) == 2  # the daemon's first load, and the one re-pin
    common_checks(s.run, s.nodes, s.priority, check_interval_s=300)
