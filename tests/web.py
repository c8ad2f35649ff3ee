"""One-shot HTTP calls for tests that poke a server directly, on gpu_router.transport.

The project no longer depends on ``requests``; this keeps the tests' calls as short as they were
(``web.get(url).json()``) while going through the same client the program uses.
"""

from __future__ import annotations

import json as jsonlib
from collections.abc import Mapping
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
