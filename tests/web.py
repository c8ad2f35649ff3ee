"""One-shot HTTP calls for tests that poke a server directly, on gpu_router.transport.

The project no longer depends on ``requests``; this keeps the tests' calls as short as they were
(``web.get(url).json()``) while going through the same client the program uses.
"""

from __future__ import annotations

import http.client
import json as jsonlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gpu_router.transport import (
    ConnectFailed,
    ConnectionLost,
    HttpClient,
    ProxyConfig,
    TimedOut,
    TransportError,
)

DEFAULT_TIMEOUT_S = 10.0

# What a test expects when nothing (or nothing complete) answered, and when it took too long.
Unreachable = (ConnectFailed, ConnectionLost)
Timeout = TimedOut
RequestError = TransportError


@dataclass(frozen=True)
class Reply:
    """A response: ``status_code``, ``headers`` (lower-case names), ``content``, ``text``, ``json()``."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)


def request(method: str, url: str, *, json: Any = None, timeout: float = DEFAULT_TIMEOUT_S) -> Reply:
    """One request on a fresh connection; raises the transport's errors."""
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    with HttpClient(
        f"{parts.scheme}://{parts.netloc}", timeout_s=timeout, proxies=ProxyConfig(), max_idle_connections=0
    ) as client:
        r = client.request(method, path, json_body=json)
    return Reply(r.status, r.headers, r.body)


def get(url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> Reply:
    return request("GET", url, timeout=timeout)


def head(url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> Reply:
    return request("HEAD", url, timeout=timeout)


def post(url: str, *, json: Any = None, timeout: float = DEFAULT_TIMEOUT_S) -> Reply:
    return request("POST", url, json=json, timeout=timeout)


def delete(url: str, *, json: Any = None, timeout: float = DEFAULT_TIMEOUT_S) -> Reply:
    return request("DELETE", url, json=json, timeout=timeout)


class Stream:
    """A response read as it arrives, undecoded (``Content-Encoding`` is left as sent)."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        self._conn = conn
        self.raw = resp
        self.status_code = resp.status
        self.headers = {k: v for k, v in resp.getheaders()}

    def iter_content(self, chunk_size: int = 65536) -> Iterator[bytes]:
        while chunk := self.raw.read1(chunk_size) if chunk_size > 1 else self.raw.read(1):
            yield chunk

    def iter_lines(self) -> Iterator[bytes]:
        """Each line as soon as it is complete (empty lines skipped)."""
        while line := self.raw.readline():
            if line.strip():
                yield line.rstrip(b"\r\n")

    def read(self) -> bytes:
        return self.raw.read()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stream(method: str, url: str, *, json: Any = None, timeout: float = DEFAULT_TIMEOUT_S) -> Stream:
    """Send one request and hand back the response unread, for bodies a test reads in pieces."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    body = None if json is None else jsonlib.dumps(json).encode()
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body, headers)
    return Stream(conn, conn.getresponse())
