"""The one-shot report and the inspection commands, against emulated nodes on 127.0.0.1."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_router.cli import main
from gpu_router.config import load_config
from gpu_router.emulator import EmulatedCluster, EmulatedNode, Fault
from gpu_router.observe import Observer
from gpu_router.planner import plan
from gpu_router.report import build_report, render, report_tables

ANSI = re.compile(r"\x1b\[")


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmulatedCluster]:
    nodes = [
        EmulatedNode(
            "gpu-a",
            gpus_mib=(8192,),
            metrics=True,
            models=("llama3.2:latest", "nomic-embed-text:latest", "qwen2.5:14b"),
        ),
        EmulatedNode("cpu", gpus_mib=(), models=("nomic-embed-text:latest", "all-minilm:latest")),
        EmulatedNode("static", gpus_mib=(4096,), models=("all-minilm:latest", "llama3.2:latest")),
        EmulatedNode("refused", gpus_mib=(8192,), models=("llama3.2:latest",)),
        EmulatedNode("hangs", gpus_mib=(8192,), models=("llama3.2:latest",)),
        EmulatedNode("broken", gpus_mib=(8192,), models=("llama3.2:latest",)),
        EmulatedNode("garbage", gpus_mib=(8192,), models=("llama3.2:latest",)),
    ]
    with EmulatedCluster(nodes) as c:
        c["gpu-a"].load("llama3.2:latest", keep_alive=-1)
        c["cpu"].load("nomic-embed-text:latest", keep_alive=-1)
        c["refused"].set_fault(Fault.REFUSE)
        c["hangs"].set_fault(Fault.HANG)
        c["broken"].set_fault(Fault.HTTP500)
        c["garbage"].set_fault(Fault.GARBAGE)
        yield c


@pytest.fixture(scope="module")
def config_path(cluster: EmulatedCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cfg")
    lines = ["nodes:"]
    for n in cluster.nodes:
        lines += [f"  - url: {n.url}", f"    name: {n.name}"]
        if n.name == "gpu-a":
            lines.append(f"    gpu: {{exporter: {n.metrics_url}}}")
        elif n.name == "cpu":
            lines.append("    gpu: none")
        elif n.name == "static":
            lines.append("    gpu: {vram_mb: [4096]}")
        else:
            lines.append("    gpu: {vram_mb: [8192]}")
    lines += [
        "priority_models:",
        "  - nomic-embed-text",
        "  - llama3.2",
        "request_timeout: 1",
        f"state_dir: {d / 'state'}",
    ]
    path = d / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def report_json(cluster: EmulatedCluster, config_path: Path) -> dict:
    for n in cluster.nodes:
        n.clear_requests()
    out = io.StringIO()
    assert main(["--config", str(config_path), "--report-only", "--json"], out=out) == 0
    return json.loads(out.getvalue())


def node_json(report: dict, name: str) -> dict:
    return next(n for n in report["nodes"] if n["name"] == name)


def model_json(report: dict, name: str) -> dict:
    return next(m for m in report["models"] if m["model"] == name)


def test_report_json_has_the_keys_scripts_rely_on(report_json: dict) -> None:
    node_keys = {
        "name",
        "url",
        "status",
        "error",
        "vram_source",
        "gpus",
        "usable_vram_bytes",
        "free_vram_bytes",
        "loaded",
    }
    for n in report_json["nodes"]:
        assert node_keys <= n.keys()
        for g in n["gpus"]:
            assert {"index", "name", "total_bytes", "used_bytes", "free_bytes"} <= g.keys()
        for m in n["loaded"]:
            assert {"model", "size_bytes", "vram_bytes", "processor"} <= m.keys()
            assert m["processor"] in ("gpu", "cpu", "partial")
    for m in report_json["models"]:
        assert {"model", "priority", "need_bytes", "size_source", "decision", "fits"} <= m.keys()
        assert m["size_source"] in ("observed", "estimated", "file", "unknown")
        assert {"placement", "node", "reason"} <= m["decision"].keys()
        assert m["decision"]["placement"] in ("gpu", "cpu", "none")
        for f in m["fits"]:
            assert {"node", "fits", "reason"} <= f.keys()


def test_every_node_state_is_reported_with_its_reason(report_json: dict) -> None:
    status = {n["name"]: (n["status"], n["error"] or "") for n in report_json["nodes"]}
    assert status["gpu-a"] == ("up", "")
    assert status["refused"][0] == "down"
    assert "connection refused" in status["refused"][1]
    assert status["hangs"][0] == "down"
    assert "timed out after 1s" in status["hangs"][1]
    assert status["broken"][0] == "degraded"
    assert "HTTP 500" in status["broken"][1]
    assert status["garbage"][0] == "degraded"
    assert "invalid JSON" in status["garbage"][1]
    assert report_json["summary"]["nodes_down"] == ["refused", "hangs", "broken", "garbage"]


def test_gpu_sources_and_usable_vram(report_json: dict) -> None:
    a = node_json(report_json, "gpu-a")
    assert (a["vram_source"], a["vram_source_detail"]) == ("exporter", "dcgm-exporter")
    assert {"healthy", "health_reason", "utilization_ratio", "temperature_c", "integrated"} <= a["gpus"][
        0
    ].keys()
    assert (a["gpus"][0]["healthy"], a["gpus"][0]["integrated"]) == (True, False)
    total = a["gpus"][0]["total_bytes"]
    # dcgm-exporter reports whole MiB (free + used + reserved), so a MiB can be lost to rounding
    assert abs(total - 8192 * 2**20) <= 2**20
    assert a["usable_vram_bytes"] == int(total * 0.8)
    # what the exporter says is used (the pinned llama3.2) comes off the usable figure
    assert a["free_vram_bytes"] == a["usable_vram_bytes"] - a["gpus"][0]["used_bytes"]
    cpu = node_json(report_json, "cpu")
    assert (cpu["vram_source"], cpu["gpus"], cpu["usable_vram_bytes"]) == ("none", [], 0)  # known: no VRAM
    assert cpu["vram_source_detail"] == "none"
    static = node_json(report_json, "static")
    assert (static["vram_source"], static["vram_source_detail"]) == ("static", "static")
    assert static["gpus"][0]["used_bytes"] is None


def test_loaded_models_and_processor(report_json: dict) -> None:
    (m,) = node_json(report_json, "gpu-a")["loaded"]
    assert (m["model"], m["processor"], m["pinned"]) == ("llama3.2:latest", "gpu", True)
    (e,) = node_json(report_json, "cpu")["loaded"]
    assert (e["model"], e["processor"], e["processor_label"]) == (
        "nomic-embed-text:latest",
        "cpu",
        "100% CPU",
    )


def test_decisions_and_verdicts(report_json: dict) -> None:
    llama = model_json(report_json, "llama3.2:latest")
    assert llama["priority"] is True
    assert llama["size_source"] == "observed"
    assert llama["decision"]["placement"] == "gpu"
    assert llama["decision"]["node"] == "gpu-a"
    embed = model_json(report_json, "nomic-embed-text:latest")
    assert embed["size_source"] == "estimated"
    assert embed["capabilities"] == ["embedding"]
    assert embed["decision"] == {
        "placement": "gpu",
        "node": "gpu-a",
        "nodes": ["gpu-a"],
        "reason": "load on gpu-a",
    }
    verdicts = {f["node"]: f for f in embed["fits"]}
    assert verdicts["cpu"]["fits"] is False
    assert verdicts["cpu"]["reason"] == "CPU-only node"
    assert verdicts["refused"]["verdict"] == "node_down"
    assert verdicts["static"]["verdict"] == "not_installed"
    big = model_json(report_json, "qwen2.5:14b")
    assert {f["node"]: f["verdict"] for f in big["fits"]}["gpu-a"] == "too_large"
    assert big["decision"]["placement"] == "none"
    assert report_json["actions"] == [
        {
            "action": "load",
            "node": "gpu-a",
            "model": "nomic-embed-text:latest",
            "reason": "priority model not on GPU anywhere",
            "endpoint": "/api/embed",
        }
    ]


def test_report_only_sends_no_mutating_request(cluster: EmulatedCluster, report_json: dict) -> None:
    assert report_json["actions"]  # there was something it would have done
    seen = [r for n in cluster.nodes for r in n.requests]
    assert seen, "the report asked nothing"
    assert [r for n in cluster.nodes for r in n.mutating_requests()] == []
    assert {(r.method, r.path) for r in seen} <= {
        ("GET", "/api/ps"),
        ("GET", "/api/tags"),
        ("GET", "/api/version"),
        ("POST", "/api/show"),
        ("GET", "/metrics"),
    }


def test_plain_text_in_a_pipe(config_path: Path) -> None:
    out = io.StringIO()
    assert main(["--config", str(config_path), "--report-only"], out=out) == 0
    text = out.getvalue()
    assert not ANSI.search(text)
    assert not any(ch in text for ch in "┏━│└")
    assert "Nodes\nNODE" in text
    assert re.search(r"^refused\s+down: GET /api/ps: connection refused", text, re.M)
    # SOURCE says which exporter answered
    assert re.search(r"^gpu-a\s+up\s+dcgm-exporter\s+0: \S.* 8\.0 GiB ", text, re.M)
    assert re.search(r"^static\s+up\s+static\s+0: static 4\.0 GiB ", text, re.M)
    assert re.search(r"^llama3.2:latest\s+yes\s+", text, re.M)
    assert "Actions the daemon would take" in text
    assert text.rstrip().endswith(
        "3/7 nodes up, 1/2 priority models on GPU, down: refused, hangs, broken, garbage"
    )


def test_rich_tables_for_a_terminal(cluster: EmulatedCluster, config_path: Path) -> None:
    config = load_config(config_path)
    obs = Observer(config)
    try:
        state = obs.observe()
    finally:
        obs.close()
    out = io.StringIO()
    render(report_tables(build_report(state, plan(state, config))), out, rich=True)
    text = out.getvalue()
    assert "┃ NODE" in text or "│ NODE" in text
    assert "gpu-a" in text
    assert "Models" in text


def test_json_goes_alone_on_stdout_and_warnings_to_stderr(config_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "gpu_router", "--config", str(config_path), "--report-only", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert len(data["nodes"]) == 7
    assert "node refused is down" in r.stderr
    assert "Traceback" not in r.stderr


def test_route_explains_the_choice(config_path: Path) -> None:
    out = io.StringIO()
    assert main(["route", "nomic-embed-text", "--config", str(config_path), "--json"], out=out) == 0
    m = json.loads(out.getvalue())
    assert m["decision"]["node"] == "gpu-a"
    assert {f["node"] for f in m["fits"]} == {
        "gpu-a",
        "cpu",
        "static",
        "refused",
        "hangs",
        "broken",
        "garbage",
    }
    text = io.StringIO()
    assert main(["--config", str(config_path), "route", "nomic-embed-text"], out=text) == 0
    assert "nomic-embed-text:latest: GPU on gpu-a" in text.getvalue()


def test_check_lists_nodes_that_fit_with_numbers(config_path: Path) -> None:
    out = io.StringIO()
    assert main(["check", "llama3.2", "--config", str(config_path), "--json"], out=out) == 0
    data = json.loads(out.getvalue())
    # Resident on gpu-a (3.1 GiB in /api/ps). static has the same version and settings, so that size
    # counts there too, plus what Ollama's classic fit test keeps free beside it (the partial graph
    # over the full one): 3.4 GiB, more than static's 3.2 GiB usable.
    assert data["fits_on"] == ["gpu-a"]
    static = next(n for n in data["nodes"] if n["node"] == "static")
    assert static["usable_vram_bytes"] == int(4096 * 2**20 * 0.8)
    assert static["verdict"] == "too_large"
    assert data["size_source"] == "observed"
    assert static["need_bytes"] > int(4096 * 2**20 * 0.8)
    text = io.StringIO()
    main(["check", "llama3.2", "--config", str(config_path)], out=text)
    assert "llama3.2:latest fits on GPU on: gpu-a" in text.getvalue()


def test_models_lists_every_model(config_path: Path) -> None:
    out = io.StringIO()
    assert main(["models", "--config", str(config_path), "--json"], out=out) == 0
    models = {m["model"]: m for m in json.loads(out.getvalue())["models"]}
    assert set(models) == {"llama3.2:latest", "nomic-embed-text:latest", "qwen2.5:14b", "all-minilm:latest"}
    assert models["all-minilm:latest"]["installed_on"] == ["cpu", "static"]
    assert models["qwen2.5:14b"]["file_bytes"] > 8 * 10**9


def test_unknown_model_is_a_clear_error(config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", "nope", "--config", str(config_path)], out=io.StringIO()) == 1
    assert "model 'nope:latest' is not installed on any node that is up" in capsys.readouterr().err


def test_check_config(config_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert main(["--config", str(config_path), "--check-config"], out=out) == 0
    assert "OK (7 nodes, 2 priority models)" in out.getvalue()
    env = tmp_path / "env.yaml"
    env.write_text(
        "nodes:\n  - url: http://127.0.0.1:1\n    name: a\n"
        "    ollama_env: {OLLAMA_HOST: 0.0.0.0, OLLAMA_NUM_PARALLEL: 2}\n"
        "ollama_env: {OLLAMA_MODELS: /srv/models, OLLAMA_CONTEXT_LENGTH: 8192}\n"
    )
    out = io.StringIO()
    assert main(["--config", str(env), "--check-config"], out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[1:] == [
        f"{env}: ollama_env: OLLAMA_MODELS is not used for sizing (accepted, ignored)",
        f"{env}: nodes[a].ollama_env: OLLAMA_HOST is not used for sizing (accepted, ignored)",
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  - http://127.0.0.1:1\ncheck_intervall: 5\n")
    assert main(["--config", str(bad), "--check-config"], out=io.StringIO()) == 78
    err = capsys.readouterr().err
    assert f"{bad}:3: check_intervall: " in err
    assert "did you mean 'check_interval'" in err


def test_no_config_anywhere_says_how_to_make_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GPU_ROUTER_CONFIG", raising=False)
    monkeypatch.delenv("CONFIGURATION_DIRECTORY", raising=False)
    if Path("/etc/gpu-router/config.yaml").exists():
        pytest.skip("this machine has a system config")
    assert main(["--report-only"], out=io.StringIO()) == 78
    err = capsys.readouterr().err
    assert "/etc/gpu-router/config.yaml" in err
    assert "Traceback" not in err


def test_a_down_node_still_gives_a_report_and_exit_0(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("nodes:\n  - http://127.0.0.1:9\nrequest_timeout: 1\n")
    out = io.StringIO()
    assert main(["--config", str(cfg), "--report-only", "--json"], out=out) == 0
    (n,) = json.loads(out.getvalue())["nodes"]
    assert n["status"] == "down"


def test_auto_gpu_on_this_machine_without_a_driver_is_unknown(
    cluster: EmulatedCluster, tmp_path: Path
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"nodes:\n  - {cluster['gpu-a'].url}\nstate_dir: {tmp_path}\n")
    out = io.StringIO()
    assert main(["--config", str(cfg), "--report-only", "--json"], out=out) == 0
    (n,) = json.loads(out.getvalue())["nodes"]
    assert n["vram_source"] in ("unknown", "nvml")  # nvml only where a GPU driver exists
    if n["vram_source"] == "unknown":
        assert "NVML" in n["vram_error"]


def test_show_is_asked_once_per_model_digest(cluster: EmulatedCluster, config_path: Path) -> None:
    config = load_config(config_path)
    obs = Observer(config)
    try:
        for n in cluster.nodes:
            n.clear_requests()
        obs.observe()
        first = sum(1 for n in cluster.nodes for r in n.requests if r.path == "/api/show")
        obs.observe()
        second = sum(1 for n in cluster.nodes for r in n.requests if r.path == "/api/show")
    finally:
        obs.close()
    # 4 distinct models, each shown once although several are on more than one node
    assert first == 4
    assert second == first


def test_demo_runs_the_report_against_the_emulated_cluster() -> None:
    out = io.StringIO()
    assert main(["demo", "--json"], out=out) == 0
    data = json.loads(out.getvalue())
    assert [n["name"] for n in data["nodes"]] == ["gpu-small", "cpu-only", "gpu-8g"]
    assert all(n["status"] == "up" for n in data["nodes"])
    assert data["actions"]


def test_a_bad_log_level_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--log-level", "loud", "demo"], out=io.StringIO())
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'loud' is not one of DEBUG, INFO, WARNING, ERROR" in err
    assert "Traceback" not in err


def test_version_is_asked_once_and_again_after_the_node_was_down(tmp_path: Path) -> None:
    with EmulatedNode("v", gpus_mib=(4096,), models=("all-minilm:latest",)) as node:
        node.start()
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"nodes:\n  - {node.url}\nrequest_timeout: 1\nstate_dir: {tmp_path}\n")
        clock = [1000.0]
        obs = Observer(load_config(cfg), monotonic=lambda: clock[0])
        try:

            def versions() -> int:
                return sum(1 for r in node.requests if r.path == "/api/version")

            assert obs.observe().nodes[0].version == "0.12.6"
            obs.observe()
            assert versions() == 1
            node.set_fault(Fault.REFUSE)
            assert obs.observe().nodes[0].status.value == "degraded"  # one lost poll: down after 2
            assert obs.observe().nodes[0].status.value == "down"
            node.clear_fault()
            clock[0] += 300  # past the down node's backoff
            assert obs.observe().nodes[0].version == "0.12.6"
            assert versions() == 2
        finally:
            obs.close()


def test_the_json_turns_back_into_the_same_typed_report(cluster: EmulatedCluster, config_path: Path) -> None:
    # `status` reads the daemon's JSON back into the records the tables are drawn from.
    from gpu_router.report import Report

    config = load_config(config_path)
    obs = Observer(config)
    try:
        state = obs.observe()
    finally:
        obs.close()
    report = build_report(state, plan(state, config))
    doc = json.loads(json.dumps(report.to_json()))
    assert Report.from_json(doc) == report
    assert "replicas_wanted" in next(m for m in doc["models"] if m["priority"])
    assert "replicas_wanted" not in next(m for m in doc["models"] if not m["priority"])
    with pytest.raises(ValueError, match="not a gpu-router report"):
        Report.from_json({"version": "x"})
    with pytest.raises(ValueError, match="not a gpu-router report"):
        Report.from_json({**doc, "nodes": [{"name": 3}]})
