"""One bounded HTTP/1.1 client for every call gpu-router makes (Ollama API and GPU exporters alike).

Why not ``requests``: it bounds each socket read, not the request (a body dripped at 1 byte/s never
ends), follows redirects with the caller's headers, inflates gzip without a cap, and spends over a quarter
of its per-call CPU on per-request proxy, environment and netrc look-ups. Here:

* one wall-clock deadline covers connect, send, headers and body: the socket timeout is set to the
  time left before every blocking step, so no drip outlives it;
* bodies are capped after decompression (``Accept-Encoding: identity`` is sent; a gzip or deflate
  body is inflated 64 KiB at a time and never past the cap); a Content-Length over the cap is refused
  before a byte of the body is read; past its first MiB a body shares one budget with every other
  large body in the process, so many hostile nodes at once stay within the unit's MemoryMax;
* redirects (any 3xx) are never followed: they are an error naming the target;
* headers are validated and encoded once per client, the SSLContext is built once per client, and
  proxy settings are read from the environment once per process;
* keep-alive connections are pooled per client; a reused connection that the server had closed is
  retried once, for GET and HEAD only, and only when nothing of a response arrived;
* a GET can also be started without waiting (:meth:`HttpClient.start`, on a kept-alive connection
  or a new one connecting without blocking) and finished once its answer is whole
  (:class:`Pending`), so one thread on a selector can poll hundreds of nodes.

DNS resolution cannot be interrupted in CPython. A host name (not an IP literal) is resolved in a
helper thread that the caller waits for only until the deadline; a client never runs more than one
such lookup at a time, so a hung resolver costs one thread per host, not one per call.

Responses are read by :mod:`gpu_router.httpread`, not ``http.client``: importing that pulls in
``email``, ``ssl`` and ``calendar`` (about 20 ms of start-up) and its ``email`` header parser costs
about 50 µs a response. This module imports only light standard modules at import time; ``socket`` is
imported when the first client is built, ``ssl`` when the first https:// client is.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urljoin, urlsplit

from gpu_router import httpread
from gpu_router.records import field, record

if TYPE_CHECKING:
    import socket
    import ssl

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# The largest real /api/show bodies (non-verbose) are ~130 KB, big MoE models a few hundred KB; /api/tags
# takes about 0.4 KB per installed model. 16 MiB is ~50x the largest seen and still harmless under the
# unit's MemoryMax=512M (a body is held twice at most while it is joined).
DEFAULT_MAX_BODY_BYTES = 16 * MIB
# A connect to a live host on a LAN takes milliseconds; a long connect only delays the verdict "down".
DEFAULT_CONNECT_TIMEOUT_S = 3.0
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_IDLE_CONNECTIONS = 4
USER_AGENT = "gpu-router"

_READ_CHUNK = 64 * 1024
_INFLATE_STEP = 64 * 1024  # the most output one decompress call makes
# Each body is capped, but many nodes can send big ones at once (one misbehaving proxy in front of
# them all): past its first SHARED_FROM_BYTES a body draws on one budget for the whole process, and
# one that finds it spent fails as too large. Real answers (a few hundred KB at most) never get that
# far, so a hostile node's bodies never fail a healthy node's; and MemoryMax=512M holds however
# many nodes send bombs at once.
SHARED_FROM_BYTES = 1 * MIB
SHARED_BODY_BUDGET_BYTES = 48 * MIB
_RETRYABLE = frozenset({"GET", "HEAD"})
# RFC 9110 token characters: what a header name may be made of.
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Set by the transport from the request itself; a caller's value would corrupt the framing.
_RESERVED_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "te", "upgrade"})


# ---------------------------------------------------------------------------------------------------------
# Errors


class TransportError(Exception):
    """An HTTP call failed. ``str()`` is a one-line reason a user can act on.

    ``answered`` is True when the server (not the network) is at fault: it answered, but not with
    something usable (TLS failure, a body over the cap, a redirect, invalid HTTP).
    """

    answered = False

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectFailed(TransportError):
    """No connection: refused, name does not resolve, no route, reset, or a proxy that said no."""


class ConnectionLost(TransportError):
    """The connection broke: closed without a response, reset, or cut short mid-body."""


class TimedOut(TransportError):
    """The deadline passed; ``phase`` says where (connecting, waiting for the response headers...)."""

    def __init__(self, phase: str, after_s: float, *, idle: bool = False) -> None:
        what = f"no data for {after_s:g}s (idle timeout)" if idle else f"timed out after {after_s:g}s"
        super().__init__(f"{what} {phase}")
        self.phase = phase
        self.after_s = after_s
        self.idle = idle


class TlsFailed(TransportError):
    """TLS handshake failed, e.g. the certificate does not verify."""

    answered = True


class BodyTooLarge(TransportError):
    """The response body (after decompression) or a line of a stream is over its cap."""

    answered = True

    def __init__(self, reason: str, limit_bytes: int) -> None:
        super().__init__(reason)
        self.limit_bytes = limit_bytes


class RedirectRefused(TransportError):
    """The server answered with a 3xx; redirects are never followed."""

    answered = True

    def __init__(self, status: int, target: str) -> None:
        super().__init__(f"redirect refused: HTTP {status} to {target}")
        self.status = status
        self.target = target


class InvalidResponse(TransportError):
    """The server answered with something that is not valid HTTP (or a body it cannot decode)."""

    answered = True


# ---------------------------------------------------------------------------------------------------------
# Proxies


@record
class Proxy:
    """One proxy: where it is, how it is shown (never with credentials), and whether it can be used."""

    host: str
    port: int
    display: str  # scheme://host:port, never credentials
    auth_header: bytes = field(default=b"", repr=False)  # "Proxy-Authorization: ...\r\n" or b""
    unsupported: str = ""  # why this proxy cannot be used, if it cannot


@record
class ProxyConfig:
    """Proxy settings from ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY``/``NO_PROXY`` (lower case wins).

    ``NO_PROXY`` entries: ``*``, host names (``example.com`` also matches its subdomains, as does
    ``.example.com``), optionally with ``:port``, IP addresses and CIDR networks. Loopback
    (``localhost``, 127.0.0.0/8, ``::1``) never goes through a proxy.
    """

    http: Proxy | None = None
    https: Proxy | None = None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ProxyConfig:
        """Read the proxy variables from ``environ`` (upper and lower case, lower case wins)."""

        def get(name: str) -> str:
            return (environ.get(name.lower()) or environ.get(name.upper()) or "").strip()

        everything = get("all_proxy")
        http_url = get("http_proxy") or everything
        https_url = get("https_proxy") or everything
        no_proxy = tuple(e.strip().lower() for e in get("no_proxy").split(",") if e.strip())
        return cls(
            http=_parse_proxy(http_url) if http_url else None,
            https=_parse_proxy(https_url) if https_url else None,
            no_proxy=no_proxy,
        )

    def proxy_for(self, scheme: str, host: str, port: int) -> Proxy | None:
        """The proxy a request to ``scheme://host:port`` goes through, or None for a direct connection."""
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or _is_loopback(host) or _bypassed(self.no_proxy, host.lower(), port):
            return None
        return proxy


def _parse_proxy(url: str) -> Proxy:
    if "://" not in url:
        url = "http://" + url  # what requests and curl assume
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 80
    except ValueError:
        return Proxy("", 0, "<invalid proxy URL>", unsupported="the proxy URL is not valid")
    display = f"{parts.scheme}://{_bracket(host)}:{port}"
    if parts.scheme.lower() != "http" or not host:
        return Proxy(host, port, display, unsupported="only http:// proxies are supported")
    auth = b""
    if parts.username is not None:
        import base64

        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        auth = b"Proxy-Authorization: Basic " + base64.b64encode(pair) + b"\r\n"
    return Proxy(host, port, display, auth)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() in ("localhost", "localhost.") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bypassed(entries: tuple[str, ...], host: str, port: int) -> bool:
    import ipaddress

    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ip = None
    for entry in entries:
        if entry == "*":
            return True
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(entry.strip("[]"), strict=False):
                    return True
                continue
            except ValueError:
                pass  # not an address or network: perhaps "address:port", matched as text below
        name, entry_port = entry, ""
        if entry.count(":") == 1 or entry.startswith("["):
            name, _, entry_port = entry.rpartition(":")
        if entry_port and entry_port != str(port):
            continue
        name = name.strip("[]").removeprefix("*").lstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


@functools.lru_cache(maxsize=1)
def process_proxies() -> ProxyConfig:
    """Proxy settings of this process, read from ``os.environ`` once (the first call) and then kept."""
    return ProxyConfig.from_environ(os.environ)


# ---------------------------------------------------------------------------------------------------------
# Headers


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """``Name: value\\r\\n`` lines, validated; raises ValueError naming the header, never its value."""
    out = []
    for name, value in headers.items():
        if not name or not set(name) <= _TCHAR:
            raise ValueError(f"header {name[:40]!r}: not a valid HTTP header name")
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"header {name!r}: set by the transport itself, not configurable")
        if not isinstance(value, str):
            raise ValueError(f"header {name!r}: the value must be a string")
        if "\r" in value or "\n" in value or "\0" in value:
            raise ValueError(f"header {name!r}: the value contains CR, LF or NUL")
        try:
            encoded = value.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(
                f"header {name!r}: the value has characters outside Latin-1 (ISO-8859-1), "
                "which HTTP/1.1 header bytes cannot carry"
            ) from None
        out.append(name.encode("ascii") + b": " + encoded.strip() + b"\r\n")
    return b"".join(out)


# ---------------------------------------------------------------------------------------------------------
# Responses


@record
class Response:
    """A complete response: ``headers`` names are lower case; ``body`` is decoded (gzip/deflate undone)."""

    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes


class _Expired(TimeoutError):
    """The deadline passed while waiting for bytes, or the idle limit ``idle_s`` if that is set."""

    def __init__(self, idle_s: float | None = None) -> None:
        super().__init__("deadline passed")
        self.idle_s = idle_s


class _Stale(Exception):
    """A reused connection turned out to be closed before any of the response arrived."""


class StaleConnection(Exception):
    """:meth:`Pending.finish`: the kept-alive connection had been closed; ask again with ``request``."""


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)[ \t]*\r\n")
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked[ \t]*\r\n")


class Pending:
    """A request whose response is read later (see HttpClient.start), on a kept-alive connection or
    on one still connecting.

    Many of these wait together on one selector (``fileno``, for ``events``). While ``connecting``,
    call :meth:`connected` once the socket is writable: it sends the request. :meth:`complete` says,
    without reading anything, that a response has arrived in full, so :meth:`finish` will not wait
    for it. Past ``due`` (the connect's own deadline while connecting, else the request's),
    :meth:`finish` says the call timed out, without waiting.
    """

    def __init__(
        self,
        client: HttpClient,
        conn: _Conn,
        method: str,
        path: str,
        deadline: float,
        timeout: float,
        *,
        connect: _Connecting | None = None,
    ) -> None:
        self._client = client
        self._conn = conn
        self.method = method
        self.path = path
        self.deadline = deadline
        self._timeout = timeout
        self._connect = connect
        self._reused = connect is None  # only a connection that served before can turn out stale
        self._failure: TransportError | None = None

    def fileno(self) -> int:
        """The connection's socket, for a selector."""
        return self._conn.sock.fileno()

    @property
    def connecting(self) -> bool:
        """The connection is not up yet: wait for the socket to be writable, then :meth:`connected`."""
        return self._connect is not None and self._failure is None

    @property
    def events(self) -> int:
        """What to wait for on a selector: writable while connecting, else readable."""
        import selectors

        return selectors.EVENT_WRITE if self.connecting else selectors.EVENT_READ

    @property
    def due(self) -> float:
        """When :meth:`finish` must be called even with no event: the call has timed out by then."""
        return self._connect.by if self._connect is not None else self.deadline

    def abandon(self) -> None:
        """Give up on the answer: close the connection (it can carry nothing else now)."""
        self._conn.close()

    def connected(self) -> None:
        """The socket became writable while connecting: send the request (never waits long).

        A failed connect is kept and raised by :meth:`finish` (which :meth:`complete` then allows).
        """
        attempt = self._connect
        if attempt is None:
            return
        client = self._client
        net = client._socket
        sock = self._conn.sock
        err = sock.getsockopt(net.SOL_SOCKET, net.SO_ERROR)
        if err:
            import os

            self._failure = client._classify(
                OSError(err, os.strerror(err)), "connecting", attempt.cap_s, attempt.where
            )
            return
        self._connect = None
        try:
            sock.setsockopt(net.IPPROTO_TCP, net.TCP_NODELAY, 1)
            client._send(self._conn, attempt.request, self.deadline)
        except (OSError, _Expired) as exc:
            self._failure = client._classify(exc, "sending the request", self._timeout)

    def complete(self) -> bool:
        """The whole response is here (or the connection ended): :meth:`finish` reads without waiting.

        A peek, so nothing is consumed: a response framed by Content-Length or chunked encoding
        that fits the peek is recognised; anything else says False (read it where waiting is fine).
        """
        if self._failure is not None:
            return True
        if self._connect is not None:
            return False
        sock = self._conn.sock
        try:
            sock.settimeout(0)
            data = sock.recv(_READ_CHUNK, _msg_peek())
        except BlockingIOError:
            return False
        except OSError:
            return True  # finish() says what went wrong
        if not data:
            return True
        end = data.find(b"\r\n\r\n")
        if end < 0 or data[9:10] == b"1":  # "HTTP/1.1 1xx": the response itself may be yet to come
            return False
        head = data[: end + 2].lower()
        if b"\r\n " in head or b"\r\n\t" in head:
            return False  # a folded line may carry on the Content-Length the regex saw
        length = _CONTENT_LENGTH.search(head)
        # Two Content-Length lines (which may disagree) make the reader read to the close: never complete.
        if (
            length is not None
            and head.count(b"\r\ncontent-length:") == 1
            and b"\r\ntransfer-encoding:" not in head
        ):
            return len(data) - end - 4 >= int(length.group(1))
        chunked = head.count(b"\r\ntransfer-encoding:") == 1 and _CHUNKED.search(head) is not None
        return chunked and data.endswith(b"\r\n0\r\n\r\n")

    def finish(self) -> Response:
        """The response, as :meth:`HttpClient.request` returns it (and its errors).

        Raises :class:`StaleConnection` when the server had closed the connection before answering:
        nothing was processed there, so asking again (on a new connection) is safe.
        """
        if self._failure is not None or self._connect is not None:
            self._conn.close()
            if self._failure is not None:
                raise self._failure
            assert self._connect is not None
            raise TimedOut("connecting", self._connect.cap_s)
        try:
            return self._client._exchange(
                self._conn,
                self.method,
                self.path,
                b"",
                self.deadline,
                self._timeout,
                self._client.max_body_bytes,
                self._reused,
                sent=True,
            )
        except _Stale:
            self._conn.close()
            raise StaleConnection() from None


class _Connecting:
    """A non-blocking connect under way: the request it will send, and when it gives up."""

    __slots__ = ("by", "cap_s", "request", "where")

    def __init__(self, request: bytes, by: float, cap_s: float, where: str) -> None:
        self.request = request
        self.by = by
        self.cap_s = cap_s
        self.where = where


def _msg_peek() -> int:
    import socket

    return socket.MSG_PEEK


class _SocketReader(io.RawIOBase):
    """Raw reads from a socket, each one bounded by the time left before the deadline (and the idle limit)."""

    def __init__(self, sock: socket.socket, deadline: float, idle_s: float | None = None) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = deadline
        self.idle_s = idle_s
        self.received = 0
        self.eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Expired()
        idle_s = self.idle_s if self.idle_s is not None and self.idle_s < left else None
        self.sock.settimeout(left if idle_s is None else idle_s)
        try:
            n = self.sock.recv_into(buffer)
        except TimeoutError:
            raise _Expired(idle_s) from None
        self.received += n
        if n == 0:
            self.eof = True
        return n


class _Budget:
    """Bytes that large response bodies hold right now, across every client of the process."""

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self._left = total_bytes
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes; False (nothing reserved) when fewer are left."""
        with self._lock:
            if n > self._left:
                return False
            self._left -= n
            return True

    def give(self, n: int) -> None:
        """Return bytes taken earlier."""
        with self._lock:
            self._left += n

    @property
    def left_bytes(self) -> int:
        with self._lock:
            return self._left


_BODY_BUDGET = _Budget(SHARED_BODY_BUDGET_BYTES)


class _Inflater:
    """Incremental gzip/zlib decoding that never produces more than it is asked for."""

    def __init__(self, encoding: str) -> None:
        import zlib

        self._zlib = zlib
        # 32 + 15: accept a gzip or a zlib header (servers label both "deflate")
        self._d: zlib._Decompress = zlib.decompressobj(47)
        self.encoding = encoding

    def inflate(self, data: bytes, room: int) -> tuple[bytes, bool]:
        """Up to ``room`` bytes of output; the flag says output was cut off at ``room``."""
        try:
            out = self._d.decompress(data, max(room, 1))
        except self._zlib.error as exc:
            raise InvalidResponse(f"invalid {self.encoding} body ({exc})") from None
        return out, bool(self._d.unconsumed_tail)

    def more(self, room: int) -> tuple[bytes, bool]:
        """Continue after a cut-off: the input kept back by the last call."""
        return self.inflate(self._d.unconsumed_tail, room)

    @property
    def finished(self) -> bool:
        return self._d.eof


# ---------------------------------------------------------------------------------------------------------
# Connections


class _Conn:
    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def alive(self) -> bool:
        """False when the server closed (or wrote to) an idle connection: peek without blocking."""
        import socket as socket_mod

        try:
            self.sock.settimeout(0)
            # The plain socket's recv, also for TLS: any byte here (data or a close_notify) means it is
            # not a clean idle connection any more.
            data = socket_mod.socket.recv(self.sock, 1, socket_mod.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        del data  # EOF (b"") or bytes nobody asked for: either way not reusable
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class _Lookup:
    """One name resolution running in a helper thread; several callers may wait for it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: list[tuple[Any, ...]] = []
        self.error: OSError | None = None


class HttpClient:
    """HTTP/1.1 to one base URL (``scheme://host[:port][/prefix]``). Thread-safe.

    ``headers`` go with every request (validated and encoded here: ValueError names a bad one, never
    its value). ``timeout_s`` is the default wall-clock deadline of a request, ``connect_timeout_s``
    caps its connect phase. ``max_body_bytes`` is the default cap of a response body after
    decompression. ``https://`` verifies certificates (against ``ca_file`` if given) unless
    ``tls_verify`` is False. ``proxies`` defaults to :func:`process_proxies`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        ca_file: str | None = None,
        tls_verify: bool = True,
        proxies: ProxyConfig | None = None,
        max_idle_connections: int = DEFAULT_MAX_IDLE_CONNECTIONS,
    ) -> None:
        import socket

        self._socket = socket
        # What the socket, TLS and HTTP layers raise for a bad peer; anything else is a bug and propagates.
        self._failures: tuple[type[Exception], ...] = (OSError, httpread.HttpReadError, ValueError)
        parts = urlsplit(base_url)
        scheme = parts.scheme.lower()
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{_redact(base_url)}: invalid port") from None
        host = parts.hostname or ""
        if scheme not in ("http", "https") or not host:
            raise ValueError(f"{_redact(base_url)}: not an http(s) URL")
        if timeout_s <= 0 or connect_timeout_s <= 0 or max_body_bytes <= 0:
            raise ValueError("timeouts and the body cap must be positive")
        self.scheme = scheme
        self.host = host
        self.port = port if port is not None else (443 if scheme == "https" else 80)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_body_bytes = max_body_bytes
        self._prefix = parts.path.rstrip("/")
        origin = f"{scheme}://{_bracket(host)}:{self.port}"
        self.display_url = origin + self._prefix  # for messages: never userinfo or a query

        given = dict(headers or {})
        lower = {k.lower() for k in given}
        defaults = {"Host": _bracket(host) + ("" if port is None else f":{port}")}
        if "user-agent" not in lower:
            defaults["User-Agent"] = USER_AGENT
        if "accept" not in lower:
            defaults["Accept"] = "*/*"
        if "accept-encoding" not in lower:
            defaults["Accept-Encoding"] = "identity"
        if parts.username is not None and "authorization" not in lower:
            import base64

            # what requests did with credentials in a URL; the config refuses them, a caller may not
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            defaults["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        if "host" in lower:
            del defaults["Host"]
        self._header_block = encode_headers({**defaults, **given})

        self._proxy = (proxies if proxies is not None else process_proxies()).proxy_for(
            scheme, host.lower(), self.port
        )
        # http:// through a proxy sends absolute-form targets; https:// tunnels with CONNECT.
        absolute = self._proxy is not None and scheme == "http"
        self._target_prefix = (origin if absolute else "") + self._prefix
        if self._proxy is not None:
            self._header_block += self._proxy.auth_header if absolute else b""

        self._ssl: ssl.SSLContext | None = None
        self._ssl_problem = ""
        if scheme == "https":
            self._ssl = self._make_ssl_context(ca_file, tls_verify)

        self._numeric = _numeric_addresses(
            socket, *((self._proxy.host, self._proxy.port) if self._proxy else (host, self.port))
        )
        self._lock = threading.Lock()
        self._idle: list[_Conn] = []
        self._max_idle = max(0, max_idle_connections)
        self._lookup: _Lookup | None = None
        self._closed = False

    def _make_ssl_context(self, ca_file: str | None, tls_verify: bool) -> ssl.SSLContext | None:
        import ssl

        try:
            ctx = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            # Reported by every request (the node is in error with this reason), not raised here.
            self._ssl_problem = f"cannot load CA file {ca_file}: {getattr(exc, 'strerror', None) or exc}"
            return None
        if not tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            log.warning(
                "TLS certificate verification is off for %s (tls_verify: false): "
                "anyone on the network path can pose as this server",
                self.display_url,
            )
        return ctx

    # -- public ------------------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: object = None,
        timeout_s: float | None = None,
        max_body_bytes: int | None = None,
        deadline: float | None = None,
    ) -> Response:
        """One request, complete within ``timeout_s`` (default: the client's) or :class:`TimedOut`.

        ``deadline`` (``time.monotonic()``) ends it sooner: calls that belong to one poll, started a
        little apart, all end by the poll's own deadline (errors still name ``timeout_s``). Any status
        is returned except 1xx and 3xx (a redirect is :class:`RedirectRefused`). Raises only
        :class:`TransportError` subclasses for anything that goes wrong on the way.
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        cap = self.max_body_bytes if max_body_bytes is None else max_body_bytes
        ends = time.monotonic() + timeout
        deadline = ends if deadline is None else min(ends, deadline)
        data = self._build(method, path, json_body)
        conn, reused = self._checkout(), True
        while True:
            if conn is None:
                conn, reused = self._connect(deadline, timeout), False
            try:
                return self._exchange(conn, method, path, data, deadline, timeout, cap, reused)
            except _Stale:
                conn.close()
                if method not in _RETRYABLE:
                    raise ConnectionLost("connection closed by the server before it answered") from None
                log.debug("%s: kept-alive connection was closed by the server; reconnecting", self.host)
                conn = None

    def start(
        self, method: str, path: str, *, deadline: float | None = None, connect: bool = False
    ) -> Pending | None:
        """Send a GET or HEAD on an idle kept-alive connection and return without reading the answer.

        For polling many nodes from one thread (``Pending.fileno`` on a selector). With ``connect``,
        and no idle connection, a new one is opened without waiting (plain HTTP to an IP literal
        only) and the request goes out once it is up (``Pending.connected``). None when that cannot
        be done, or sending failed: use :meth:`request` instead (it connects, within its deadline,
        where this must not wait; it also says why a refused connect failed).
        """
        if method not in _RETRYABLE or self._ssl is not None:
            return None  # TLS keeps bytes of its own buffered: a selector cannot see them
        timeout = self.timeout_s
        ends = time.monotonic() + timeout
        deadline = ends if deadline is None else min(ends, deadline)
        conn = self._checkout()
        if conn is None:
            return self._start_connect(method, path, deadline, timeout) if connect else None
        try:
            self._send(conn, self._build(method, path, None), deadline)
        except (OSError, _Expired):
            conn.close()
            return None
        return Pending(self, conn, method, path, deadline, timeout)

    @property
    def selectable(self) -> bool:
        """:meth:`start` can open a connection without waiting: plain HTTP to one IP literal.

        A host name waits on the resolver, TLS on its handshake and a proxy's CONNECT on an answer,
        so those go the blocking way (:meth:`request`, in a thread).
        """
        if self._ssl is not None or self._ssl_problem or len(self._numeric) != 1:
            return False
        return self._proxy is None or not (self._proxy.unsupported or self.scheme == "https")

    def _start_connect(self, method: str, path: str, deadline: float, timeout: float) -> Pending | None:
        if not self.selectable or self._closed:
            return None
        import errno

        family, socktype, proto, _, sockaddr = self._numeric[0]
        sock = self._socket.socket(family, socktype, proto)
        try:
            sock.setblocking(False)
            err = sock.connect_ex(sockaddr)
        except OSError:
            sock.close()
            return None
        if err not in (0, errno.EINPROGRESS):
            sock.close()  # refused at once, unreachable: request() meets it again and says which
            return None
        attempt = _Connecting(self._build(method, path, None), *self._connect_bounds(deadline, timeout))
        return Pending(self, _Conn(sock), method, path, deadline, timeout, connect=attempt)

    def _connect_bounds(self, deadline: float, timeout: float) -> tuple[float, float, str]:
        """When a connect started now gives up, the timeout its error names, and what it goes to."""
        by = min(deadline, time.monotonic() + self.connect_timeout_s)
        where = f"proxy {self._proxy.display}: " if self._proxy else ""
        return by, min(timeout, self.connect_timeout_s), where

    def stream_lines(
        self,
        method: str,
        path: str,
        *,
        json_body: object = None,
        total_timeout_s: float,
        idle_timeout_s: float,
        max_line_bytes: int,
    ) -> LineStream:
        """Send a request and stream the response body as lines (NDJSON, e.g. ``/api/pull``).

        Connect, send and the response headers happen here (errors raise :class:`TransportError`);
        iterating yields each non-empty line without its line break. ``idle_timeout_s`` bounds each gap
        between received bytes, ``total_timeout_s`` the whole exchange; a line over ``max_line_bytes``
        is :class:`BodyTooLarge`. Closing the stream (or leaving its ``with`` block) closes the
        connection unless the body was read to its end. Check ``status``: a 4xx/5xx body is streamed
        too, so its ``{"error": ...}`` line can be read.
        """
        deadline = time.monotonic() + total_timeout_s
        data = self._build(method, path, json_body)
        conn = self._connect(deadline, total_timeout_s)  # a long stream never borrows a pooled connection
        phase = "sending the request"
        try:
            self._send(conn, data, deadline)
            phase = "waiting for the response headers"
            reader = _SocketReader(conn.sock, deadline, idle_timeout_s)
            resp = self._read_head(reader, method, path)
            phase = "reading the stream"
            return LineStream(self, conn, reader, resp, total_timeout_s, max_line_bytes)
        except self._failures as exc:
            conn.close()
            raise self._classify(exc, phase, total_timeout_s) from None
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        """Close the idle connections; connections in use are closed when their request ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one exchange ------------------------------------------------------------------------------------

    def _build(self, method: str, path: str, json_body: object) -> bytes:
        if not path.startswith("/") or " " in path or "\r" in path or "\n" in path:
            raise ValueError(f"request path must start with / and contain no spaces: {path[:60]!r}")
        line = f"{method} {self._target_prefix}{path} HTTP/1.1\r\n".encode("ascii")
        if json_body is None:
            # A POST without a length is a 411 at nginx and some other proxies; GET/HEAD send none.
            empty = b"" if method in _RETRYABLE else b"Content-Length: 0\r\n"
            return line + self._header_block + empty + b"\r\n"
        import json

        body = json.dumps(json_body, separators=(",", ":")).encode("utf-8")
        framing = b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        return line + self._header_block + framing + body

    def _exchange(
        self,
        conn: _Conn,
        method: str,
        path: str,
        data: bytes,
        deadline: float,
        timeout: float,
        cap: int,
        reused: bool,
        *,
        sent: bool = False,  # the request went out already (see start); read its response
    ) -> Response:
        phase = "sending the request"
        reader: _SocketReader | None = None
        keep = False
        try:
            try:
                if not sent:
                    self._send(conn, data, deadline)
                phase = "waiting for the response headers"
                reader = _SocketReader(conn.sock, deadline)
                resp = self._read_head(reader, method, path)
            except (ConnectionError, httpread.NoResponse) as exc:
                # Nothing of a response arrived on a connection that had served before: the server closed
                # it while it sat idle. The only case where a retry cannot repeat anything.
                if reused and (reader is None or reader.received == 0):
                    raise _Stale() from exc
                raise
            phase = "reading the body"
            body = self._read_body(resp, reader, cap)
            # A stream that ended (a chunked body without its trailer, say) has nothing more to give.
            keep = not resp.will_close and not reader.eof
            return Response(resp.status, resp.reason, MappingProxyType(resp.headers), body)
        except self._failures as exc:
            raise self._classify(exc, phase, timeout) from None
        finally:
            if keep:
                self._checkin(conn)
            else:
                conn.close()

    def _send(self, conn: _Conn, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Expired()
            conn.sock.settimeout(left)
            try:
                sent = conn.sock.send(view)
            except TimeoutError:
                raise _Expired() from None
            view = view[sent:]

    def _read_head(self, reader: _SocketReader, method: str, path: str) -> httpread.Incoming:
        resp = httpread.read_head(io.BufferedReader(reader, _READ_CHUNK), method)
        if resp.status < 200:
            raise InvalidResponse(f"unexpected informational status HTTP {resp.status}")
        if 300 <= resp.status < 400:
            location = resp.field("location")
            target = _describe_target(self.display_url + path, location)
            raise RedirectRefused(resp.status, target)
        return resp

    def _read_body(self, resp: httpread.Incoming, reader: _SocketReader, cap: int) -> bytes:
        encoding = (resp.field("content-encoding") or "identity").strip().lower()
        inflater: _Inflater | None = None
        if encoding in ("gzip", "x-gzip", "deflate"):
            inflater = _Inflater(encoding)
        elif encoding not in ("identity", ""):
            raise InvalidResponse(f"unsupported Content-Encoding {encoding[:40]!r}")
        if resp.length is not None and resp.length > cap:
            # Compressed or not, a body over the cap as sent is over it after decoding too (but for
            # a few bytes of gzip framing), so it is refused before reading any of it.
            raise BodyTooLarge(f"response body of {resp.length} bytes is over the {_size(cap)} cap", cap)
        chunks: list[bytes] = []
        total = held = 0
        try:
            for piece in self._pieces(resp, inflater, cap):
                total += len(piece)
                if total > cap:
                    raise BodyTooLarge(f"response body is over the {_size(cap)} cap after decompression", cap)
                if total > SHARED_FROM_BYTES:
                    want = total - SHARED_FROM_BYTES - held
                    if not _BODY_BUDGET.take(want):
                        raise BodyTooLarge(
                            f"response body is over {_size(SHARED_FROM_BYTES)} while other large bodies "
                            f"hold the shared {_size(_BODY_BUDGET.total_bytes)}",
                            cap,
                        )
                    held += want
                chunks.append(piece)
            if resp.length:  # Content-Length promised more than arrived before the server closed
                raise ConnectionLost(f"connection closed {resp.length} bytes short of the promised body")
            if inflater is not None and total and not inflater.finished:
                raise InvalidResponse(f"{encoding} body ends before its end marker")
            return b"".join(chunks)
        finally:
            _BODY_BUDGET.give(held)
            # A failure's traceback keeps this frame, and the poll's future keeps the failure until
            # the next poll: without this, up to a cap's worth of garbage per request stays alive.
            chunks.clear()

    @staticmethod
    def _pieces(resp: httpread.Incoming, inflater: _Inflater | None, cap: int) -> Iterator[bytes]:
        """The body as it arrives, decoded in pieces of at most ``_INFLATE_STEP``."""
        raw_total = 0
        while resp.length != 0:
            chunk = resp.read1(_READ_CHUNK)
            if not chunk:
                return
            raw_total += len(chunk)
            if raw_total > cap:
                raise BodyTooLarge(f"response body is over the {_size(cap)} cap", cap)
            if inflater is None:
                yield chunk
                continue
            # In steps: one call asked for the whole cap at once builds it twice over (zlib's
            # output blocks, then their join).
            out, more = inflater.inflate(chunk, _INFLATE_STEP)
            yield out
            while more:
                out, more = inflater.more(_INFLATE_STEP)
                yield out

    # -- connections -------------------------------------------------------------------------------------

    def _checkout(self) -> _Conn | None:
        stale: list[_Conn] = []
        conn = None
        with self._lock:
            while self._idle:
                candidate = self._idle.pop()
                if candidate.alive():
                    conn = candidate
                    break
                stale.append(candidate)
        for c in stale:
            c.close()
        return conn

    def _checkin(self, conn: _Conn) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self, deadline: float, timeout: float) -> _Conn:
        if self._ssl_problem:
            raise TlsFailed(self._ssl_problem)
        if self._proxy is not None and self._proxy.unsupported:
            raise ConnectFailed(f"proxy {self._proxy.display}: {self._proxy.unsupported}")
        connect_deadline, cap_s, where = self._connect_bounds(deadline, timeout)
        host, port = (self._proxy.host, self._proxy.port) if self._proxy else (self.host, self.port)
        sock = None
        try:
            addresses = self._numeric or self._resolve(host, port, connect_deadline, cap_s)
            sock = self._open(addresses, port, connect_deadline, cap_s, where)
            if self._proxy is not None and self.scheme == "https":
                self._tunnel(sock, connect_deadline)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
                left = connect_deadline - time.monotonic()
                if left <= 0:
                    raise _Expired()
                sock.settimeout(left)
                sock.do_handshake()
            return _Conn(sock)
        except self._failures as exc:
            if sock is not None:
                sock.close()
            raise self._classify(exc, "connecting", cap_s, where) from None
        except BaseException:
            if sock is not None:
                sock.close()
            raise

    def _resolve(self, host: str, port: int, deadline: float, cap_s: float) -> list[tuple[Any, ...]]:
        with self._lock:
            lookup = self._lookup
            if lookup is None or lookup.done.is_set():
                lookup = self._lookup = _Lookup()
                threading.Thread(
                    target=_run_lookup, args=(self._socket, lookup, host, port), daemon=True
                ).start()
        if not lookup.done.wait(max(0.0, deadline - time.monotonic())):
            raise TimedOut(f"resolving {host}", cap_s)
        if lookup.error is not None:
            raise lookup.error
        return lookup.result

    def _open(
        self, addresses: list[tuple[Any, ...]], port: int, deadline: float, cap_s: float, where: str
    ) -> socket.socket:
        net = self._socket
        last: BaseException | None = None
        for family, socktype, proto, _, sockaddr in addresses:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimedOut("connecting", cap_s)
            sock: socket.socket = net.socket(family, socktype, proto)
            try:
                sock.settimeout(left)
                sock.connect(sockaddr)
                sock.setsockopt(net.IPPROTO_TCP, net.TCP_NODELAY, 1)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
        if last is None:
            raise ConnectFailed(f"{where}no address for the host")
        raise last

    def _tunnel(self, sock: socket.socket, deadline: float) -> None:
        assert self._proxy is not None
        authority = f"{_bracket(self.host)}:{self.port}".encode("ascii", "replace")
        auth = self._proxy.auth_header
        request = b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (authority, authority, auth)
        self._send(_Conn(sock), request, deadline)
        resp = httpread.read_head(io.BufferedReader(_SocketReader(sock, deadline), _READ_CHUNK), "CONNECT")
        if resp.status != 200:
            raise ConnectFailed(
                f"proxy {self._proxy.display} refused the tunnel: HTTP {resp.status} {resp.reason}".rstrip()
            )

    # -- errors ------------------------------------------------------------------------------------------

    def _classify(self, exc: Exception, phase: str, timeout: float, where: str = "") -> TransportError:
        """A one-line :class:`TransportError` for whatever the socket, TLS or HTTP layer raised."""
        import errno

        if isinstance(exc, _Expired) and exc.idle_s is not None:
            return TimedOut(phase, exc.idle_s, idle=True)
        if isinstance(exc, TimeoutError):
            return TimedOut(phase, timeout)
        if self._ssl is not None:
            import ssl

            if isinstance(exc, ssl.SSLCertVerificationError):
                return TlsFailed(f"TLS certificate verify failed: {exc.verify_message or exc.reason}")
            if isinstance(exc, ssl.SSLError):
                return TlsFailed(
                    f"TLS handshake failed: {(exc.reason or str(exc)).lower().replace('_', ' ')}"
                )
        if isinstance(exc, self._socket.gaierror):
            return ConnectFailed(
                f"{where}cannot resolve host {self._resolving_name()}: {exc.strerror or exc}"
            )
        if isinstance(exc, ConnectionRefusedError):
            return ConnectFailed(f"{where}connection refused")
        if isinstance(exc, httpread.NoResponse):
            return ConnectionLost(f"{where}connection closed without a response")
        if isinstance(exc, httpread.Truncated):
            return ConnectionLost(f"{where}{exc.reason}")
        if isinstance(exc, httpread.Malformed):
            return InvalidResponse(f"invalid HTTP: {exc.reason} {_short(exc.detail)}".rstrip())
        if isinstance(exc, ConnectionResetError):
            return ConnectionLost(f"{where}connection reset")
        if isinstance(exc, (BrokenPipeError, ConnectionAbortedError)):
            return ConnectionLost(f"{where}connection closed by the server while {phase}")
        if isinstance(exc, OSError):
            known = {
                errno.EHOSTUNREACH: "no route to host",
                errno.ENETUNREACH: "network unreachable",
                errno.ECONNABORTED: "connection aborted",
                errno.EADDRNOTAVAIL: "cannot assign the address",
            }
            reason = known.get(exc.errno or 0) or (exc.strerror or type(exc).__name__).lower()
            if phase == "connecting":
                return ConnectFailed(f"{where}{reason}")
            return ConnectionLost(f"{reason} while {phase}")
        return InvalidResponse(f"invalid HTTP while {phase}: {type(exc).__name__}")

    def _resolving_name(self) -> str:
        return self._proxy.host if self._proxy else self.host


def _run_lookup(socket: Any, lookup: _Lookup, host: str, port: int) -> None:
    try:
        lookup.result = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        lookup.error = exc
    except Exception as exc:  # noqa: BLE001 - an IDNA error for an odd name, say: still a lookup failure
        lookup.error = socket.gaierror(socket.EAI_NONAME, f"{type(exc).__name__}")
    finally:
        lookup.done.set()


def _numeric_addresses(socket: Any, host: str, port: int) -> list[tuple[Any, ...]]:
    """The address of an IP literal without a lookup; ``[]`` for a host name."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return []
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return [
        (family, socket.SOCK_STREAM, 0, "", (str(ip), port) if ip.version == 4 else (str(ip), port, 0, 0))
    ]


# ---------------------------------------------------------------------------------------------------------
# Streams


class LineStream:
    """Lines of a streamed body: an iterator and a context manager (see :meth:`HttpClient.stream_lines`)."""

    def __init__(
        self,
        client: HttpClient,
        conn: _Conn,
        reader: _SocketReader,
        resp: httpread.Incoming,
        total_timeout_s: float,
        max_line_bytes: int,
    ) -> None:
        self.status: int = resp.status
        self.reason: str = resp.reason
        self.headers: Mapping[str, str] = MappingProxyType(resp.headers)
        self._client = client
        self._conn: _Conn | None = conn
        self._reader = reader
        self._resp = resp
        self._total_timeout_s = total_timeout_s
        self._max_line = max_line_bytes
        self._buffer = bytearray()
        self._lines: deque[bytes] = deque()
        self._done = False
        encoding = (resp.field("content-encoding") or "identity").strip().lower()
        self._inflater = _Inflater(encoding) if encoding in ("gzip", "x-gzip", "deflate") else None
        if self._inflater is None and encoding not in ("identity", ""):
            self.close()
            raise InvalidResponse(f"unsupported Content-Encoding {encoding[:40]!r}")

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        while not self._lines:
            if self._done:
                self._finish()
                raise StopIteration
            try:
                self._fill()
            except self._client._failures as exc:
                self.close()
                raise self._client._classify(exc, "reading the stream", self._total_timeout_s) from None
            except BaseException:
                self.close()
                raise
        return self._lines.popleft()

    def _fill(self) -> None:
        resp = self._resp
        chunk = resp.read1(_READ_CHUNK) if resp.length != 0 else b""
        if not chunk:
            if resp.length:
                raise ConnectionLost(f"connection closed {resp.length} bytes short of the promised body")
            self._done = True
            if self._inflater is not None and not self._inflater.finished and self._buffer:
                raise InvalidResponse(f"{self._inflater.encoding} stream ends before its end marker")
            self._split(final=True)
            return
        if self._inflater is None:
            self._buffer += chunk
            self._split(final=False)
            return
        out, cut = self._inflater.inflate(chunk, _READ_CHUNK)
        while True:
            self._buffer += out
            self._split(final=False)
            if not cut:
                break
            out, cut = self._inflater.more(_READ_CHUNK)

    def _split(self, *, final: bool) -> None:
        buf = self._buffer
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = bytes(buf[start:nl]).rstrip(b"\r")
            if len(line) > self._max_line:
                raise self._too_long()
            if line.strip():
                self._lines.append(line)
            start = nl + 1
        del buf[:start]
        if len(buf) > self._max_line:
            raise self._too_long()
        if final and buf.strip():
            self._lines.append(bytes(buf).rstrip(b"\r"))
            buf.clear()

    def _too_long(self) -> BodyTooLarge:
        return BodyTooLarge(f"a line of the stream is over the {_size(self._max_line)} cap", self._max_line)

    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._resp.will_close or self._reader.eof:
            conn.close()
        else:
            self._client._checkin(conn)

    def close(self) -> None:
        """Stop reading; the connection is closed unless the body was read to its end."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._done and not self._resp.will_close and not self._reader.eof and not self._lines:
                self._client._checkin(conn)
            else:
                conn.close()
        self._done = True
        self._lines.clear()

    def abort(self) -> None:
        """Cut the connection from another thread: a read blocked on it ends at once (and fails).

        ``close`` alone does not wake a thread blocked in ``recv`` on Linux; a shutdown does. The
        plain socket's shutdown, also for TLS, so the reading thread's SSL object is left whole.
        """
        import socket as socket_mod

        conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                socket_mod.socket.shutdown(conn.sock, socket_mod.SHUT_RDWR)

    def __enter__(self) -> LineStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------
# Small helpers


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _size(n: int) -> str:
    return f"{n / MIB:g} MiB" if n >= MIB and n % (MIB // 16) == 0 else f"{n} bytes"


def _short(text: str, limit: int = 80) -> str:
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def _redact(url: str) -> str:
    """``scheme://host:port/path`` of ``url``: never userinfo, a query or a fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<invalid URL>"
    netloc = _bracket(host) + (f":{port}" if port is not None else "")
    return _short(f"{parts.scheme}://{netloc}{parts.path}", 200)


def _describe_target(request_url: str, location: str | None) -> str:
    if not location:
        return "nowhere (no Location header)"
    try:
        return _redact(urljoin(request_url, location.strip()))
    except ValueError:
        return "an invalid Location"
