"""Fault modes of the emulated nodes, over real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
import web
from daemon_helpers import MakeNode, wait_until

from gpu_router.emulator import EmulatedNode, EmulatorError, Fault
from gpu_router.emulator.faults import DCGM_INT64_NOT_SUPPORTED, bomb_inflated_bytes, gzip_bomb

T = 10.0


def get(node: EmulatedNode, path: str, *, timeout: float = T) -> web.Reply:
    return web.get(node.url + path, timeout=timeout)


def stream(node: EmulatedNode, path: str) -> web.Stream:
    return web.stream("GET", node.url + path, timeout=T)


def raw_get(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), T)
    sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    return sock


def read_headers(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "connection closed inside the headers"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def test_drip_sends_the_right_answer_a_little_at_a_time(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ("llama3.2",))
    whole = get(node, "/api/tags").content
    node.set_fault(Fault.DRIP, rate_bps=20, paths=("/api/tags",))
    sock = raw_get(node.port, "/api/tags")
    try:
        head, body = read_headers(sock)
        assert f"Content-Length: {len(whole)}".encode() in head
        deadline = time.monotonic() + 0.3
        while len(body) < len(whole) and time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                break
            if not chunk:
                break
            body += chunk
        # At 20 bytes a second the body is still coming in; what came is the real body's start.
        assert 0 < len(body) < len(whole)
        assert whole.startswith(body)
    finally:
        sock.close()
    # Other paths are not dripped, and a fast drip completes with the exact body.
    assert get(node, "/api/version").json() == {"version": "0.12.6"}
    node.set_fault(Fault.DRIP, rate_bps=100_000)
    assert get(node, "/api/tags").content == whole


def test_drip_on_the_exporter(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ())
    whole = web.get(node.metrics_url, timeout=T).text
    node.set_fault(Fault.DRIP, rate_bps=200_000, paths=("/metrics",))
    assert web.get(node.metrics_url, timeout=T).text == whole


def test_huge_body_is_generated_not_held(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ())
    node.set_fault(Fault.HUGE_BODY, paths=("/api/tags",))
    r = stream(node, "/api/tags")
    assert r.headers["Content-Length"] == "200000000"
    first = next(r.iter_content(65536))
    assert first.startswith(b'{"models":[{"name":"')
    r.close()
    node.set_fault(Fault.HUGE_BODY, size_bytes=3_000_000)
    r = stream(node, "/api/ps")
    assert sum(len(c) for c in r.iter_content(65536)) == 3_000_000


def test_gzip_bomb_is_small_on_the_wire_and_huge_inflated(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ())
    node.set_fault(Fault.GZIP_BOMB, paths=("/api/ps",))
    r = stream(node, "/api/ps")
    assert r.headers["Content-Encoding"] == "gzip"
    wire = r.read()
    assert len(wire) < 3 * 1024 * 1024
    inflater = zlib.decompressobj(31)
    out = inflater.decompress(wire[:200_000], 50_000_000)
    assert out.startswith(b'{"models":[    ')
    assert len(out) > 100 * 200_000  # more than a hundredfold, from a fifth of a megabyte
    assert bomb_inflated_bytes() > 2 * 1024**3


@pytest.mark.slow
def test_gzip_bomb_is_a_valid_gzip_stream() -> None:
    inflater = zlib.decompressobj(31)  # checks the CRC32 and size in the trailer at the end
    total = 0
    for piece in gzip_bomb():
        data = inflater.decompress(piece)
        while data:
            total += len(data)
            data = inflater.decompress(inflater.unconsumed_tail)
    inflater.flush()
    assert inflater.eof
    assert total == bomb_inflated_bytes()


def test_deep_json_non_utf8_and_html_pages(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ())
    node.set_fault(Fault.DEEP_JSON)
    body = get(node, "/api/ps").content
    assert body == b"[" * 200_000
    with pytest.raises(RecursionError):
        json.loads(body)
    node.set_fault(Fault.NON_UTF8)
    with pytest.raises(UnicodeDecodeError):
        get(node, "/api/ps").content.decode("utf-8")
    node.set_fault(Fault.HTML_ERROR)
    r = get(node, "/api/ps")
    assert (r.status_code, r.headers["content-type"]) == (502, "text/html")
    assert "<title>502 Bad Gateway</title>" in r.text
    node.set_fault(Fault.HTML_ERROR, status=504)
    assert get(node, "/api/tags").status_code == 504


class _Recorder(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        _Recorder.hits.append(self.path)
        body = b'{"models":[]}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def other_host() -> Iterator[HTTPServer]:
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.hits = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_redirect_points_at_another_host(make_node: MakeNode, other_host: HTTPServer) -> None:
    node = make_node("n", (8192,), ())
    target = f"http://127.0.0.1:{other_host.server_address[1]}/elsewhere"
    node.set_fault(Fault.REDIRECT, location=target, paths=("/api/ps",))
    with stream(node, "/api/ps") as r:  # a raw client: gpu-router's transport refuses redirects
        assert (r.status_code, r.headers["Location"]) == (302, target)
    assert _Recorder.hits == []
    # A client that follows redirects would end up on the other host: the redirect is real.
    assert web.get(target, timeout=T).json() == {"models": []}
    assert _Recorder.hits == ["/elsewhere"]
    node.set_fault(Fault.REDIRECT, status=307, location=target)
    with stream(node, "/api/tags") as r:
        assert r.status_code == 307
    with pytest.raises(EmulatorError, match="3xx"):
        node.set_fault(Fault.REDIRECT, status=200)


@pytest.mark.parametrize(
    ("fault", "check"),
    [
        (Fault.PS_DUPLICATE, lambda ms: len(ms) == 2 and ms[0] == ms[1]),
        (Fault.PS_NEGATIVE, lambda ms: ms[0]["size"] < 0 and ms[0]["size_vram"] < 0),
        (Fault.PS_HUGE, lambda ms: ms[0]["size"] == ms[0]["size_vram"] == 10**30),
        (Fault.PS_VRAM_OVER, lambda ms: ms[0]["size_vram"] > ms[0]["size"] > 0),
    ],
)
def test_ps_anomalies(make_node: MakeNode, fault: Fault, check: Any) -> None:
    node = make_node("n", (8192,), ("llama3.2",))
    node.set_fault(fault)
    fake = get(node, "/api/ps").json()["models"]  # nothing loaded: an installed model is bent
    assert check(fake)
    node.load("llama3.2")
    assert check(get(node, "/api/ps").json()["models"])
    assert node.loaded()[0]["size"] > 0  # the node's own state is unharmed
    assert get(node, "/api/tags").status_code == 200  # only /api/ps


def test_exporter_down_while_ollama_answers(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ())
    url = node.metrics_url
    assert web.get(url, timeout=T).status_code == 200
    node.set_fault(Fault.EXPORTER_DOWN)
    with pytest.raises(web.Unreachable):
        web.get(url, timeout=T)
    assert get(node, "/api/version").status_code == 200
    node.clear_fault()
    assert node.metrics_url == url
    assert web.get(url, timeout=T).status_code == 200


def test_exporter_sentinels_and_xid_errors(make_node: MakeNode) -> None:
    node = make_node("n", (8192, 8192), ())
    node.set_fault(Fault.EXPORTER_SENTINEL)
    lines = web.get(node.metrics_url, timeout=T).text.splitlines()
    free = [line for line in lines if line.startswith("DCGM_FI_DEV_FB_FREE{")]
    assert len(free) == 2
    assert all(line.endswith(f" {DCGM_INT64_NOT_SUPPORTED}") for line in free)
    node.clear_fault()

    def xid(gpu: int) -> int:
        text = web.get(node.metrics_url, timeout=T).text
        [line] = [
            ln
            for ln in text.splitlines()
            if ln.startswith("DCGM_FI_DEV_XID_ERRORS{") and f'gpu="{gpu}"' in ln
        ]
        return int(line.rsplit(" ", 1)[1])

    assert (xid(0), xid(1)) == (0, 0)
    node.raise_xid(1, 79)
    assert (xid(0), xid(1)) == (0, 79)
    with pytest.raises(EmulatorError, match="no GPU 2"):
        node.raise_xid(2)


def test_counted_stacked_and_selectively_cleared_faults(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ("llama3.2",))
    node.set_fault(Fault.HTTP500, paths=("/api/generate",), count=2)
    statuses = [
        web.post(node.url + "/api/generate", json={"model": "llama3.2"}, timeout=T).status_code
        for _ in range(3)
    ]
    assert statuses == [500, 500, 200]
    assert node.faults() == []
    node.set_fault(Fault.PS_DUPLICATE)
    node.add_fault(Fault.EXPORTER_DOWN)
    assert node.faults() == [Fault.PS_DUPLICATE, Fault.EXPORTER_DOWN]
    assert len(get(node, "/api/ps").json()["models"]) == 2
    with pytest.raises(web.Unreachable):
        web.get(node.metrics_url, timeout=T)
    node.clear_fault(Fault.EXPORTER_DOWN)
    assert web.get(node.metrics_url, timeout=T).status_code == 200
    assert len(get(node, "/api/ps").json()["models"]) == 2
    with pytest.raises(EmulatorError):
        node.set_fault(Fault.DRIP, rate_bps=0)


def test_a_faulted_request_changes_nothing(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ("llama3.2",))
    for fault in (Fault.HTTP500, Fault.NON_UTF8, Fault.HTML_ERROR, Fault.REDIRECT):
        node.set_fault(fault, paths=("/api/generate",))
        with web.stream("POST", node.url + "/api/generate", json={"model": "llama3.2"}, timeout=T) as r:
            r.read()
    assert node.loaded() == []
    assert len(node.mutating_requests()) == 4  # recorded all the same


def test_on_request_hooks(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ("llama3.2",))
    seen: list[str] = []
    node.on_request("/api/ps", lambda n: seen.append(n.name), once=False)
    node.on_request("/api/ps", lambda n: 1 / 0)  # a broken hook is logged, the request answered
    assert get(node, "/api/ps").status_code == 200
    assert get(node, "/api/ps").status_code == 200
    assert seen == ["n", "n"]
    node.clear_hooks()
    get(node, "/api/ps")
    assert seen == ["n", "n"]


def test_hang_then_clear_answers(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ())
    node.set_fault(Fault.HANG, paths=("/api/ps",))
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(get(node, "/api/ps").status_code))
    thread.start()
    wait_until(lambda: any(r.path == "/api/ps" for r in node.requests), what="the request to arrive")
    assert result == []
    node.clear_fault()
    thread.join(T)
    assert result == [200]
