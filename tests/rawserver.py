"""A tiny raw-socket server on 127.0.0.1 for hostile HTTP cases (drips, bombs, redirects, proxies).

Each accepted connection runs ``handler(conn)`` in its own thread; the handler reads requests with
:meth:`Conn.read_request` and writes whatever bytes the test wants, so a test can misbehave in ways
``http.server`` never would. :meth:`RawServer.close` stops everything; handlers that wait use
``conn.stopped`` so none outlives its test.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

TLS_DIR = Path(__file__).parent / "fixtures" / "tls"
CA_FILE = str(TLS_DIR / "ca.pem")


def server_tls_context() -> ssl.SSLContext:
    """A server context with the committed test certificate (see fixtures/tls/make.sh)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(TLS_DIR / "server.pem"), str(TLS_DIR / "server.key"))
    return ctx


@dataclass
class Request:
    """One request as the server read it."""

    method: str
    target: str
    headers: dict[str, str]  # names lower case
    body: bytes
    raw_head: bytes


@dataclass
class Conn:
    """One accepted connection, handed to the handler."""

    sock: socket.socket
    index: int  # 0 for the server's first connection, 1 for the second...
    server: RawServer
    sent_bytes: int = 0
    _buffer: bytearray = field(default_factory=bytearray)

    def read_request(self) -> Request | None:
        """The next request on this connection, or None when the client closed it."""
        while b"\r\n\r\n" not in self._buffer:
            data = self._recv()
            if not data:
                return None
            self._buffer += data
        head, _, rest = bytes(self._buffer).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = bytearray(rest)
        while len(body) < length:
            data = self._recv()
            if not data:
                return None
            body += data
        self._buffer = bytearray(body[length:])
        request = Request(method, target, headers, bytes(body[:length]), head)
        self.server.record(request)
        return request

    @property
    def stopped(self) -> threading.Event:
        return self.server.stopped

    def _recv(self) -> bytes:
        while not self.stopped.is_set():
            try:
                return self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return b""
        return b""

    def send(self, data: bytes) -> bool:
        """Send ``data``; False when the client has gone (the usual end of a hostile test)."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        self.sent_bytes += len(data)
        return True

    def wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the server stops first; True if it is still running."""
        return not self.stopped.wait(seconds)


def response(
    status: int = 200,
    body: bytes = b"",
    *,
    reason: str = "OK",
    headers: dict[str, str] | None = None,
    length: bool = True,
) -> bytes:
    """A complete HTTP/1.1 response with ``Content-Length`` (unless ``length`` is False)."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    all_headers = {"Content-Type": "application/json"} | (headers or {})
    if length:
        all_headers["Content-Length"] = str(len(body))
    lines += [f"{k}: {v}" for k, v in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(parts: list[bytes]) -> bytes:
    """``parts`` as a chunked body, with a chunk extension and a trailer for good measure."""
    out = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts if p)
    return out + b"0\r\nX-Trailer: yes\r\n\r\n"


class RawServer:
    """Listens on 127.0.0.1 (TLS with ``tls``); ``handler(conn)`` serves each connection in a thread."""

    def __init__(self, handler: Callable[[Conn], None], *, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.stopped = threading.Event()
        self.conns: list[Conn] = []
        self.requests: list[Request] = []  # every request a handler read, in order
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """How many connections were accepted so far."""
        with self._lock:
            return len(self.conns)

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(0.05)
            with self._lock:
                conn = Conn(sock, len(self.conns), self)
                self.conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: Conn) -> None:
        try:
            if self.tls is not None:
                conn.sock.settimeout(5)
                try:
                    conn.sock = self.tls.wrap_socket(conn.sock, server_side=True)
                except (ssl.SSLError, OSError):
                    return  # the client refused our certificate: that is the test
                conn.sock.settimeout(0.05)
            self.handler(conn)
        finally:
            with contextlib.suppress(OSError):
                conn.sock.close()

    def close(self) -> None:
        self.stopped.set()
        self._accepter.join(5)
        self._listener.close()
        for t in self._threads:
            t.join(5)


def serve_requests(answer: Callable[[Request], bytes]) -> Callable[[Conn], None]:
    """A keep-alive handler: sends ``answer(request)`` for each request on the connection."""

    def handler(conn: Conn) -> None:
        while (req := conn.read_request()) is not None:
            if not conn.send(answer(req)):
                return

    return handler


def forward_proxy(routes: dict[str, tuple[str, int]]) -> Callable[[Conn], None]:
    """A forward proxy handler: absolute-form requests and CONNECT tunnels to ``routes[host:port]``.

    The names in ``routes`` need not resolve: the proxy maps them to loopback addresses itself.
    """

    def handler(conn: Conn) -> None:
        while (req := conn.read_request()) is not None:
            if req.method == "CONNECT":
                backend = socket.create_connection(routes[req.target], timeout=5)
                conn.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
                _pipe(conn, backend)
                return
            parts = urlsplit(req.target)
            backend = socket.create_connection(routes[parts.netloc], timeout=5)
            lines = [f"{req.method} {parts.path or '/'} HTTP/1.1"]
            lines += [
                f"{k}: {v}" for k, v in req.headers.items() if k not in ("proxy-authorization", "connection")
            ]
            lines.append("Connection: close")
            backend.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + req.body)
            backend.shutdown(socket.SHUT_WR)  # one request per backend connection: it may close after it
            with backend:
                while data := backend.recv(65536):
                    conn.send(data)

    return handler


def _pipe(conn: Conn, backend: socket.socket) -> None:
    """Copy bytes both ways until either side closes or the server stops."""
    with backend:
        backend.settimeout(0.05)
        while not conn.stopped.is_set():
            readable, _, _ = select.select([conn.sock, backend], [], [], 0.05)
            for sock in readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                (backend if sock is conn.sock else conn.sock).sendall(data)


# What the ``serve`` fixture (conftest.py) hands a test: start a RawServer with this handler.
Serve = Callable[..., RawServer]


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)


def closed_after(build: Callable[..., C]) -> Iterator[Callable[..., C]]:
    """The body of a fixture that hands out ``build`` (a server or client maker): what the test
    made is closed when it ends. ``yield from closed_after(...)`` in the fixture."""
    made: list[C] = []

    def make(*args: Any, **kw: Any) -> C:
        thing = build(*args, **kw)
        made.append(thing)
        return thing

    yield make
    for thing in made:
        thing.close()
