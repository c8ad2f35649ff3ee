"""The emulator speaks HTTP/1.1 with keep-alive, as Ollama's Go server does, over real sockets."""

from __future__ import annotations

import http.client
import socket
import threading

import pytest
from daemon_helpers import MakeNode, wait_until

from gpu_router.emulator import EmulatedNode, Fault

T = 10.0


def connect(node: EmulatedNode) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", node.port, timeout=T)


def raw_exchange(sock: socket.socket, path: str) -> bytes:
    """One HTTP/1.1 GET on an open socket; the whole response (Content-Length framed)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the headers"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
    length = int(fields[b"Content-Length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return head


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_one_connection_serves_many_requests(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ("llama3.2",))
    conn = connect(node)
    try:
        for path in ("/api/ps", "/api/tags", "/api/version", "/api/ps"):
            conn.request("GET", path)
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.version == 11
            assert resp.getheader("Connection") is None
            resp.read()
    finally:
        conn.close()
    assert [r.path for r in node.requests] == ["/api/ps", "/api/tags", "/api/version", "/api/ps"]
    assert node.connections_accepted == 1


def test_a_streamed_reply_is_chunked_and_the_connection_stays_usable(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ())
    conn = connect(node)
    try:
        conn.request("POST", "/api/pull", body=b'{"model": "all-minilm"}')
        resp = conn.getresponse()
        assert resp.getheader("Transfer-Encoding") == "chunked"
        lines = resp.read().splitlines()
        assert lines[-1] == b'{"status":"success"}'
        conn.request("GET", "/api/tags")
        tags = conn.getresponse()
        assert b"all-minilm" in tags.read()
    finally:
        conn.close()
    assert node.connections_accepted == 1


def test_an_http_1_0_client_gets_a_body_that_ends_with_the_connection(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ())
    with socket.create_connection(("127.0.0.1", node.port), T) as sock:
        body = b'{"model": "all-minilm"}'
        sock.sendall(b"POST /api/pull HTTP/1.0\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert b"Connection: close" in head
    assert rest.splitlines()[-1] == b'{"status":"success"}'


@pytest.mark.parametrize("how", ["restart", "restart_down", "refuse", "stop"])
def test_idle_kept_alive_connections_end_when_the_node_goes(make_node: MakeNode, how: str) -> None:
    node = make_node("n", (8192,), ("llama3.2",))
    with socket.create_connection(("127.0.0.1", node.port), T) as sock:
        head = raw_exchange(sock, "/api/ps")
        assert head.startswith(b"HTTP/1.1 200")
        if how == "restart":
            node.restart()
        elif how == "restart_down":
            node.restart(down_s=5.0, wait=False)
        elif how == "refuse":
            node.set_fault(Fault.REFUSE)
        else:
            node.stop()
        sock.settimeout(T)
        assert closed_by_peer(sock)
    if how == "restart":
        # The port itself stays open: a new connection is answered.
        with socket.create_connection(("127.0.0.1", node.port), T) as again:
            assert raw_exchange(again, "/api/ps").startswith(b"HTTP/1.1 200")
    elif how in ("restart_down", "refuse"):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", node.port), T).close()


def test_a_request_in_progress_gets_its_reply_then_the_connection_closes(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ("llama3.2",))
    node.set_fault(Fault.SLOW, slow_s=0.5, paths=("/api/tags",))
    conn = connect(node)
    got: dict[str, object] = {}

    def ask() -> None:
        conn.request("GET", "/api/tags")
        resp = conn.getresponse()
        got["status"], got["connection"], got["body"] = resp.status, resp.getheader("Connection"), resp.read()

    worker = threading.Thread(target=ask)
    worker.start()
    wait_until(lambda: any(r.path == "/api/tags" for r in node.requests), what="the request to arrive")
    node.restart()
    worker.join(T)
    conn.close()
    assert got["status"] == 200
    assert got["connection"] == "close"
    assert b"llama3.2" in got["body"]  # type: ignore[operator]


def test_a_hung_request_ends_when_its_client_gives_up(make_node: MakeNode) -> None:
    # Hundreds of hung polls must not pile up handler threads in the emulator after the clients left.
    node = make_node("n", (8192,), ("llama3.2",))
    node.set_fault(Fault.HANG)
    socks = [socket.create_connection(("127.0.0.1", node.port), T) for _ in range(5)]
    for sock in socks:
        sock.sendall(b"GET /api/ps HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: len(node.requests) == 5, what="the five requests to arrive")
    assert node._active_handlers == 5
    for sock in socks:
        sock.close()
    wait_until(lambda: node._active_handlers == 0, what="the hung handlers to end")


def test_a_hung_request_is_answered_as_soon_as_the_fault_clears(make_node: MakeNode) -> None:
    node = make_node("n", (8192,), ("llama3.2",))
    node.set_fault(Fault.HANG)
    with socket.create_connection(("127.0.0.1", node.port), T) as sock:
        sock.sendall(b"GET /api/ps HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: len(node.requests) == 1, what="the request to arrive")
        node.clear_fault()
        sock.settimeout(T)
        assert sock.recv(12) == b"HTTP/1.1 200"
