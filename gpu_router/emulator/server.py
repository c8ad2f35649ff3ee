"""HTTP plumbing for emulated nodes: replies (whole, streamed or dripped) and loopback listeners."""

from __future__ import annotations

import _thread
import contextlib
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

from gpu_router.emulator.catalogue import EmulatorError
from gpu_router.records import field, record

logger = logging.getLogger(__name__)

JSON = "application/json; charset=utf-8"
NDJSON = "application/x-ndjson"
TEXT = "text/plain; charset=utf-8"
_DRIP_TICK_S = 0.05


@record
class Reply:
    """One HTTP response. ``stream`` (when set) is sent instead of ``body``, as it is produced."""

    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()
    stream: Iterable[bytes] | None = None
    length: int | None = None  # Content-Length to announce for a stream (None: close-delimited)
    drip_bps: float = 0.0  # > 0: trickle the bytes out at this rate

    def with_drip(self, rate_bps: float) -> Reply:
        """The same reply, dripped at ``rate_bps`` bytes per second."""
        return Reply(
            self.status, self.body, self.content_type, self.headers, self.stream, self.length, rate_bps
        )


def json_reply(status: int, obj: object) -> Reply:
    """A compact JSON body, as gin's ``c.JSON`` writes it."""
    return Reply(status, json.dumps(obj, separators=(",", ":")).encode())


def text_reply(status: int, text: str, content_type: str = TEXT) -> Reply:
    """A text body."""
    return Reply(status, text.encode(), content_type)


def ndjson_reply(objs: Iterable[object]) -> Reply:
    """A whole NDJSON body (one object per line)."""
    lines = "".join(json.dumps(o, separators=(",", ":")) + "\n" for o in objs)
    return Reply(200, lines.encode(), NDJSON)


def ndjson_stream(objs: Iterator[object]) -> Reply:
    """NDJSON sent line by line as ``objs`` yields them (Ollama's ``streamResponse``)."""
    return Reply(
        200, content_type=NDJSON, stream=(json.dumps(o, separators=(",", ":")).encode() + b"\n" for o in objs)
    )


class Host(Protocol):
    """What a listener needs from its node."""

    name: str

    def handler_enter(self) -> None: ...

    def handler_leave(self) -> None: ...

    def handle_http(
        self, listener: str, method: str, path: str, raw: bytes, client_gone: Callable[[], bool]
    ) -> Reply | None: ...

    def stopping(self, seconds: float) -> bool: ...


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 1024  # socketserver's default of 5 resets connections under benchmark load

    def __init__(self, address: tuple[str, int], host: Host, kind: str) -> None:
        self.host = host
        self.kind = kind
        self.connections: set[_Handler] = set()
        self.connections_lock = threading.Lock()
        self.accepted = 0
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # A thread per connection, started without waiting for it to run: ThreadingMixIn's start()
        # waits behind every busy handler for the GIL, so a burst of hundreds of connections (a
        # 500-node benchmark) was accepted seconds late.
        _thread.start_new_thread(self.process_request_thread, (request, client_address))

    def drop_connections(self) -> None:
        """End every kept-alive connection: idle ones now, busy ones after their reply.

        A restarted Ollama (or a closed port) answers nothing more on the connections it had.
        """
        with self.connections_lock:
            for handler in self.connections:
                if handler.busy:
                    handler.close_after = True
                else:
                    handler.shut()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that resets a kept-alive connection is normal here; socketserver would print a traceback.
        logger.debug("node %s: connection from %s ended with an error", self.host.name, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # HTTP/1.1 with keep-alive, as Ollama's Go net/http server speaks (and as the daemon's cost is
    # measured): a connection serves requests until the client closes it, the node restarts or
    # stops, or it sits idle for ``timeout`` seconds.
    protocol_version = "HTTP/1.1"
    timeout = 30
    # Go sets TCP_NODELAY; without it a kept-alive reply written in two pieces waits ~40 ms for a
    # delayed ACK. Headers and a whole body leave in one write through the buffer.
    disable_nagle_algorithm = True
    wbufsize = 64 * 1024
    busy = False  # between reading a request and finishing its reply
    close_after = False  # drop_connections() came while busy: close after this reply

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self)
            self.server.accepted += 1

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self)
        with contextlib.suppress(OSError):  # the client went away with bytes still buffered
            super().finish()

    def _client_gone(self) -> bool:
        """True when the client closed its end (for a request held unanswered on purpose)."""
        try:
            # poll, not select (no descriptor limit) and not a peek alone: the socket has a timeout,
            # so a recv would wait for data instead of saying there is none.
            poller = select.poll()
            poller.register(self.connection, select.POLLIN)
            if not poller.poll(0):
                return False  # nothing to read: the client is still waiting
            peeked: bytes = self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True
        return peeked == b""

    def shut(self) -> None:
        """Shut the socket down, waking the handler thread from its wait for the next request."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def handle(self) -> None:
        host = self.server.host
        host.handler_enter()
        try:
            super().handle()
        finally:
            host.handler_leave()

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def _serve(self, method: str) -> None:
        with self.server.connections_lock:
            self.busy = True
        try:
            self._serve_one(method)
        finally:
            with self.server.connections_lock:
                self.busy = False
                if self.close_after:
                    self.close_connection = True

    def _serve_one(self, method: str) -> None:
        path = urlsplit(self.path).path
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        raw = self.rfile.read(length) if length > 0 else b""
        reply = self.server.host.handle_http(self.server.kind, method, path, raw, self._client_gone)
        if reply is None:
            # Drop the connection without a response: the client sees a connection error.
            self.close_connection = True
            return
        try:
            self._send(method, reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            logger.debug("client went away before the reply to %s %s", method, path)

    def _send(self, method: str, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        for key, value in reply.headers:
            self.send_header(key, value)
        chunked = False
        if reply.stream is None:
            self.send_header("Content-Length", str(len(reply.body)))
        elif reply.length is not None:
            self.send_header("Content-Length", str(reply.length))
        elif self.request_version == "HTTP/1.1":
            # What Go's net/http does with a flushed body of unknown length.
            self.send_header("Transfer-Encoding", "chunked")
            chunked = True
        else:
            self.close_connection = True  # an HTTP/1.0 client: the body ends when the connection does
        if self.close_after or self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if method == "HEAD":
            return
        pieces: Iterable[bytes] = (reply.body,) if reply.stream is None else reply.stream
        if chunked:
            pieces = _chunks(pieces)
        if reply.drip_bps > 0:
            self._drip(pieces, reply.drip_bps)
            return
        for piece in pieces:
            self.wfile.write(piece)
            self.wfile.flush()

    def _drip(self, pieces: Iterable[bytes], rate_bps: float) -> None:
        per_tick = max(1, int(rate_bps * _DRIP_TICK_S))
        host = self.server.host
        for piece in pieces:
            for start in range(0, len(piece), per_tick):
                self.wfile.write(piece[start : start + per_tick])
                self.wfile.flush()
                if host.stopping(per_tick / rate_bps):
                    return

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


def _chunks(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """HTTP/1.1 chunked framing: each non-empty piece a chunk, then the last (empty) chunk."""
    for piece in pieces:
        if piece:
            yield b"%x\r\n%b\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


@record(frozen=False)
class Listener:
    """One loopback listening socket that can close and reopen on the same port."""

    host: Host
    kind: str  # "api" or "metrics"
    address: str
    port: int = 0
    _server: _Server | None = None
    _thread: threading.Thread | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _accepted_before: int = 0  # connections accepted by sockets closed since (REFUSE, down)

    @property
    def accepted(self) -> int:
        """Connections accepted since the first listen, across closes and reopens."""
        with self._lock:
            now = self._server.accepted if self._server is not None else 0
            return self._accepted_before + now

    @property
    def open(self) -> bool:
        """True while the socket listens."""
        return self._server is not None

    def listen(self) -> None:
        """Open the socket (port 0 picks one and keeps it for later reopening)."""
        with self._lock:
            if self._server is not None:
                return
            last_error: OSError | None = None
            for _ in range(20):
                try:
                    server = _Server((self.address, self.port), self.host, self.kind)
                    break
                except OSError as exc:
                    # Re-listening on the same port right after closing it can race the kernel.
                    last_error = exc
                    time.sleep(0.05)
            else:
                raise EmulatorError(
                    f"node {self.host.name}: cannot listen on {self.address}:{self.port}: {last_error}"
                )
            self.port = int(server.server_address[1])
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever,
                # close() wakes the accept loop with a connection, so it need not poll: at 0.5 s,
                # 500 idle emulated nodes used a whole core waking up.
                kwargs={"poll_interval": 60.0},
                name=f"emulator-{self.host.name}-{self.kind}",
                daemon=True,
            )
            self._thread.start()
            logger.debug("node %s %s listening on %s:%d", self.host.name, self.kind, self.address, self.port)

    def close(self) -> None:
        """Close the socket and end its kept-alive connections; a request in progress gets its reply."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
            if server is not None:
                self._accepted_before += server.accepted
        if server is not None:
            stopper = threading.Thread(
                target=server.shutdown, name=f"emulator-{self.host.name}-stop", daemon=True
            )
            stopper.start()
            # Wake the accept loop with an empty connection so it sees the shutdown at once
            # instead of at its next poll; tests stop hundreds of nodes.
            deadline = time.monotonic() + 5.0
            while stopper.is_alive() and time.monotonic() < deadline:
                _poke(server)
                stopper.join(0.01)
            server.server_close()
            server.drop_connections()
        if thread is not None:
            thread.join(timeout=5.0)

    def drop_connections(self) -> None:
        """End the kept-alive connections (idle now, busy after their reply); keep listening."""
        with self._lock:
            server = self._server
        if server is not None:
            server.drop_connections()

    def sync(self, want: bool) -> None:
        """Listen when ``want``, else close."""
        with self._lock:
            if want and self._server is None:
                self.listen()
            elif not want and self._server is not None:
                self.close()


def _poke(server: _Server) -> None:
    try:
        with socket.create_connection((str(server.server_address[0]), int(server.server_address[1])), 0.2):
            pass
    except OSError:
        pass


def guarded(stream: Iterable[bytes], on_error: Callable[[BaseException], None]) -> Iterator[bytes]:
    """Yield from ``stream``; an exception inside it is reported and ends the body."""
    try:
        yield from stream
    except Exception as exc:  # noqa: BLE001 - an emulator bug in a generator must not kill the handler
        on_error(exc)
