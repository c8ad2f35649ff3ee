"""The daemon's HTTP listener: /metrics, /healthz, /api/v1/status, /api/v1/route, the status page.

A small ``ThreadingHTTPServer`` in daemon threads, no framework. Every answer is built from the
telemetry's last snapshot, so a request never touches a node or waits on a lock held across I/O.
The one exception is ``POST /api/v1/optimize``, which asks the main loop for a reconcile and waits
for it. With ``api_token`` set, every path but ``/healthz`` and the page shell ``/`` (static, no
data) needs ``Authorization: Bearer <token>``, compared in constant time.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from gpu_router.config import normalize_model_name
from gpu_router.metrics import CONTENT_TYPE, Scraper
from gpu_router.snapshot import DaemonSnapshot, OptimizeTicket, Telemetry

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 10.0  # a client that sends nothing for this long is dropped
MAX_BODY_BYTES = 4096  # only POST /api/v1/optimize takes a body, and ignores it
MAX_WAIT_S = 900.0  # the longest an optimize request may hold its connection
MAX_CONNECTIONS = 64  # one thread each; past this a new connection is closed at once

_JSON = "application/json"
_SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)
# The page has inline style and script only, and talks to this server only.
_PAGE_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

Optimize = Callable[[], OptimizeTicket]


def health(snap: DaemonSnapshot, loop: threading.Thread | None, now_mono_s: float) -> tuple[bool, str]:
    """(healthy, reason): the main loop runs and reconciled within 2 x check_interval + load_timeout."""
    c = snap.config
    limit = 2 * c.check_interval_s + c.load_timeout_s
    if loop is not None and not loop.is_alive():
        return False, "the main loop is not running"
    if snap.last_reconcile_mono_s is None:
        waited = now_mono_s - snap.started_mono_s
        if waited > limit:
            return False, f"no reconcile has finished since the start {waited:.0f}s ago (limit {limit:g}s)"
        return True, "starting: no reconcile finished yet"
    age = now_mono_s - snap.last_reconcile_mono_s
    if age > limit:
        why = f"; the last one failed: {snap.last_error}" if snap.last_error else ""
        return False, f"last reconcile finished {age:.0f}s ago (limit {limit:g}s){why}"
    return True, f"last reconcile finished {age:.0f}s ago"


def route_answer(snap: DaemonSnapshot, model: str) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) for ``/api/v1/route?model=NAME``."""
    name = normalize_model_name(model)
    if snap.state is None or snap.plan is None:
        return 503, {"model": name, "error": "no observation yet: the first reconcile has not finished"}
    route = snap.routes.get(name)
    if route is None:
        return 404, {"model": name, "error": "not installed on any node that is up"}
    best = route.best
    if best is None:
        return 404, {
            "model": name,
            "error": f"no node to send it to: {route.reason}",
            "placement": route.placement,
        }
    return 200, {
        "model": name,
        "node": best.node,
        "url": best.url,
        "on_gpu": bool(route.replicas),
        "source": "on_gpu" if route.replicas else "planned",
        "placement": route.placement,
        "replicas": [t.to_json() for t in route.replicas],
        "planned": route.planned.to_json() if route.planned else None,
        "reason": route.reason,
        "observed_at": snap.state.observed_at.isoformat() if snap.state.observed_at else None,
    }


def status_page() -> bytes:
    """The self-contained status page (package data)."""
    return resources.files("gpu_router").joinpath("static/status.html").read_bytes()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], api: ApiServer, max_connections: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.api = api
        self._slots = threading.BoundedSemaphore(max_connections)
        self._max_connections = max_connections
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # A thread per connection, but never more than max_connections: a client that opens
        # hundreds of idle connections gets the rest closed, and the daemon keeps its memory.
        if not self._slots.acquire(blocking=False):
            log.debug("api: over %d connections, closing one from %s", self._max_connections, client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print a traceback to stderr; a bug here goes to the log instead.
        log.error("api: error serving %s", client_address, exc_info=sys.exc_info())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = (
        "HTTP/1.1"  # keep-alive: a proxy asking /api/v1/route per request reuses its connection
    )
    server_version = "gpu-router"
    sys_version = ""
    timeout = READ_TIMEOUT_S
    # Headers and body leave in one write, with Nagle off: otherwise a keep-alive client waits
    # out a delayed ACK (about 40 ms) on every request.
    wbufsize = 256 * 1024
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: %s %s", self.address_string(), format % args)

    # Methods

    def do_GET(self) -> None:
        self._guarded(head=False)

    def do_HEAD(self) -> None:
        self._guarded(head=True)

    def _guarded(self, *, head: bool) -> None:
        try:
            self._dispatch(head=head)
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception:
            log.exception("api: %s %s failed", self.command, self.path)
            self.close_connection = True
            self._json(500, {"error": "internal error; the daemon's log has the details"}, head=head)

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length")
        try:
            size = int(length) if length else 0
        except ValueError:
            self._json(400, {"error": "bad Content-Length"})
            return
        if size < 0 or size > MAX_BODY_BYTES:
            self.close_connection = True
            self._json(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
            return
        if size:
            self.rfile.read(size)
        path, query = self._split()
        if path != "/api/v1/optimize":
            self._json(405 if path in _GET_PATHS else 404, {"error": f"POST {path} is not supported"})
            return
        if not self._authorized():
            return
        self._optimize(query)

    def _refuse_method(self) -> None:
        self._json(405, {"error": f"{self.command} is not supported"}, allow="GET, HEAD, POST")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    # Routing

    def _split(self) -> tuple[str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        return parts.path, parse_qs(parts.query, keep_blank_values=True)

    def _dispatch(self, *, head: bool) -> None:
        path, query = self._split()
        api = self.server.api
        if path == "/healthz":
            ok, reason = health(api.telemetry.snapshot, api.telemetry.loop_thread, api.clock())
            self._json(200 if ok else 503, {"ok": ok, "reason": reason}, head=head)
            return
        if path in ("/", "/index.html"):
            self._send(200, status_page(), "text/html; charset=utf-8", head=head, csp=_PAGE_CSP)
            return
        if path not in _GET_PATHS:
            self._json(404, {"error": f"no such path: {path}"}, head=head)
            return
        if not self._authorized(head=head):
            return
        snap = api.telemetry.snapshot
        if path == "/metrics":
            self._send(200, api.scraper.scrape(), CONTENT_TYPE, head=head)
        elif path == "/api/v1/status":
            self._json(200, snap.status_json(), head=head)
        elif path == "/api/v1/route":
            models = query.get("model", [])
            if len(models) != 1 or not models[0].strip():
                self._json(400, {"error": "give exactly one model: /api/v1/route?model=NAME"}, head=head)
                return
            status, body = route_answer(snap, models[0])
            self._json(status, body, head=head)
        elif path == "/api/v1/optimize":
            self._json(405, {"error": "use POST"}, head=head, allow="POST")

    def _authorized(self, *, head: bool = False) -> bool:
        token = self.server.api.token
        if not token:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        # compare_digest on bytes: constant time for equal lengths, and no early exit on a prefix.
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
            return True
        self._json(
            401,
            {"error": "this API needs Authorization: Bearer <api_token>"},
            head=head,
            extra=(("WWW-Authenticate", 'Bearer realm="gpu-router"'),),
        )
        return False

    def _optimize(self, query: dict[str, list[str]]) -> None:
        api = self.server.api
        if api.optimize is None:
            self._json(404, {"error": "this server cannot run a reconcile"})
            return
        try:
            wait_s = float(query.get("wait", ["300"])[0])
        except ValueError:
            self._json(400, {"error": "wait must be a number of seconds"})
            return
        ticket = api.optimize()
        ticket.done.wait(max(0.0, min(wait_s, MAX_WAIT_S)))
        body = ticket.to_json()
        self._json(200 if body["done"] else 202, body)

    # Output

    def _json(
        self,
        status: int,
        body: dict[str, Any],
        *,
        head: bool = False,
        allow: str | None = None,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        headers = extra + ((("Allow", allow),) if allow else ())
        self._send(status, data, _JSON, head=head, extra=headers)

    def _send(
        self,
        status: int,
        data: bytes,
        content_type: str,
        *,
        head: bool = False,
        csp: str | None = None,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in _SECURITY_HEADERS + extra:
            self.send_header(k, v)
        if csp:
            self.send_header("Content-Security-Policy", csp)
        self.end_headers()
        if not head:
            self.wfile.write(data)


_GET_PATHS = frozenset({"/metrics", "/api/v1/status", "/api/v1/route", "/api/v1/optimize"})


class ApiServer:
    """The listener on ``host:port``, serving ``telemetry``; ``optimize`` asks the daemon for a reconcile."""

    def __init__(
        self,
        telemetry: Telemetry,
        host: str,
        port: int,
        *,
        token: str | None = None,
        optimize: Optimize | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.telemetry = telemetry
        self.host = host
        self.port = port
        self.token = token or None
        self.optimize = optimize
        self.clock = clock
        self.scraper = Scraper(telemetry)
        self.max_connections = max_connections
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        """Bind and serve in a daemon thread; returns the bound (host, port). Raises OSError."""
        server = _Server((self.host, self.port), self, self.max_connections)
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="api", daemon=True
        )
        self._thread.start()
        return self.host, self.port

    def prime(self) -> None:
        """Build what the current snapshot serves (route index, gauges) now, not on the first request."""
        _ = self.telemetry.snapshot.routes
        self.scraper.prime()

    @property
    def url(self) -> str:
        """Base URL for a client on this machine."""
        from gpu_router.listen import url_host

        return f"http://{url_host(self.host)}:{self.port}"

    def stop(self) -> None:
        """Stop serving and close the socket (requests in flight finish in their threads)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(2.0)
