"""HttpClient.start / Pending: a request sent on a kept-alive connection, read later from a selector."""

from __future__ import annotations

import contextlib
import json
import selectors
import threading
import time
from collections.abc import Callable

import pytest
from daemon_helpers import wait_until
from rawserver import Conn, Request, Serve, response, serve_requests

from gpu_router.transport import HttpClient, Pending, StaleConnection, TransportError

T = 10.0


@pytest.fixture
def client_for(clients: Callable[..., HttpClient]) -> Callable[[str], HttpClient]:
    return lambda url: clients(url, timeout_s=T)


def started_ps(client: HttpClient) -> Pending:
    """``GET /api/ps`` started on the kept-alive connection a first request leaves idle."""
    client.request("GET", "/api/version")
    pending = client.start("GET", "/api/ps")
    assert pending is not None
    return pending


def ps_body(req: Request) -> bytes:
    return json.dumps({"models": [], "path": req.target}).encode()


def wait_readable(pending: Pending) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(pending, selectors.EVENT_READ)
        assert sel.select(T), "no answer came"


def test_start_needs_an_idle_kept_alive_connection(
    serve: Serve, client_for: Callable[[str], HttpClient]
) -> None:
    server = serve(serve_requests(lambda req: response(200, ps_body(req))))
    client = client_for(server.url)
    assert client.start("GET", "/api/ps") is None  # nothing to send it on: request() connects
    client.request("GET", "/api/version")
    assert client.start("POST", "/api/show") is None  # only what may be asked twice
    pending = client.start("GET", "/api/ps")
    assert pending is not None
    wait_readable(pending)
    wait_until(pending.complete, what="the whole answer")
    resp = pending.finish()
    assert resp.status == 200
    assert json.loads(resp.body)["path"] == "/api/ps"
    again = client.start("GET", "/api/tags")  # finish() put the connection back for the next one
    assert again is not None
    wait_until(again.complete, what="the second answer")
    assert json.loads(again.finish().body)["path"] == "/api/tags"


def test_an_answer_in_pieces_is_not_complete_until_it_is_all_there(
    serve: Serve, client_for: Callable[[str], HttpClient]
) -> None:
    release = threading.Event()
    body = json.dumps({"models": [], "pad": "x" * 400}).encode()

    def halves(conn: Conn) -> None:
        while (req := conn.read_request()) is not None:
            whole = response(200, body)
            if req.target == "/api/ps":
                conn.send(whole[:-100])
                release.wait(T)
                conn.send(whole[-100:])
            else:
                conn.send(whole)

    server = serve(halves)
    client = client_for(server.url)
    pending = started_ps(client)
    wait_readable(pending)
    assert not pending.complete()  # headers and part of the body: finish() would have to wait
    release.set()
    wait_until(pending.complete, what="the rest of the body")
    assert pending.finish().body == body


def test_a_chunked_answer_is_complete_at_its_last_chunk(
    serve: Serve, client_for: Callable[[str], HttpClient]
) -> None:
    chunks = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
    server = serve(serve_requests(lambda req: head + chunks))
    client = client_for(server.url)
    pending = started_ps(client)
    wait_until(pending.complete, what="the last chunk")
    assert pending.finish().body == b"hello world"


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhey",
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\nContent-Length: 2\r\n\r\nhi",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n 0\r\n\r\nhi",
        b"HTTP/1.1 100 Continue\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Mode: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ],
)
def test_complete_never_says_yes_to_an_answer_finish_would_wait_for(
    serve: Serve, client_for: Callable[[str], HttpClient], answer: bytes
) -> None:
    # complete() is asked on the watch's one thread for every node: a yes where the reader then waits
    # for more (to the close, or for the response after a 1xx) stalls every node's watch till the deadline.
    def second_answer_then_hold(conn: Conn) -> None:
        req = conn.read_request()
        if req is not None and conn.send(response(200, ps_body(req))) and conn.read_request() is not None:
            conn.send(answer)
            conn.read_request()  # holds the connection open until the client closes it

    server = serve(second_answer_then_hold)
    client = client_for(server.url)
    pending = started_ps(client)
    wait_readable(pending)
    time.sleep(0.1)  # the whole answer is in: one send
    if pending.complete():
        start = time.monotonic()
        with contextlib.suppress(TransportError):
            pending.finish()
        assert time.monotonic() - start < 2.0


def test_a_connection_the_server_dropped_says_stale(
    serve: Serve, client_for: Callable[[str], HttpClient]
) -> None:
    # The server takes the second request and closes without a word: nothing was done, so the
    # caller may safely ask again on a new connection.
    def one_answer(conn: Conn) -> None:
        req = conn.read_request()
        if req is not None:
            conn.send(response(200, ps_body(req)))
        conn.read_request()

    server = serve(one_answer)
    client = client_for(server.url)
    pending = started_ps(client)
    wait_until(pending.complete, what="the close")
    with pytest.raises(StaleConnection):
        pending.finish()
    assert json.loads(client.request("GET", "/api/ps").body)["path"] == "/api/ps"
