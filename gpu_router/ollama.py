"""Ollama HTTP adapter: the only module that talks to an Ollama server.

One ``requests.Session`` per node, explicit (connect, read) timeouts on every call, and typed
errors, so the caller can tell a node that is *down* (nothing answered) from one that is in
*error* (it answered, but not with what Ollama answers).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import requests

from gpu_router.state import InstalledModel, LoadedModel, ModelInfo, NodeStatus

log = logging.getLogger(__name__)

# A connect to a live host on a LAN takes milliseconds; a long connect timeout only delays the
# verdict "down" for a host that is gone.
CONNECT_TIMEOUT_CAP_S = 3.0


class OllamaError(Exception):
    """A call to a node failed; ``status`` is what that makes of the node."""

    status = NodeStatus.ERROR

    def __init__(self, node: str, message: str) -> None:
        super().__init__(f"{node}: {message}")
        self.node = node
        self.message = message


class NodeUnreachable(OllamaError):
    """Nothing answered: connection refused, DNS failure or timeout."""

    status = NodeStatus.DOWN


class BadResponse(OllamaError):
    """The node answered, but with invalid JSON or a shape Ollama never sends."""


class ApiError(OllamaError):
    """The node answered with an HTTP error and (usually) ``{"error": "..."}``."""

    def __init__(self, node: str, status_code: int, error: str) -> None:
        super().__init__(node, f"HTTP {status_code}: {error}")
        self.status_code = status_code
        self.error = error


_TS = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|[+-]\d\d:?\d\d)?$", re.IGNORECASE
)


def parse_timestamp(text: str) -> datetime | None:
    """Parse Go's RFC3339Nano (nanoseconds, ``Z`` or an offset); None if it is not one.

    ``datetime.fromisoformat`` before 3.11 rejects both nanoseconds and ``Z``.
    """
    m = _TS.match(text.strip())
    if not m:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    frac, zone = m.group(7), m.group(8)
    micro = int((frac or "0")[:6].ljust(6, "0"))
    try:
        tz = timezone.utc
        if zone and zone.upper() != "Z":
            sign = -1 if zone[0] == "-" else 1
            digits = zone[1:].replace(":", "")
            tz = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError:  # out-of-range fields or an offset of 24 hours or more
        return None


def _int(value: object) -> int | None:
    # bool is an int in Python, and never a size in Ollama's JSON
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _entries(body: Any, node: str, what: str) -> list[Mapping[str, Any]]:
    """The ``models`` list of a ps/tags body, checked for shape."""
    if not isinstance(body, dict):
        raise BadResponse(node, f"{what}: expected a JSON object, got {type(body).__name__}")
    models = body.get("models")
    if models is None:
        return []  # older builds and proxies may send null for "none"
    if not isinstance(models, list):
        raise BadResponse(node, f"{what}: 'models' is {type(models).__name__}, not a list")
    out: list[Mapping[str, Any]] = []
    for i, entry in enumerate(models):
        if not isinstance(entry, dict):
            raise BadResponse(node, f"{what}: models[{i}] is {type(entry).__name__}, not an object")
        out.append(entry)
    return out


def parse_ps(body: Any, node: str = "node") -> tuple[LoadedModel, ...]:
    """Parse a ``GET /api/ps`` body."""
    loaded = []
    for i, e in enumerate(_entries(body, node, "/api/ps")):
        name = _str(e.get("model")) or _str(e.get("name"))
        size, vram = _int(e.get("size")), _int(e.get("size_vram"))
        if not name or size is None or vram is None:
            raise BadResponse(node, f"/api/ps: models[{i}] lacks name, size or size_vram")
        expires = e.get("expires_at")
        loaded.append(
            LoadedModel(
                name=name,
                size_bytes=size,
                vram_bytes=vram,
                digest=_str(e.get("digest")).removeprefix("sha256:"),
                expires_at=parse_timestamp(expires) if isinstance(expires, str) else None,
                context_length=_int(e.get("context_length")),
            )
        )
    return tuple(loaded)


def parse_tags(body: Any, node: str = "node") -> tuple[InstalledModel, ...]:
    """Parse a ``GET /api/tags`` body."""
    installed = []
    for i, e in enumerate(_entries(body, node, "/api/tags")):
        name = _str(e.get("model")) or _str(e.get("name"))
        size = _int(e.get("size"))
        if not name or size is None:
            raise BadResponse(node, f"/api/tags: models[{i}] lacks name or size")
        details = e.get("details") if isinstance(e.get("details"), dict) else {}
        assert isinstance(details, dict)
        installed.append(
            InstalledModel(
                name=name,
                size_bytes=size,
                digest=_str(e.get("digest")).removeprefix("sha256:"),
                family=_str(details.get("family")),
                parameter_size=_str(details.get("parameter_size")),
                quantization_level=_str(details.get("quantization_level")),
            )
        )
    return tuple(installed)


_NUM_CTX = re.compile(r"^\s*num_ctx\s+(\d+)\s*$", re.MULTILINE)


def parse_show(body: Any, model: str, node: str = "node") -> ModelInfo:
    """Parse a ``POST /api/show`` body into what sizing and loading need."""
    if not isinstance(body, dict):
        raise BadResponse(node, f"/api/show {model}: expected a JSON object")
    info = body.get("model_info")
    if not isinstance(info, dict):
        info = {}
    arch = _str(info.get("general.architecture"))

    def key(suffix: str) -> object:
        return info.get(f"{arch}.{suffix}") if arch else None

    def count(suffix: str, pick: Any = max) -> int | None:
        # head_count_kv is a per-layer array in some architectures (e.g. sliding-window ones)
        value = key(suffix)
        if isinstance(value, list):
            numbers = [n for n in (_int(v) for v in value) if n is not None and n > 0]
            return int(pick(numbers)) if numbers else None
        n = _int(value)
        return n if n is not None and n > 0 else None

    caps_raw = body.get("capabilities")
    if isinstance(caps_raw, list):
        capabilities = tuple(c for c in caps_raw if isinstance(c, str))
    else:
        # Builds before capabilities existed: Ollama itself calls a model embedding-only exactly
        # when its GGUF has <arch>.pooling_type, so this is its rule, not a guess from the name.
        capabilities = ("embedding",) if key("pooling_type") is not None else ("completion",)

    vocab = _int(key("vocab_size"))
    tokens = info.get("tokenizer.ggml.tokens")
    if vocab is None and isinstance(tokens, list) and tokens:
        vocab = len(tokens)  # only filled with verbose=true
    params = body.get("parameters")
    m = _NUM_CTX.search(params) if isinstance(params, str) else None
    return ModelInfo(
        name=model,
        architecture=arch,
        capabilities=capabilities,
        block_count=count("block_count"),
        embedding_length=count("embedding_length"),
        head_count=count("attention.head_count"),
        head_count_kv=count("attention.head_count_kv"),
        key_length=count("attention.key_length"),
        value_length=count("attention.value_length"),
        context_length=count("context_length"),
        vocab_size=vocab,
        num_ctx=int(m.group(1)) if m else None,
    )


class OllamaClient:
    """Talks to one Ollama node. Thread-safe for one caller at a time per method call."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = session or requests.Session()
        if headers:
            self._session.headers.update(headers)

    def close(self) -> None:
        """Close the node's connection pool."""
        self._session.close()

    def _timeout(self, read_s: float | None) -> tuple[float, float]:
        read = self.timeout_s if read_s is None else read_s
        return (min(self.timeout_s, CONNECT_TIMEOUT_CAP_S), read)

    def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        read_timeout_s: float | None = None,
    ) -> Any:
        try:
            resp = self._session.request(
                method, self.url + path, json=body, timeout=self._timeout(read_timeout_s)
            )
        except requests.Timeout as exc:
            kind = "connect" if isinstance(exc, requests.ConnectTimeout) else "read"
            secs = self._timeout(read_timeout_s)[0 if kind == "connect" else 1]
            raise NodeUnreachable(self.name, f"{method} {path}: {kind} timed out after {secs:g}s") from None
        except requests.ConnectionError as exc:
            # A stall after the headers surfaces as a ConnectionError wrapping urllib3's read timeout.
            if "Read timed out" in str(exc):
                secs = self._timeout(read_timeout_s)[1]
                raise NodeUnreachable(self.name, f"{method} {path}: read timed out after {secs:g}s") from None
            raise NodeUnreachable(self.name, f"{method} {path}: {_reason(exc)}") from None
        except requests.RequestException as exc:
            raise BadResponse(self.name, f"{method} {path}: {exc.__class__.__name__}") from None
        try:
            data = resp.json()
        except (ValueError, json.JSONDecodeError):
            data = None
            if resp.ok:
                snippet = resp.text[:60].replace("\n", " ")
                raise BadResponse(self.name, f"{method} {path}: invalid JSON ({snippet!r})") from None
        if not resp.ok:
            error = data.get("error") if isinstance(data, dict) else None
            text = error if isinstance(error, str) else resp.text[:120].strip() or resp.reason
            raise ApiError(self.name, resp.status_code, f"{method} {path}: {text}")
        return data

    # Read-only calls: the report uses only these.

    def version(self) -> str:
        """``GET /api/version``."""
        body = self._call("GET", "/api/version")
        if not isinstance(body, dict) or not isinstance(body.get("version"), str):
            raise BadResponse(self.name, "/api/version: no 'version' string")
        return str(body["version"])

    def ps(self) -> tuple[LoadedModel, ...]:
        """``GET /api/ps``: the models loaded now."""
        return parse_ps(self._call("GET", "/api/ps"), self.name)

    def tags(self) -> tuple[InstalledModel, ...]:
        """``GET /api/tags``: the models on the node's disk."""
        return parse_tags(self._call("GET", "/api/tags"), self.name)

    def show(self, model: str) -> ModelInfo:
        """``POST /api/show``: metadata and capabilities of one model."""
        return parse_show(self._call("POST", "/api/show", {"model": model}), model, self.name)

    # Mutating calls: only the executor uses these.

    def load(
        self,
        model: str,
        *,
        embedding: bool,
        keep_alive: int | str = -1,
        timeout_s: float,
        options: Mapping[str, object] | None = None,
    ) -> None:
        """Load ``model`` and pin it. Blocks until the runner is up (Ollama answers then).

        ``options`` only when asked for (a priority model's num_ctx): options that differ from what
        user traffic sends make Ollama reload the model on the first real request.
        """
        body: dict[str, Any] = {"model": model, "keep_alive": keep_alive}
        if options:
            body["options"] = dict(options)
        self._call("POST", "/api/embed" if embedding else "/api/generate", body, read_timeout_s=timeout_s)

    def unload(self, model: str) -> None:
        """Ask Ollama to unload ``model`` (``keep_alive: 0``); it answers at once and unloads async."""
        self._call("POST", "/api/generate", {"model": model, "keep_alive": 0})


def _reason(exc: requests.ConnectionError) -> str:
    text = str(exc)
    for needle, reason in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "name does not resolve"),
        ("nodename nor servname", "name does not resolve"),
        ("Temporary failure in name resolution", "name does not resolve"),
        ("No route to host", "no route to host"),
        ("Network is unreachable", "network unreachable"),
        ("RemoteDisconnected", "connection closed without a response"),
        ("Connection reset", "connection reset"),
    ):
        if needle in text:
            return reason
    return "connection failed"
