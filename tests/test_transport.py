"""gpu_router.transport over real sockets on 127.0.0.1, against servers that misbehave on purpose.

Elapsed times are checked only as sanity bounds (did it stop at the deadline rather than wait for the
whole drip?), never as performance figures: those live in bench/bench_http.py.
"""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from collections.abc import Callable

import pytest
from rawserver import (
    CA_FILE,
    Conn,
    Request,
    Serve,
    chunked,
    forward_proxy,
    response,
    serve_requests,
)
from rawserver import server_tls_context as tls_context

from gpu_router.transport import (
    BodyTooLarge,
    ConnectFailed,
    ConnectionLost,
    HttpClient,
    InvalidResponse,
    ProxyConfig,
    RedirectRefused,
    TimedOut,
    TlsFailed,
    encode_headers,
)

MIB = 1024 * 1024
SLACK_S = 2.0  # generous: these machines are shared and noisy


def ok_json(req: Request) -> bytes:
    return response(200, json.dumps({"path": req.target, "method": req.method}).encode())


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- the ordinary path ---------------------------------------------------------------------------------


def test_get_and_post_send_what_they_should(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(serve_requests(ok_json))
    client = clients(server.url + "/prefix/", headers={"X-Cluster": "lab"})
    got = client.request("GET", "/api/ps")
    assert (got.status, got.reason, json.loads(got.body)) == (
        200,
        "OK",
        {"path": "/prefix/api/ps", "method": "GET"},
    )
    assert got.headers["content-type"] == "application/json"
    client.request("POST", "/api/show", json_body={"model": "llama3.2"})
    get, post = server.requests
    assert get.body == b""
    assert "content-length" not in get.headers
    assert get.headers["host"] == f"127.0.0.1:{server.port}"
    assert get.headers["accept-encoding"] == "identity"
    assert get.headers["x-cluster"] == "lab"
    assert (post.method, post.target) == ("POST", "/prefix/api/show")
    assert json.loads(post.body) == {"model": "llama3.2"}
    assert post.headers["content-type"] == "application/json"
    assert post.headers["content-length"] == str(len(post.body))


def test_error_statuses_are_returned_not_raised(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(serve_requests(lambda req: response(503, b'{"error":"server busy"}', reason="Busy")))
    got = clients(server.url).request("GET", "/api/ps")
    assert (got.status, got.reason, got.body) == (503, "Busy", b'{"error":"server busy"}')


def test_keep_alive_reuses_one_connection(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(serve_requests(ok_json))
    client = clients(server.url)
    for i in range(20):
        assert client.request("GET", f"/n/{i}").status == 200
    assert server.connections == 1
    assert [r.target for r in server.requests] == [f"/n/{i}" for i in range(20)]


def test_concurrent_callers_each_get_a_connection(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    gate = threading.Barrier(4)

    def slow_answer(req: Request) -> bytes:
        time.sleep(0.05)
        return ok_json(req)

    server = serve(serve_requests(slow_answer))
    client = clients(server.url, max_idle_connections=4)
    results: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        gate.wait(5)
        for _ in range(5):
            status = client.request("GET", "/api/ps").status
            with lock:
                results.append(status)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [200] * 20
    assert 1 <= server.connections <= 4  # pooled: never one per call


def test_chunked_body_with_extensions_and_trailers(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    parts = [b'{"models":', b"[", b"1,2,3", b"]}"]

    def answer(req: Request) -> bytes:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
        return head + chunked(parts)

    server = serve(serve_requests(answer))
    client = clients(server.url)
    assert client.request("GET", "/api/ps").body == b'{"models":[1,2,3]}'
    assert client.request("GET", "/api/ps").body == b'{"models":[1,2,3]}'
    assert server.connections == 1  # the chunked body was read to its end, so the connection is reused


def test_gzip_body_is_decoded(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    payload = json.dumps({"models": ["x"] * 1000}).encode()
    body = gzip.compress(payload)
    server = serve(serve_requests(lambda req: response(body=body, headers={"Content-Encoding": "gzip"})))
    assert clients(server.url).request("GET", "/api/tags").body == payload


def test_head_has_no_body(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(
        serve_requests(lambda req: response(body=b"", headers={"Content-Length": "1234"}, length=False))
    )
    client = clients(server.url)
    got = client.request("HEAD", "/api/version")
    assert (got.status, got.body) == (200, b"")
    assert client.request("HEAD", "/api/version").status == 200
    assert server.connections == 1


# -- never hang --------------------------------------------------------------------------------------


def test_body_dripped_at_one_byte_a_second_ends_at_the_deadline(
    serve: Serve, clients: Callable[..., HttpClient]
) -> None:
    def drip(conn: Conn) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        while conn.wait(1.0) and conn.send(b" "):
            pass

    server = serve(drip)
    start = time.monotonic()
    with pytest.raises(TimedOut) as info:
        clients(server.url).request("GET", "/api/ps", timeout_s=1.5)
    elapsed = time.monotonic() - start
    assert info.value.phase == "reading the body"
    assert str(info.value) == "timed out after 1.5s reading the body"
    assert not info.value.answered
    assert elapsed < 1.5 + SLACK_S  # a per-read timeout would have waited for all 100 bytes


def test_headers_dripped_at_one_byte_a_second_end_at_the_deadline(
    serve: Serve, clients: Callable[..., HttpClient]
) -> None:
    def drip(conn: Conn) -> None:
        conn.read_request()
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 100:
            if not (conn.wait(1.0) and conn.send(bytes([byte]))):
                return

    server = serve(drip)
    start = time.monotonic()
    with pytest.raises(TimedOut, match=r"^timed out after 1\.5s waiting for the response headers$"):
        clients(server.url).request("GET", "/api/ps", timeout_s=1.5)
    assert time.monotonic() - start < 1.5 + SLACK_S


def test_server_that_accepts_and_never_answers(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(lambda conn: conn.stopped.wait(30))
    with pytest.raises(TimedOut) as info:
        clients(server.url).request("GET", "/api/ps", timeout_s=0.5)
    assert info.value.phase == "waiting for the response headers"
    assert info.value.after_s == 0.5


def test_answer_after_the_timeout_is_a_timeout_and_the_next_call_works(
    serve: Serve, clients: Callable[..., HttpClient]
) -> None:
    def late_first(conn: Conn) -> None:
        while (req := conn.read_request()) is not None:
            if conn.index == 0 and not conn.wait(1.0):
                return
            if not conn.send(ok_json(req)):
                return

    server = serve(late_first)
    client = clients(server.url)
    with pytest.raises(TimedOut):
        client.request("GET", "/first", timeout_s=0.3)
    # The late answer must not be read as the answer to the next request: a new connection is used.
    got = client.request("GET", "/second", timeout_s=5)
    assert json.loads(got.body)["path"] == "/second"
    assert server.connections == 2


def test_connection_refused(clients: Callable[..., HttpClient]) -> None:
    with pytest.raises(ConnectFailed, match=r"^connection refused$") as info:
        clients(f"http://127.0.0.1:{closed_port()}").request("GET", "/api/ps")
    assert not info.value.answered


def test_name_that_does_not_resolve(clients: Callable[..., HttpClient]) -> None:
    # .invalid never resolves (RFC 6761)
    with pytest.raises((ConnectFailed, TimedOut), match=r"node.invalid"):
        clients("http://node.invalid:11434").request("GET", "/api/ps", timeout_s=3)


def test_closed_without_a_response(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(lambda conn: conn.read_request() and None)
    with pytest.raises(ConnectionLost, match=r"^connection closed without a response$") as info:
        clients(server.url).request("GET", "/api/ps")
    assert not info.value.answered
    assert server.connections == 1  # a fresh connection that fails is not retried


def test_body_cut_short(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    def short(conn: Conn) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")

    server = serve(short)
    with pytest.raises(ConnectionLost, match=r"90 bytes short"):
        clients(server.url).request("GET", "/api/ps")


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\nxx",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nxxxx",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
)
def test_invalid_http_is_invalid_response(
    serve: Serve, clients: Callable[..., HttpClient], raw: bytes
) -> None:
    def garbage(conn: Conn) -> None:
        conn.read_request()
        conn.send(raw)

    server = serve(garbage)
    with pytest.raises(InvalidResponse) as info:
        clients(server.url).request("GET", "/api/ps", timeout_s=3)
    assert info.value.answered
    assert "\n" not in str(info.value)


# -- kept-alive connections the server closed ---------------------------------------------------------


def test_idle_connection_closed_by_the_server_is_replaced(
    serve: Serve, clients: Callable[..., HttpClient]
) -> None:
    def one_per_connection(conn: Conn) -> None:
        req = conn.read_request()
        if req is not None:
            conn.send(ok_json(req))  # keep-alive promised, then closed: what idle timeouts do

    server = serve(one_per_connection)
    client = clients(server.url)
    for i in range(3):
        assert client.request("GET", f"/n/{i}").status == 200
        time.sleep(0.1)  # let the close arrive
    assert server.connections == 3


def _close_on_second_request(conn: Conn) -> None:
    """First connection: answer one request, then read the second and close without answering."""
    first = conn.read_request()
    if first is None or not conn.send(ok_json(first)):
        return
    if conn.index == 0:
        conn.read_request()
        return
    while (req := conn.read_request()) is not None:
        if not conn.send(ok_json(req)):
            return


def test_get_on_a_connection_closed_under_it_is_retried_once(
    serve: Serve, clients: Callable[..., HttpClient]
) -> None:
    server = serve(_close_on_second_request)
    client = clients(server.url)
    assert client.request("GET", "/a").status == 200
    assert json.loads(client.request("GET", "/b").body)["path"] == "/b"
    assert [r.target for r in server.requests] == ["/a", "/b", "/b"]
    assert server.connections == 2


def test_post_is_never_retried(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(_close_on_second_request)
    client = clients(server.url)
    assert client.request("POST", "/api/show", json_body={"model": "a"}).status == 200
    with pytest.raises(ConnectionLost, match=r"closed by the server before it answered"):
        client.request("POST", "/api/generate", json_body={"model": "a", "keep_alive": -1})
    assert [(r.method, r.target) for r in server.requests] == [
        ("POST", "/api/show"),
        ("POST", "/api/generate"),
    ]
    assert server.connections == 1


# -- bounded in size -----------------------------------------------------------------------------------

_RSS_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    from gpu_router.transport import BodyTooLarge, HttpClient, ProxyConfig

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    client = HttpClient(sys.argv[1], proxies=ProxyConfig(), timeout_s=60)
    try:
        client.request("GET", "/api/tags")
        outcome = "no error"
    except BodyTooLarge as exc:
        outcome = str(exc)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"outcome": outcome, "growth_kib": after - before}))
    """
)


def test_200_mb_body_is_refused_at_the_cap_with_bounded_memory(serve: Serve) -> None:
    block = b"x" * (64 * 1024)
    total = 200 * 1000 * 1000

    def huge(conn: Conn) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        sent = 0
        while sent < total and conn.send(b"%x\r\n%s\r\n" % (len(block), block)):
            sent += len(block)

    server = serve(huge)
    probe = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, server.url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(probe.stdout)
    assert result["outcome"] == "response body is over the 16 MiB cap"
    # 200 MB streamed at it; it held at most the 16 MiB cap plus a chunk (ru_maxrss is in KiB on Linux)
    assert result["growth_kib"] < 64 * 1024, result
    (conn,) = server.conns
    assert conn.sent_bytes < 100 * MIB  # the client stopped reading; the server never got to 200 MB


def test_content_length_over_the_cap_is_refused_before_reading(
    serve: Serve, clients: Callable[..., HttpClient]
) -> None:
    def promise(conn: Conn) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n" + b"x" * 1000)
        conn.stopped.wait(30)  # would hang a client that tried to read it

    server = serve(promise)
    with pytest.raises(
        BodyTooLarge, match=r"^response body of 1000000000 bytes is over the 1 MiB cap$"
    ) as info:
        clients(server.url, max_body_bytes=MIB).request("GET", "/api/tags", timeout_s=10)
    assert info.value.answered
    assert info.value.limit_bytes == MIB


def test_cap_without_content_length(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    def until_close(conn: Conn) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 5000)

    server = serve(until_close)
    client = clients(server.url)
    assert len(client.request("GET", "/a", max_body_bytes=5000).body) == 5000
    with pytest.raises(BodyTooLarge, match=r"over the 4999 bytes cap"):
        client.request("GET", "/a", max_body_bytes=4999)


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """About 1 MB of gzip that inflates to 1 GiB of zeros (built from one repeated flushed block)."""
    zeros = bytes(MIB)
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    # the blocks are identical once the dictionary is reset; the CRC at the end is never reached
    return head + block * 1023


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_gzip_bomb_is_refused_at_the_cap(
    serve: Serve, clients: Callable[..., HttpClient], gzip_bomb: bytes, framing: str
) -> None:
    assert len(gzip_bomb) < 1.5 * MIB

    def bomb(conn: Conn) -> None:
        conn.read_request()
        if framing == "length":
            conn.send(response(body=gzip_bomb, headers={"Content-Encoding": "gzip"}))
        else:
            head = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
            parts = [gzip_bomb[i : i + 65536] for i in range(0, len(gzip_bomb), 65536)]
            conn.send(head + chunked(parts))

    server = serve(bomb)
    with pytest.raises(BodyTooLarge, match=r"^response body is over the 16 MiB cap after decompression$"):
        clients(server.url).request("GET", "/api/show", timeout_s=20)


# -- redirects -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_redirect_is_refused_and_never_followed(
    serve: Serve, clients: Callable[..., HttpClient], method: str
) -> None:
    elsewhere = serve(serve_requests(ok_json))
    location = f"http://user:pw@127.0.0.1:{elsewhere.port}/api/show?token=s3cret#frag"
    first = serve(
        serve_requests(
            lambda req: response(307, b"", reason="Temporary Redirect", headers={"Location": location})
        )
    )
    client = clients(first.url, headers={"X-Api-Key": "s3cret-key"})
    with pytest.raises(RedirectRefused) as info:
        client.request(method, "/api/show", json_body={"model": "m"} if method == "POST" else None)
    err = info.value
    assert str(err) == f"redirect refused: HTTP 307 to http://127.0.0.1:{elsewhere.port}/api/show"
    assert (err.status, err.answered) == (307, True)
    assert "s3cret" not in str(err)
    assert "pw" not in str(err)
    assert elsewhere.connections == 0
    assert len(first.requests) == 1


def test_relative_redirect_names_the_same_server(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(serve_requests(lambda req: response(301, b"", headers={"Location": "/login?next=/api"})))
    with pytest.raises(
        RedirectRefused, match=rf"^redirect refused: HTTP 301 to http://127\.0\.0\.1:{server.port}/login$"
    ):
        clients(server.url).request("GET", "/api/ps")


# -- TLS ---------------------------------------------------------------------------------------------------


def test_tls_verifies_by_default_and_fails_without_the_ca(
    serve: Serve, clients: Callable[..., HttpClient]
) -> None:
    server = serve(serve_requests(ok_json), tls=tls_context())
    with pytest.raises(TlsFailed, match=r"^TLS certificate verify failed: ") as info:
        clients(server.url).request("GET", "/api/ps")
    assert info.value.answered
    assert server.requests == []


def test_tls_with_the_ca_file(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(serve_requests(ok_json), tls=tls_context())
    client = clients(server.url, ca_file=CA_FILE)
    for _ in range(3):
        assert json.loads(client.request("GET", "/api/ps").body)["path"] == "/api/ps"
    assert server.connections == 1  # kept alive over TLS too


def test_tls_verify_off_works_and_warns_once_per_client(
    serve: Serve, clients: Callable[..., HttpClient], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gpu_router.transport")
    server = serve(serve_requests(ok_json), tls=tls_context())
    client = clients(server.url, tls_verify=False)
    for _ in range(3):
        assert client.request("GET", "/api/ps").status == 200
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "verification is off" in warnings[0].getMessage()
    assert f"127.0.0.1:{server.port}" in warnings[0].getMessage()


def test_missing_ca_file_fails_each_request_with_the_reason(clients: Callable[..., HttpClient]) -> None:
    client = clients("https://127.0.0.1:1", ca_file="/nonexistent/ca.pem")
    with pytest.raises(TlsFailed, match=r"cannot load CA file /nonexistent/ca.pem"):
        client.request("GET", "/api/ps")


def test_plain_http_server_on_an_https_url(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    # what a plain HTTP server answers to a TLS ClientHello
    server = serve(lambda conn: conn.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"))
    with pytest.raises(TlsFailed, match=r"^TLS handshake failed"):
        clients(f"https://127.0.0.1:{server.port}", ca_file=CA_FILE).request("GET", "/api/ps")


# -- proxies ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "url", "expected"),
    [
        ({"HTTP_PROXY": "http://p:3128"}, "http://node:11434", "http://p:3128"),
        ({"HTTP_PROXY": "p:3128"}, "http://node:11434", "http://p:3128"),
        ({"http_proxy": "http://lower:1", "HTTP_PROXY": "http://upper:2"}, "http://node:1", "http://lower:1"),
        ({"HTTPS_PROXY": "http://p:3128"}, "http://node:11434", None),
        ({"HTTPS_PROXY": "http://p:3128"}, "https://node:443", "http://p:3128"),
        ({"ALL_PROXY": "http://all:1"}, "https://node:443", "http://all:1"),
        ({"HTTP_PROXY": "http://p:1"}, "http://localhost:11434", None),
        ({"HTTP_PROXY": "http://p:1"}, "http://127.0.0.5:11434", None),
        ({"HTTP_PROXY": "http://p:1"}, "http://[::1]:11434", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "*"}, "http://node:1", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "node"}, "http://node:1", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "example.com"}, "http://gpu.example.com:1", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": ".example.com"}, "http://gpu.example.com:1", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "example.com"}, "http://badexample.com:1", "http://p:1"),
        ({"HTTP_PROXY": "http://p:1", "no_proxy": "a, node:11434 ,b"}, "http://node:11434", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "node:9999"}, "http://node:11434", "http://p:1"),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "10.0.0.0/8"}, "http://10.1.2.3:1", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "10.0.0.0/8"}, "http://11.1.2.3:1", "http://p:1"),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "10.1.2.3"}, "http://10.1.2.3:1", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "fd00::/8"}, "http://[fd00::5]:1", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "NODE.Example.COM"}, "http://node.example.com:1", None),
    ],
)
def test_proxy_choice(environ: dict[str, str], url: str, expected: str | None) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    assert parts.hostname is not None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxy = ProxyConfig.from_environ(environ).proxy_for(parts.scheme, parts.hostname, port)
    assert (proxy.display if proxy else None) == expected


def test_proxy_credentials_are_not_in_its_repr() -> None:
    config = ProxyConfig.from_environ({"HTTP_PROXY": "http://user:pa55@proxy:3128"})
    assert "pa55" not in repr(config)
    assert config.http is not None
    assert config.http.display == "http://proxy:3128"


def test_http_through_a_proxy_uses_absolute_form(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    backend = serve(serve_requests(ok_json))
    proxy = serve(forward_proxy({"gpu-node.invalid:11434": ("127.0.0.1", backend.port)}))
    environ = {"HTTP_PROXY": f"http://scraper:pa55@127.0.0.1:{proxy.port}", "NO_PROXY": "other.invalid"}
    client = clients("http://gpu-node.invalid:11434", proxies=ProxyConfig.from_environ(environ))
    for _ in range(2):
        assert json.loads(client.request("GET", "/api/ps").body)["path"] == "/api/ps"
    seen = proxy.requests[0]
    assert seen.target == "http://gpu-node.invalid:11434/api/ps"
    assert seen.headers["proxy-authorization"] == "Basic c2NyYXBlcjpwYTU1"  # scraper:pa55
    assert seen.headers["host"] == "gpu-node.invalid:11434"
    assert "proxy-authorization" not in backend.requests[0].headers
    assert proxy.connections == 1  # kept alive to the proxy


def test_https_through_a_proxy_tunnels_with_connect(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    backend = serve(serve_requests(ok_json), tls=tls_context())
    proxy = serve(forward_proxy({"gpu-node.invalid:443": ("127.0.0.1", backend.port)}))
    proxies = ProxyConfig.from_environ({"https_proxy": f"http://127.0.0.1:{proxy.port}"})
    client = clients("https://gpu-node.invalid", proxies=proxies, ca_file=CA_FILE)
    assert json.loads(client.request("GET", "/api/ps").body)["path"] == "/api/ps"
    (connect,) = proxy.requests
    assert (connect.method, connect.target) == ("CONNECT", "gpu-node.invalid:443")
    assert backend.requests[0].headers["host"] == "gpu-node.invalid"


def test_no_proxy_sends_the_request_direct(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    proxy = serve(forward_proxy({}))
    environ = {"HTTP_PROXY": f"http://127.0.0.1:{proxy.port}", "NO_PROXY": ".invalid"}
    client = clients("http://gpu-node.invalid:11434", proxies=ProxyConfig.from_environ(environ))
    # Direct means resolving the name itself, which .invalid never does (RFC 6761).
    with pytest.raises((ConnectFailed, TimedOut), match=r"gpu-node.invalid"):
        client.request("GET", "/api/ps", timeout_s=3)
    assert proxy.connections == 0


def test_proxy_refusing_the_tunnel(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    proxy = serve(serve_requests(lambda req: response(407, b"", reason="Proxy Authentication Required")))
    proxies = ProxyConfig.from_environ({"HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}"})
    with pytest.raises(ConnectFailed, match=r"refused the tunnel: HTTP 407 Proxy Authentication Required"):
        clients("https://gpu-node.invalid", proxies=proxies).request("GET", "/api/ps")


def test_unsupported_proxy_scheme_is_a_clear_error(clients: Callable[..., HttpClient]) -> None:
    proxies = ProxyConfig.from_environ({"HTTP_PROXY": "socks5://127.0.0.1:1080"})
    with pytest.raises(ConnectFailed, match=r"^proxy socks5://127\.0\.0\.1:1080: only http:// proxies"):
        clients("http://gpu-node.invalid:1", proxies=proxies).request("GET", "/api/ps")


# -- headers -----------------------------------------------------------------------------------------------


def test_non_latin1_header_value_is_refused_at_construction_without_echoing_it() -> None:
    with pytest.raises(ValueError, match=r"X-Api-Key") as info:
        HttpClient("http://127.0.0.1:1", headers={"X-Api-Key": "tok€n-s3cret"}, proxies=ProxyConfig())
    assert "s3cret" not in str(info.value)
    assert "Latin-1" in str(info.value)


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "nul\0byte"])
def test_header_value_with_line_breaks_or_nul_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match=r"'Authorization': the value contains CR, LF or NUL") as info:
        encode_headers({"Authorization": value})
    assert value not in str(info.value)


@pytest.mark.parametrize("name", ["Bad Name", "", "X:Y", "Content-Length", "transfer-encoding"])
def test_bad_or_reserved_header_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=r"header"):
        encode_headers({name: "v"})


def test_latin1_header_value_is_sent_as_latin1(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(serve_requests(ok_json))
    clients(server.url, headers={"X-Team": "équipe"}).request("GET", "/")
    assert b"X-Team: \xe9quipe" in server.requests[0].raw_head.split(b"\r\n")


# -- streams ---------------------------------------------------------------------------------------------


def _stream(lines: list[bytes], gap_s: float, *, status: int = 200) -> Callable[[Conn], None]:
    def handler(conn: Conn) -> None:
        conn.read_request()
        conn.send(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/x-ndjson\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        for line in lines:
            if not conn.wait(gap_s) or not conn.send(b"%x\r\n%s\r\n" % (len(line), line)):
                return
        conn.send(b"0\r\n\r\n")
        while conn.read_request() is not None:  # keep-alive: wait for the next request or the close
            return

    return handler


def test_stream_lines_yields_each_line(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    lines = [b'{"status":"pulling"}\n{"status":', b'"verifying"}\r\n\n', b'{"status":"success"}']
    server = serve(_stream(lines, 0.01))
    client = clients(server.url)
    with client.stream_lines(
        "POST",
        "/api/pull",
        json_body={"model": "m"},
        total_timeout_s=10,
        idle_timeout_s=5,
        max_line_bytes=100,
    ) as stream:
        assert stream.status == 200
        assert list(stream) == [b'{"status":"pulling"}', b'{"status":"verifying"}', b'{"status":"success"}']
    assert json.loads(server.requests[0].body) == {"model": "m"}


def test_stream_idle_timeout(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(_stream([b"a\n", b"b\n"], 1.5))
    stream = clients(server.url).stream_lines(
        "POST", "/api/pull", total_timeout_s=30, idle_timeout_s=0.5, max_line_bytes=100
    )
    start = time.monotonic()
    with pytest.raises(TimedOut, match=r"^no data for 0\.5s \(idle timeout\) reading the stream$") as info:
        next(stream)
    assert info.value.idle
    assert time.monotonic() - start < 0.5 + SLACK_S


def test_stream_total_timeout_while_bytes_keep_coming(
    serve: Serve, clients: Callable[..., HttpClient]
) -> None:
    server = serve(_stream([b"tick\n"] * 100, 0.2))
    stream = clients(server.url).stream_lines(
        "GET", "/events", total_timeout_s=1.0, idle_timeout_s=0.8, max_line_bytes=100
    )
    got: list[bytes] = []
    start = time.monotonic()
    with pytest.raises(TimedOut, match=r"^timed out after 1s reading the stream$"):
        got.extend(stream)
    assert 1 <= len(got) < 100
    assert time.monotonic() - start < 1.0 + SLACK_S


def test_stream_line_cap(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(_stream([b"short\n", b"y" * 5000], 0.01))
    stream = clients(server.url).stream_lines(
        "GET", "/events", total_timeout_s=10, idle_timeout_s=5, max_line_bytes=1000
    )
    assert next(stream) == b"short"
    with pytest.raises(BodyTooLarge, match=r"a line of the stream is over the 1000 bytes cap"):
        next(stream)


def test_closing_a_stream_closes_its_connection(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    ended = threading.Event()

    def endless(conn: Conn) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while conn.wait(0.02) and conn.send(b"5\r\nline\n\r\n"):
            pass
        ended.set()

    server = serve(endless)
    stream = clients(server.url).stream_lines(
        "GET", "/events", total_timeout_s=30, idle_timeout_s=5, max_line_bytes=100
    )
    assert next(stream) == b"line"
    stream.close()
    assert ended.wait(10), "the server kept writing into a connection the client had closed"
    assert server.connections == 1


def test_stream_error_status_body_is_readable(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(_stream([b'{"error":"pull model manifest: file does not exist"}\n'], 0.01, status=500))
    with clients(server.url).stream_lines(
        "POST", "/api/pull", total_timeout_s=10, idle_timeout_s=5, max_line_bytes=1000
    ) as stream:
        assert stream.status == 500
        assert [json.loads(line) for line in stream] == [
            {"error": "pull model manifest: file does not exist"}
        ]


def test_stream_redirect_is_refused(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(
        serve_requests(lambda req: response(302, b"", headers={"Location": "http://elsewhere:1/x"}))
    )
    with pytest.raises(RedirectRefused, match=r"to http://elsewhere:1/x"):
        clients(server.url).stream_lines("GET", "/", total_timeout_s=5, idle_timeout_s=5, max_line_bytes=10)
