"""ca_file and tls_verify go from the config to the node's Ollama client and its exporter, over real TLS."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from rawserver import CA_FILE, RawServer, Request, response, serve_requests, server_tls_context

from gpu_router.config import parse_config
from gpu_router.gpus import make_gpu_source
from gpu_router.observe import observe_once
from gpu_router.state import NodeStatus

SCRAPE = (
    b'DCGM_FI_DEV_FB_FREE{gpu="0",UUID="GPU-1",modelName="NVIDIA L4"} 20000\n'
    b'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-1",modelName="NVIDIA L4"} 2000\n'
)


def answer(req: Request) -> bytes:
    path = req.target.split("?")[0]
    if path == "/metrics":
        return response(200, SCRAPE, headers={"Content-Type": "text/plain"})
    bodies = {"/api/ps": {"models": []}, "/api/tags": {"models": []}, "/api/version": {"version": "0.12.6"}}
    return response(200, json.dumps(bodies.get(path, {})).encode())


@pytest.fixture
def server() -> Iterator[RawServer]:
    s = RawServer(serve_requests(answer), tls=server_tls_context())
    yield s
    s.close()


def node_config(server: RawServer, extra: str) -> str:
    url = server.url.replace("127.0.0.1", "localhost")
    return f"nodes:\n  - url: {url}\n    gpu: {{exporter: {url}/metrics}}\n{extra}request_timeout: 2\n"


def test_ca_file_is_used_for_the_node_and_its_exporter(server: RawServer) -> None:
    config = parse_config(node_config(server, f"    ca_file: {CA_FILE}\n"), "c.yaml", environ={})
    (node,) = observe_once(config).nodes
    assert node.status is NodeStatus.UP, node.error
    assert node.gpu.error is None
    assert [g.total_bytes for g in node.gpu.gpus] == [22000 * 2**20]


def test_without_the_ca_the_certificate_is_refused(server: RawServer) -> None:
    config = parse_config(node_config(server, ""), "c.yaml", environ={})
    (node,) = observe_once(config).nodes
    assert node.status is NodeStatus.DEGRADED
    assert node.error is not None
    assert "certificate" in node.error
    # The exporter on its own: within observe, a failed node's GPU reading is not waited for.
    reading = make_gpu_source(config.nodes[0], config.request_timeout_s).read()
    assert reading.error is not None
    assert "certificate" in reading.error


def test_tls_verify_false_is_allowed_and_said_once(
    server: RawServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = parse_config(node_config(server, "    tls_verify: false\n"), "c.yaml", environ={})
    with caplog.at_level(logging.WARNING):
        (node,) = observe_once(config).nodes
    assert node.status is NodeStatus.UP, node.error
    warnings = [r for r in caplog.records if "verification is off" in r.getMessage()]
    assert len(warnings) == 2  # one for the node's client, one for its exporter's; none per request
    assert all(r.levelno == logging.WARNING for r in warnings)


def test_ca_file_must_exist(tmp_path: Path) -> None:
    from gpu_router.config import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config(
            f"nodes:\n  - url: https://localhost:1\n    ca_file: {tmp_path}/none.pem\n", "c.yaml", environ={}
        )
    assert "ca_file" in str(err.value)
