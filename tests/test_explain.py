"""gpu-router explain: the need on every node, part by part, with the reasons, against the emulator."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_router.cli import main
from gpu_router.emulator import EmulatedCluster, EmulatedNode

MODEL = "llama3.2:latest"


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    nodes = [
        EmulatedNode("big", gpus_mib=(24576,), metrics=True, models=(MODEL,), version="0.16.1"),
        EmulatedNode("small", gpus_mib=(8192,), metrics=True, models=(MODEL,), version="0.12.6"),
    ]
    d = tmp_path_factory.mktemp("explain")
    with EmulatedCluster(nodes) as c:
        lines = ["nodes:"]
        for n in c.nodes:
            lines += [f"  - url: {n.url}", f"    name: {n.name}", f"    gpu: {{exporter: {n.metrics_url}}}"]
        lines += ["  - url: http://127.0.0.1:9", "    name: gone", "    gpu: none"]
        lines += ["ollama_env: {OLLAMA_NUM_PARALLEL: 2}", "request_timeout: 1", f"state_dir: {d}"]
        path = d / "config.yaml"
        path.write_text("\n".join(lines) + "\n")
        yield path


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def test_every_node_gets_its_own_context_parts_and_era(config_path: Path) -> None:
    rc, text = run("explain", "llama3.2", "--config", str(config_path), "--json")
    assert rc == 0
    data = json.loads(text)
    assert data["model"] == MODEL
    by = {n["node"]: n for n in data["nodes"]}
    assert list(by) == ["big", "small", "gone"]
    big, small = by["big"], by["small"]
    # v0.16.1 on 24 GiB: the VRAM tier gives 32768 (server/routes.go@v0.15.5); v0.12.6: 4096.
    assert (big["context_length"], big["era"], big["version"]) == (32768, "layout", "0.16.1")
    assert (small["context_length"], small["era"], small["version"]) == (4096, "mixed", "0.12.6")
    assert "VRAM" in big["context_reason"]
    for n in (big, small):
        assert n["num_parallel"] == 2  # OLLAMA_NUM_PARALLEL from the config
        assert "OLLAMA_NUM_PARALLEL" in n["parallel_reason"]
        parts = sum(
            n[k]
            for k in (
                "weights_bytes",
                "kv_bytes",
                "graph_bytes",
                "projector_bytes",
                "reserve_bytes",
                "buffer_bytes",
            )
        )
        assert n["need_bytes"] == parts
        assert n["source"] == "estimated"
        assert n["verdict"] in ("fits", "no_room", "too_large")
    assert big["need_bytes"] > small["need_bytes"]
    assert by["gone"]["status"] == "down"


def test_the_table_and_one_node(config_path: Path) -> None:
    rc, text = run("explain", "llama3.2", "--node", "small", "--config", str(config_path))
    assert rc == 0
    assert "llama3.2:latest: VRAM needed per node" in text
    assert "small" in text
    assert "big" not in text.splitlines()[1]
    for row in ("why that context", "weights", "KV", "graph", "reserve", "NEED", "pre-load check", "verdict"):
        assert row in text, row


def test_unknown_model_or_node_is_a_clear_error(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("explain", "nope", "--config", str(config_path))[0] == 1
    assert "model 'nope:latest' is not installed" in capsys.readouterr().err
    assert run("explain", MODEL, "--node", "nowhere", "--config", str(config_path))[0] == 2
    assert "no node is named 'nowhere'" in capsys.readouterr().err
