"""Ollama HTTP adapter: the only module that talks to an Ollama server.

One :class:`~gpu_router.transport.HttpClient` per node (keep-alive, a wall-clock deadline and a body
cap on every call, no redirects), and typed errors, so the caller can tell a node that is *down*
(nothing answered) from one that is in *error* (it answered, but not with what Ollama answers).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from gpu_router.memory.ggml import Tensor, summarize_tensors
from gpu_router.records import record
from gpu_router.state import (
    InstalledModel,
    InstalledModels,
    LoadedModel,
    ModelInfo,
    NodeStatus,
    ProjectorInfo,
    SsmInfo,
    TensorSummary,
    VisionInfo,
)
from gpu_router.transport import (
    DEFAULT_MAX_BODY_BYTES,
    HttpClient,
    LineStream,
    Pending,
    Response,
    TransportError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# A connect to a live host on a LAN takes milliseconds; a long connect timeout only delays the
# verdict "down" for a host that is gone.
CONNECT_TIMEOUT_CAP_S = 3.0
# The reads a poll makes (OllamaClient.get); the watch asks only the first.
PS = "/api/ps"
TAGS = "/api/tags"
VERSION = "/api/version"
MAX_VERSION_CHARS = 64
# A /api/pull status line is under 300 bytes; an error line quotes a path or a registry message.
PULL_MAX_LINE_BYTES = 64 * 1024


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


class PullFailed(OllamaError):
    """A pull stream ended with Ollama's ``{"error": ...}`` line; ``message`` is Ollama's text."""


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


def parse_tags(body: Any, node: str = "node") -> InstalledModels:
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
                remote=_is_remote(e),
            )
        )
    return InstalledModels(installed)


def _is_remote(entry: Mapping[str, Any]) -> bool:
    """A cloud model: /api/tags and /api/show name a remote model or host for it."""
    return bool(_str(entry.get("remote_model")).strip() or _str(entry.get("remote_host")).strip())


# [ \t] rather than \s: with MULTILINE, ^\s* backtracks over every newline run, so a parameters
# text of 40 KB of newlines took seconds; a hostile body must not stall a poll.
_NUM_CTX = re.compile(r"^[ \t]*num_ctx[ \t]+(\d{1,9})[ \t]*$", re.MULTILINE)
# Bounds no real model reaches: beyond them a value is treated as missing, never allocated for.
_MAX_TENSORS = 100_000
_MAX_BLOCKS = 4096
_MAX_DIMS = 8
_MAX_NAME = 512
_MAX_ELEMENTS = 1 << 48  # far beyond any tensor; keeps every size well inside a float


def _ints(value: object) -> tuple[int, ...] | None:
    """A JSON array of whole numbers (a per-layer GGUF array); None if it is anything else."""
    if not isinstance(value, list) or not value or len(value) > _MAX_BLOCKS:
        return None
    out = []
    for v in value:
        n = _int(v)
        if n is None or n < 0:
            return None
        out.append(n)
    return tuple(out)


def _bools(value: object) -> tuple[bool, ...]:
    if isinstance(value, list) and 0 < len(value) <= _MAX_BLOCKS and all(isinstance(v, bool) for v in value):
        return tuple(value)
    return ()


def _tensor_list(raw: object) -> list[Tensor] | None:
    """/api/show ``tensors``, or None when absent or malformed (then the file size is used)."""
    if not isinstance(raw, list) or not raw or len(raw) > _MAX_TENSORS:
        return None
    out = []
    for entry in raw:
        if not isinstance(entry, dict):
            return None
        name, kind, shape = entry.get("name"), entry.get("type"), entry.get("shape")
        if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
            return None
        if isinstance(kind, bool) or not isinstance(kind, (str, int)):
            return None
        if not isinstance(shape, list) or len(shape) > _MAX_DIMS:
            return None
        dims = [_int(d) for d in shape]
        if any(d is None or d < 0 or d > _MAX_ELEMENTS for d in dims):
            return None
        t = Tensor(name, str(kind), tuple(d for d in dims if d is not None))
        if t.elements > _MAX_ELEMENTS:
            return None
        out.append(t)
    return out


def _tensor_summary(raw: object, block_count: int | None) -> TensorSummary | None:
    if not block_count or block_count > _MAX_BLOCKS:
        return None
    tensors = _tensor_list(raw)
    return summarize_tensors(tensors, block_count) if tensors else None


def parse_show(body: Any, model: str, node: str = "node") -> ModelInfo:
    """Parse a ``POST /api/show`` body into what sizing and loading need.

    Without ``verbose`` Ollama sends every GGUF array as null (``getModelData`` decodes with no
    array values), so per-layer head counts come from the tensors' shapes where the scalars are
    missing; ``tensors`` itself is absent before v0.6.1 and from some proxies.
    """
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

    def first(*suffixes: str) -> int | None:
        for suffix in suffixes:
            n = count(suffix)
            if n is not None:
                return n
        return None

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
    block_count = count("block_count")
    if block_count is not None and block_count > _MAX_BLOCKS:
        block_count = None
    tensors = _tensor_summary(body.get("tensors"), block_count)
    if vocab is None and tensors is not None:
        vocab = tensors.vocab

    embedding = count("embedding_length")
    key_length = count("attention.key_length")
    head_count = count("attention.head_count")
    head_layers = _heads_per_layer(info, arch, "attention.head_count", tensors, key_length or 0)
    if head_count is None and head_layers:
        head_count = max(head_layers)
    head_min = min(head_layers) if head_layers else count("attention.head_count", min)
    per_head = key_length or (embedding // head_min if embedding and head_min else 0)
    kv_layers = _heads_per_layer(info, arch, "attention.head_count_kv", tensors, per_head)
    head_count_kv = count("attention.head_count_kv")
    if head_count_kv is None and kv_layers:
        head_count_kv = max(kv_layers)
    if head_count_kv is None and _blanked(info, arch, "attention.head_count_kv"):
        # a nulled per-layer array and no tensors to rebuild it from: assume no grouping (the
        # largest cache the model could have) rather than Ollama's default of one KV head
        head_count_kv = head_count
    return ModelInfo(
        name=model,
        architecture=arch,
        capabilities=capabilities,
        block_count=block_count,
        embedding_length=embedding,
        head_count=head_count,
        head_count_kv=head_count_kv,
        key_length=key_length,
        value_length=count("attention.value_length"),
        context_length=count("context_length"),
        vocab_size=vocab if vocab is not None and vocab > 0 else None,
        num_ctx=int(m.group(1)) if m else None,
        head_count_min=head_min,
        head_count_kv_min=min(kv_layers) if kv_layers else count("attention.head_count_kv", min),
        head_count_layers=head_layers if len(set(head_layers)) > 1 else (),
        head_count_kv_layers=kv_layers if len(set(kv_layers)) > 1 else (),
        key_length_swa=count("attention.key_length_swa"),
        value_length_swa=count("attention.value_length_swa"),
        feed_forward_length=count("feed_forward_length"),
        sliding_window=count("attention.sliding_window"),
        sliding_window_pattern=_bools(key("attention.sliding_window_pattern")),
        shared_kv_layers=first("attention.shared_kv_layers", "num_kv_shared_layers") or 0,
        expert_count=count("expert_count"),
        expert_used_count=count("expert_used_count"),
        expert_feed_forward_length=count("expert_feed_forward_length"),
        pooling=key("pooling_type") is not None,
        causal=_bool_or_none(key("attention.causal")),
        parameter_count=_positive_int(info.get("general.parameter_count")),
        file_type=_int(info.get("general.file_type")),
        ssm=_ssm(count),
        vision=_vision(count),
        projector=_projector(body.get("projector_info")),
        tensors=tensors,
        remote=_is_remote(body),
    )


def _blanked(info: Mapping[str, Any], arch: str, suffix: str) -> bool:
    """The key is there but its value is not: an array /api/show sent as null (or [])."""
    name = f"{arch}.{suffix}"
    return bool(arch) and name in info and (info[name] is None or info[name] == [])


def _heads_per_layer(
    info: Mapping[str, Any], arch: str, suffix: str, tensors: TensorSummary | None, per_head: int
) -> tuple[int, ...]:
    """Per-layer head counts: the GGUF array (verbose), or rebuilt from the attention tensors'
    widths when Ollama nulled the array. A missing key stays missing: Ollama then takes 1."""
    given = _ints(info.get(f"{arch}.{suffix}")) if arch else None
    if given:
        return given
    if not _blanked(info, arch, suffix) or tensors is None or per_head <= 0:
        return ()
    widths = tensors.attn_q_widths if suffix == "attention.head_count" else tensors.attn_k_widths
    return tuple(w // per_head for w in widths)


def _bool_or_none(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _positive_int(value: object) -> int | None:
    n = _int(value)
    return n if n is not None and n > 0 else None


def _ssm(count: Any) -> SsmInfo | None:
    conv, inner, state = count("ssm.conv_kernel"), count("ssm.inner_size"), count("ssm.state_size")
    if not (conv or inner or state):
        return None
    return SsmInfo(conv or 0, inner or 0, state or 0, count("ssm.group_count") or 0)


def _vision(count: Any) -> VisionInfo | None:
    blocks = count("vision.block_count")
    if not blocks:
        return None
    return VisionInfo(
        block_count=blocks,
        image_size=count("vision.image_size") or 0,
        patch_size=count("vision.patch_size") or 0,
        num_channels=count("vision.num_channels") or 0,
        head_count=count("vision.attention.head_count") or 0,
        embedding_length=count("vision.embedding_length") or 0,
        max_pixels=count("vision.max_pixels"),
        max_num_tiles=count("vision.max_num_tiles") or 0,
    )


def _projector(raw: object) -> ProjectorInfo | None:
    """``projector_info``: the metadata of a separate projector file, when the model has one."""
    if not isinstance(raw, dict) or not raw:
        return None
    return ProjectorInfo(
        parameter_count=_positive_int(raw.get("general.parameter_count")) or 0,
        file_type=_int(raw.get("general.file_type")),
        architecture=_str(raw.get("general.architecture")),
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
        deadline: float | None = None,
    ) -> Any:
        try:
            resp = self._http.request(method, path, json_body=body, timeout_s=timeout_s, deadline=deadline)
        except TransportError as exc:
            raise self._failed(method, path, exc) from None
        return self._json(method, path, resp)

    def _failed(self, method: str, path: str, exc: TransportError) -> OllamaError:
        # Nothing (usable) answered: down. The server answered, but badly (TLS, cap, redirect,
        # invalid HTTP): error.
        kind = BadResponse if exc.answered else NodeUnreachable
        return kind(self.name, f"{method} {path}: {exc.reason}")

    def _json(self, method: str, path: str, resp: Response) -> Any:
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

    # Read-only calls: the report uses only these. ``deadline`` (``time.monotonic()``) ends a call
    # before its timeout: the calls of one poll all end by the poll's deadline.

    def version(self, *, deadline: float | None = None) -> str:
        """``GET /api/version``."""
        return self._read_version(self._call("GET", VERSION, deadline=deadline))

    def ps(self, *, deadline: float | None = None) -> tuple[LoadedModel, ...]:
        """``GET /api/ps``: the models loaded now."""
        return self._read_ps(self._call("GET", PS, deadline=deadline))

    def tags(self, *, deadline: float | None = None) -> tuple[InstalledModel, ...]:
        """``GET /api/tags``: the models on the node's disk."""
        return self._read_tags(self._call("GET", TAGS, deadline=deadline))

    def get(self, path: str, *, deadline: float | None = None) -> Any:
        """One of the polled reads (``PS``, ``TAGS``, ``VERSION``), parsed as its method returns it."""
        return self._read(path, self._call("GET", path, deadline=deadline))

    def start_get(self, path: str, *, deadline: float | None = None, connect: bool = False) -> Pending | None:
        """Send a polled read without waiting for its answer; None when :meth:`get` must be used.

        On an idle kept-alive connection, or with ``connect`` on a new one (``HttpClient.start``):
        a pass over many nodes polls them all from one thread this way (see ``observe``).
        """
        return self._http.start("GET", path, deadline=deadline, connect=connect)

    @property
    def selectable(self) -> bool:
        """:meth:`start_get` can connect without waiting (``HttpClient.selectable``)."""
        return self._http.selectable

    def finish_get(self, path: str, pending: Pending) -> Any:
        """The answer to :meth:`start_get`, as :meth:`get` returns it (``StaleConnection``: ask again)."""
        try:
            resp = pending.finish()
        except TransportError as exc:
            raise self._failed("GET", path, exc) from None
        return self._read(path, self._json("GET", path, resp))

    def _read(self, path: str, body: Any) -> Any:
        if path == PS:
            return self._read_ps(body)
        if path == TAGS:
            return self._read_tags(body)
        if path == VERSION:
            return self._read_version(body)
        raise ValueError(f"not a polled read: {path}")

    def _read_ps(self, body: Any) -> tuple[LoadedModel, ...]:
        return self._parse(PS, lambda: parse_ps(body, self.name))

    def _read_tags(self, body: Any) -> tuple[InstalledModel, ...]:
        return self._parse(TAGS, lambda: parse_tags(body, self.name))

    def _read_version(self, body: Any) -> str:
        if not isinstance(body, dict) or not isinstance(body.get("version"), str):
            raise BadResponse(self.name, "/api/version: no 'version' string")
        version = str(body["version"])
        if len(version) > MAX_VERSION_CHARS:
            # it goes into the report and the logs; Ollama's are like "0.12.6" or "0.13.0-rc1"
            raise BadResponse(self.name, f"/api/version: a version string of {len(version)} characters")
        return version

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

    def pull(self, model: str, *, timeout_s: float, idle_timeout_s: float) -> PullStream:
        """``POST /api/pull``, streamed: iterate the result for its status lines as they come.

        Connect and the response headers happen here, with the same errors as the other calls: an
        HTTP error (``{"error": ...}`` with a 4xx/5xx) is :class:`ApiError`. ``timeout_s`` bounds the
        whole pull and ``idle_timeout_s`` each silence in it.
        """
        try:
            lines = self._http.stream_lines(
                "POST",
                "/api/pull",
                json_body={"model": model},
                total_timeout_s=timeout_s,
                idle_timeout_s=idle_timeout_s,
                max_line_bytes=PULL_MAX_LINE_BYTES,
            )
        except TransportError as exc:
            kind = BadResponse if exc.answered else NodeUnreachable
            raise kind(self.name, f"POST /api/pull: {exc.reason}") from None
        if lines.status >= 400:
            # Errors before the first line (a bad name, a 500 from a proxy) are one JSON object.
            try:
                first = next(iter(lines), b"")
            except TransportError:
                first = b""
            finally:
                lines.close()
            data, _ = _decode_json(first)
            error = data.get("error") if isinstance(data, dict) else None
            text = error if isinstance(error, str) else _snippet(first, 120) or lines.reason
            raise ApiError(self.name, lines.status, f"POST /api/pull: {_one_line(text)}")
        return PullStream(self.name, lines)


@record
class PullStatus:
    """One status line of a pull: ``digest``, ``total_bytes`` and ``completed_bytes`` while a blob comes."""

    status: str
    digest: str = ""
    total_bytes: int | None = None
    completed_bytes: int | None = None


class PullStream:
    """The status lines of one ``POST /api/pull``; iterate once. Thread-safe ``abort()`` ends it early.

    Iterating raises :class:`PullFailed` on Ollama's ``{"error": ...}`` line (it answers 200 once a
    line went out, so the failure comes in the body: routes.go@v0.30.0 ``streamResponse``),
    :class:`BadResponse` on a line that is not a JSON object or a stream that ends without
    ``success``, and :class:`NodeUnreachable` when the connection breaks or goes silent too long.
    """

    def __init__(self, node: str, lines: LineStream) -> None:
        self.node = node
        self._lines = lines

    def __iter__(self) -> Iterator[PullStatus]:
        done = False
        try:
            for raw in self._lines:
                data, problem = _decode_json(raw)
                if problem or not isinstance(data, dict):
                    raise BadResponse(
                        self.node, f"POST /api/pull: {problem or 'a line that is not an object'}"
                    )
                if "error" in data:
                    error = data["error"]
                    raise PullFailed(self.node, _one_line(error if isinstance(error, str) else str(error)))
                status = _str(data.get("status"))
                done = done or status == "success"
                yield PullStatus(
                    status, _str(data.get("digest")), _int(data.get("total")), _int(data.get("completed"))
                )
        except TransportError as exc:
            kind = BadResponse if exc.answered else NodeUnreachable
            raise kind(self.node, f"POST /api/pull: {exc.reason}") from None
        finally:
            self._lines.close()
        if not done:
            raise BadResponse(self.node, "POST /api/pull: the stream ended without 'success'")

    def abort(self) -> None:
        """End the pull from another thread: Ollama stops it when the connection goes (and keeps what it
        downloaded for next time); the iterating thread gets an error at once."""
        self._lines.abort()

    def close(self) -> None:
        """Close the connection (from the iterating thread)."""
        self._lines.close()


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
