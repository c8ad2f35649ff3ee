"""Asking the running daemon's API, for ``gpu-router status`` and ``optimize``.

One function does the HTTP (``http.client``, with a timeout), so a shared bounded transport can
replace it later without touching the commands.
"""

from __future__ import annotations

import http.client
import json
from typing import Any

from gpu_router.config import Config
from gpu_router.listen import client_host, parse_listen

MAX_ANSWER_BYTES = 64 * 1024 * 1024  # a status of a very large cluster is a few MB


class DaemonUnreachable(Exception):
    """No daemon answered (nothing listening, refused, timed out), or none is configured to."""


def daemon_address(config: Config) -> tuple[str, int]:
    """(host, port) a local client reaches the daemon at; raises DaemonUnreachable without ``listen``."""
    if config.listen is None:
        raise DaemonUnreachable(
            f"{config.path or 'the config'} sets no listen: address, so the daemon serves no API"
        )
    try:
        host, port = parse_listen(config.listen)
    except ValueError as exc:
        raise DaemonUnreachable(f"listen: {exc}") from None
    return client_host(host), port


def call_daemon(
    config: Config, method: str, path: str, *, timeout_s: float = 5.0
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of one request to the daemon, with the config's token if any."""
    host, port = daemon_address(config)
    headers = {"Accept": "application/json"}
    if config.api_token:
        headers["Authorization"] = f"Bearer {config.api_token}"
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        raw = resp.read(MAX_ANSWER_BYTES + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise DaemonUnreachable(f"no gpu-router daemon answered on {where}: {exc}") from None
    finally:
        conn.close()
    if len(raw) > MAX_ANSWER_BYTES:
        raise DaemonUnreachable(f"the answer from {where} is over {MAX_ANSWER_BYTES} bytes")
    try:
        body = json.loads(raw)
    except ValueError:
        raise DaemonUnreachable(
            f"{where} answered HTTP {resp.status} without JSON: not gpu-router?"
        ) from None
    if not isinstance(body, dict):
        raise DaemonUnreachable(f"{where} answered HTTP {resp.status} with unexpected JSON: not gpu-router?")
    return resp.status, body
