"""Ollama HTTP adapter: the only module that talks to an Ollama server.

One :class:`~gpu_router.transport.HttpClient` per node (keep-alive, a wall-clock deadline and a body
cap on every call, no redirects), and typed errors, so the caller can tell a node that is *down*
(nothing answered) from one that is in *error* (it answered, but not with what Ollama answers).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from gpu_router.state import InstalledModel, LoadedModel, ModelInfo, NodeStatus
from gpu_router.transport import DEFAULT_MAX_BODY_BYTES, HttpClient, TransportError

log = logging.getLogger(__name__)

T = TypeVar("T")

# A connect to a live host on a LAN takes milliseconds; a long connect timeout only delays the
# verdict "down" for a host that is gone.
CONNECT_TIMEOUT_CAP_S = 3.0
MAX_VERSION_CHARS = 64


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
    """Talks to one Ollama node. Thread-safe: concurrent calls use separate kept-alive connections.

    ``headers`` go with every request (a value that is not Latin-1, or has CR/LF/NUL, is a ValueError
    here, naming the header). ``https://`` nodes verify certificates, against ``ca_file`` if given,
    unless ``tls_verify`` is False. ``max_body_bytes`` caps every response body after decompression.
    """

    def __init__(
        self,
        name: str,
        url: str,
        *,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        ca_file: str | None = None,
        tls_verify: bool = True,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._http = HttpClient(
            self.url,
            headers=headers,
            timeout_s=timeout_s,
            connect_timeout_s=min(timeout_s, CONNECT_TIMEOUT_CAP_S),
            max_body_bytes=max_body_bytes,
            ca_file=ca_file,
            tls_verify=tls_verify,
        )

    def close(self) -> None:
        """Close the node's kept-alive connections."""
        self._http.close()

    def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Any:
        try:
            resp = self._http.request(method, path, json_body=body, timeout_s=timeout_s)
        except TransportError as exc:
            # Nothing (usable) answered: down. The server answered, but badly (TLS, cap, redirect,
            # invalid HTTP): error.
            kind = BadResponse if exc.answered else NodeUnreachable
            raise kind(self.name, f"{method} {path}: {exc.reason}") from None
        data, problem = _decode_json(resp.body)
        if resp.status >= 400:
            error = data.get("error") if isinstance(data, dict) else None
            text = error if isinstance(error, str) else _snippet(resp.body, 120) or resp.reason
            raise ApiError(self.name, resp.status, f"{method} {path}: {_one_line(text)}")
        if problem:
            raise BadResponse(self.name, f"{method} {path}: {problem}")
        return data

    def _parse(self, what: str, parse: Callable[[], T]) -> T:
        """Run a ``parse_*`` function: whatever it raises for an absurd body is this node's error."""
        try:
            return parse()
        except OllamaError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
            raise BadResponse(self.name, f"{what}: cannot use the response ({type(exc).__name__})") from None

    # Read-only calls: the report uses only these.

    def version(self) -> str:
        """``GET /api/version``."""
        body = self._call("GET", "/api/version")
        if not isinstance(body, dict) or not isinstance(body.get("version"), str):
            raise BadResponse(self.name, "/api/version: no 'version' string")
        version = str(body["version"])
        if len(version) > MAX_VERSION_CHARS:
            # it goes into the report and the logs; Ollama's are like "0.12.6" or "0.13.0-rc1"
            raise BadResponse(self.name, f"/api/version: a version string of {len(version)} characters")
        return version

    def ps(self) -> tuple[LoadedModel, ...]:
        """``GET /api/ps``: the models loaded now."""
        body = self._call("GET", "/api/ps")
        return self._parse("/api/ps", lambda: parse_ps(body, self.name))

    def tags(self) -> tuple[InstalledModel, ...]:
        """``GET /api/tags``: the models on the node's disk."""
        body = self._call("GET", "/api/tags")
        return self._parse("/api/tags", lambda: parse_tags(body, self.name))

    def show(self, model: str) -> ModelInfo:
        """``POST /api/show``: metadata and capabilities of one model."""
        body = self._call("POST", "/api/show", {"model": model})
        return self._parse(f"/api/show {model}", lambda: parse_show(body, model, self.name))

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

        ``options`` is sent only when given: options other than what user traffic sends (num_ctx,
        num_gpu) make Ollama reload the model on the first real request.
        """
        body: dict[str, Any] = {"model": model, "keep_alive": keep_alive}
        if options is not None:
            body["options"] = dict(options)
        self._call("POST", "/api/embed" if embedding else "/api/generate", body, timeout_s=timeout_s)

    def unload(self, model: str) -> None:
        """Ask Ollama to unload ``model`` (``keep_alive: 0``); it answers at once and unloads async."""
        self._call("POST", "/api/generate", {"model": model, "keep_alive": 0})


def _decode_json(raw: bytes) -> tuple[Any, str]:
    """``(value, "")``, or ``(None, why)`` for a body that is not strict UTF-8 JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"invalid JSON (not UTF-8 at byte {exc.start})"
    try:
        return json.loads(text), ""
    except RecursionError:
        return None, "invalid JSON (nested too deep)"
    except ValueError as exc:  # JSONDecodeError, and int() past the digit limit
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "a number too long to read"
        return None, f"invalid JSON ({detail}: {_snippet(raw, 60)!r})"


def _snippet(raw: bytes, limit: int) -> str:
    return raw[:limit].decode("utf-8", errors="replace").strip()


def _one_line(text: str) -> str:
    """An error text from a node, on one line and bounded: it goes into logs and the report."""
    flat = "".join(c if c.isprintable() else " " for c in text).strip()
    return flat if len(flat) <= 300 else flat[:297] + "..."
