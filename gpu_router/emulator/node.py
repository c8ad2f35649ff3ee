"""An emulated Ollama server: real HTTP on loopback, simulated GPUs, Ollama's scheduler rules.

One :class:`EmulatedNode` is one ``ollama serve`` (v0.12-era behaviour, reference sections 1-3a):
the same JSON shapes and error strings, loads through generate/chat/embed/embeddings, keep_alive
expiry, serialized loads that take ``load_delay_s``, the classic memory estimate, eviction of the idle
model with the shortest keep_alive, partial offload only when nothing else is loaded, an optional
dcgm-exporter ``/metrics`` on the same port, faults on demand, and a record of every request.

Locking: ``_state_lock`` guards every mutable field and is only held briefly, so read endpoints keep
answering while a load sleeps; ``_sched_lock`` serializes loads (held for the whole load, like
Ollama's ``processPending`` loop). Always take ``_sched_lock`` before ``_state_lock``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import math
import random
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from gpu_router.emulator.catalogue import (
    MAX_DURATION_NS,
    EmulatorError,
    MemoryEstimate,
    ModelSpec,
    estimate_memory,
    normalize_name,
    resolve_model,
)
from gpu_router.state import GIB, MIB

logger = logging.getLogger(__name__)

FOREVER_S = math.inf
SERVER_BUSY = "server busy, please try again.  maximum pending requests exceeded"
MUTATING_PATHS = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/api/pull",
        "/api/push",
        "/api/delete",
        "/api/create",
        "/api/copy",
    }
)
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
_HANG_POLL_S = 0.05


class Fault(str, enum.Enum):
    """What a node does wrong on purpose (see :meth:`EmulatedNode.set_fault`)."""

    REFUSE = "refuse"  # listening socket closed: connection refused (with paths: connection dropped)
    HANG = "hang"  # accept and never answer until cleared or stopped
    HTTP500 = "http500"  # 500 {"error": ...}
    GARBAGE = "garbage"  # 200 with a body that is not valid JSON
    WRONG_SHAPE = "wrong_shape"  # 200 valid JSON of the wrong shape
    SLOW = "slow"  # the right answer, after slow_s


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request the node received (recorded before any fault is applied)."""

    method: str
    path: str
    body: dict[str, Any] | None
    at_monotonic_s: float


@dataclass(frozen=True)
class SchedulerEvent:
    """Something the scheduler did: ``load``, ``reload``, ``evict``, ``expire``, ``unload`` or ``restart``."""

    kind: str
    model: str
    at_monotonic_s: float
    detail: str = ""


# ---------------------------------------------------------------------------------------------
# keep_alive: api.Duration.UnmarshalJSON and Go's time.ParseDuration


_GO_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_GO_NUMBER = re.compile(r"([0-9]*)(?:\.([0-9]*))?")
_GO_UNIT = re.compile(r"[^0-9.]*")


def parse_go_duration(text: str) -> float:
    """Go's ``time.ParseDuration`` in seconds; raises ValueError with Go's exact message."""
    quoted = json.dumps(text, ensure_ascii=False)
    rest = text
    negative = False
    if rest[:1] in ("-", "+"):
        negative = rest[0] == "-"
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if rest == "":
        raise ValueError(f"time: invalid duration {quoted}")
    total_ns = 0.0
    while rest:
        number = _GO_NUMBER.match(rest)
        assert number is not None  # the pattern matches the empty string
        whole, frac = number.group(1), number.group(2)
        if not whole and not frac:
            raise ValueError(f"time: invalid duration {quoted}")
        rest = rest[number.end() :]
        unit_match = _GO_UNIT.match(rest)
        unit = unit_match.group(0) if unit_match else ""
        if unit == "":
            raise ValueError(f"time: missing unit in duration {quoted}")
        if unit not in _GO_UNITS_NS:
            raise ValueError(
                f"time: unknown unit {json.dumps(unit, ensure_ascii=False)} in duration {quoted}"
            )
        rest = rest[len(unit) :]
        total_ns += float(f"{whole or '0'}.{frac or '0'}") * _GO_UNITS_NS[unit]
    if total_ns > MAX_DURATION_NS:
        raise ValueError(f"time: invalid duration {quoted}")
    return -total_ns / 1e9 if negative else total_ns / 1e9


def parse_keep_alive(value: object) -> float | None:
    """A request's ``keep_alive`` in seconds: None when absent/null, ``math.inf`` for forever.

    A number is seconds (negative = forever); a string is a Go duration (negative = forever; a bare
    integer string such as ``"-1"`` is an error, as in Ollama). Raises ValueError with Go's message.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("Unsupported type: 'bool'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_go_duration(value)
    elif isinstance(value, list):
        raise ValueError("Unsupported type: '[]interface {}'")
    elif isinstance(value, dict):
        raise ValueError("Unsupported type: 'map[string]interface {}'")
    else:
        raise ValueError(f"Unsupported type: '{type(value).__name__}'")
    if seconds < 0 or math.isnan(seconds) or seconds * 1e9 >= MAX_DURATION_NS:
        return FOREVER_S
    return seconds


# ---------------------------------------------------------------------------------------------
# time formatting


def format_rfc3339nano(wall_ns: int, tz: timezone) -> str:
    """Go's ``time.RFC3339Nano``: trailing zeros of the fraction trimmed, ``Z`` for UTC."""
    seconds, frac = divmod(wall_ns, 1_000_000_000)
    dt = datetime.fromtimestamp(seconds, tz)
    text = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    offset = dt.utcoffset() or timedelta(0)
    if offset == timedelta(0):
        return text + "Z"
    total_min = int(offset.total_seconds()) // 60
    sign = "-" if total_min < 0 else "+"
    hours, minutes = divmod(abs(total_min), 60)
    return f"{text}{sign}{hours:02d}:{minutes:02d}"


def _human_gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


# ---------------------------------------------------------------------------------------------
# internal records


class _ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class _FaultState:
    fault: Fault
    slow_s: float
    paths: frozenset[str] | None


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json; charset=utf-8"


@dataclass(frozen=True)
class _Placement:
    vram_by_gpu: dict[int, int]
    size_bytes: int


@dataclass
class _Runner:
    """A loaded (or loading) model. Mutable; guarded by the node's state lock."""

    spec: ModelSpec
    num_ctx: int
    num_gpu: int  # the requested option; -1 = auto
    session_s: float
    size_bytes: int
    vram_by_gpu: dict[int, int]
    epoch: int
    refcount: int = 0
    loading: bool = True
    expires_mono: float = 0.0
    expires_wall_ns: int = 0
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def size_vram(self) -> int:
        return sum(self.vram_by_gpu.values())

    def set_expiry(self, now_mono: float, now_wall_ns: int) -> None:
        if math.isinf(self.session_s):
            self.expires_mono = math.inf
            self.expires_wall_ns = now_wall_ns + MAX_DURATION_NS
        else:
            self.expires_mono = now_mono + self.session_s
            self.expires_wall_ns = now_wall_ns + int(self.session_s * 1e9)


@dataclass
class _Installed:
    spec: ModelSpec
    modified_wall_ns: int


def _gpu_model_name(total_mib: int) -> str:
    names = {
        4096: "NVIDIA GeForce GTX 1650",
        6144: "NVIDIA GeForce RTX 2060",
        8192: "NVIDIA GeForce RTX 3070",
        12288: "NVIDIA GeForce RTX 3060",
        16384: "NVIDIA RTX A4000",
        24576: "NVIDIA GeForce RTX 4090",
        49152: "NVIDIA L40S",
        81920: "NVIDIA H100 80GB HBM3",
    }
    return names.get(total_mib, "NVIDIA L4")


# ---------------------------------------------------------------------------------------------
# HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128  # socketserver's default of 5 resets connections under benchmark load

    def __init__(self, address: tuple[str, int], node: EmulatedNode) -> None:
        self.node = node
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # HTTP/1.0: one request per connection, so REFUSE and stop() never leave kept-alive sockets behind.
    protocol_version = "HTTP/1.0"
    timeout = 30

    def handle(self) -> None:
        node = self.server.node
        node._handler_enter()
        try:
            super().handle()
        finally:
            node._handler_leave()

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
        path = urlsplit(self.path).path
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        raw = self.rfile.read(length) if length > 0 else b""
        reply = self.server.node._handle_http(method, path, raw)
        if reply is None:
            # Drop the connection without a response: the client sees a connection error.
            self.close_connection = True
            return
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("client went away before the reply to %s %s", method, path)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


def _json_reply(status: int, obj: object) -> _Reply:
    return _Reply(status, json.dumps(obj, separators=(",", ":")).encode())


def _ndjson_reply(objs: Iterable[object]) -> _Reply:
    lines = "".join(json.dumps(o, separators=(",", ":")) + "\n" for o in objs)
    return _Reply(200, lines.encode(), "application/x-ndjson")


def _text_reply(status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> _Reply:
    return _Reply(status, text.encode(), content_type)


def _lenient_json(raw: bytes) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


# ---------------------------------------------------------------------------------------------
# the node


class EmulatedNode:
    """One emulated ``ollama serve`` listening on loopback. Also a context manager (start/stop)."""

    def __init__(
        self,
        name: str = "gpu-a",
        gpus_mib: Sequence[int] = (8192,),
        models: Iterable[str | ModelSpec] = ("llama3.1:8b", "nomic-embed-text:latest"),
        *,
        load_delay_s: float = 0.0,
        metrics: bool = False,
        default_keep_alive_s: float = 300.0,
        default_num_ctx: int = 4096,
        version: str = "0.12.6",
        host: str = "127.0.0.1",
        port: int = 0,
        ram_bytes: int = 32 * GIB,
        reserved_mib: int = 0,
        utc_offset_s: int | None = None,
        max_queue: int = 512,
        max_recorded: int = 100_000,
    ) -> None:
        if host not in _LOOPBACK_HOSTS and not host.startswith("127."):
            raise EmulatorError(f"node {name}: the emulator only listens on loopback, not {host!r}")
        if any(m <= 0 for m in gpus_mib):
            raise EmulatorError(f"node {name}: every GPU needs a positive size in MiB, got {list(gpus_mib)}")
        if load_delay_s < 0 or default_num_ctx <= 0 or ram_bytes <= 0 or reserved_mib < 0:
            raise EmulatorError(f"node {name}: load_delay_s, default_num_ctx, ram_bytes must be positive")
        self.name = name
        self.gpus_mib: tuple[int, ...] = tuple(int(m) for m in gpus_mib)
        self.load_delay_s = float(load_delay_s)
        self.metrics = metrics
        self.default_keep_alive_s = FOREVER_S if default_keep_alive_s < 0 else float(default_keep_alive_s)
        self.default_num_ctx = int(default_num_ctx)
        self.version = version
        self.host = host
        self.ram_bytes = int(ram_bytes)
        self.reserved_mib = int(reserved_mib)
        self.max_queue = max_queue
        if utc_offset_s is None:
            local = datetime.now().astimezone().utcoffset() or timedelta(0)
            self._tz = timezone(local)
        else:
            self._tz = timezone(timedelta(seconds=utc_offset_s))

        self._state_lock = threading.RLock()
        self._sched_lock = threading.Lock()
        self._listen_lock = threading.RLock()
        self._handlers_idle = threading.Condition(threading.Lock())
        self._active_handlers = 0
        self._stop_event = threading.Event()

        self._installed: dict[str, _Installed] = {}
        self._runners: dict[str, _Runner] = {}
        self._other_usage_bytes = [0] * len(self.gpus_mib)
        self._requests: deque[RecordedRequest] = deque(maxlen=max_recorded)
        self._events: deque[SchedulerEvent] = deque(maxlen=max_recorded)
        self._fault: _FaultState | None = None
        self._epoch = 0
        self._pending = 0

        self._port = int(port)
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._started = False
        self._stopped = False
        self._down = False
        self._down_timer: threading.Timer | None = None

        base_ns = time.time_ns() - 3 * 86_400 * 10**9
        for i, model in enumerate(models):
            spec = resolve_model(model)
            self._installed[spec.name] = _Installed(spec, base_ns - i * 7_919 * 10**9)

    def __repr__(self) -> str:
        return f"EmulatedNode(name={self.name!r}, gpus_mib={self.gpus_mib!r}, port={self._port})"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> str:
        """Listen on ``host:port`` (port 0 = any free port) and return the base URL."""
        with self._listen_lock:
            if self._stopped:
                raise EmulatorError(f"node {self.name} was stopped; create a new EmulatedNode")
            if not self._started:
                self._started = True
                if self._port == 0:
                    self._listen()  # pick the port now, even if a REFUSE fault is already set
                self._sync_listening()
        return self.url

    def stop(self) -> None:
        """Close the server and wait for its threads; safe to call twice."""
        with self._listen_lock:
            if self._stopped:
                return
            self._stopped = True
            self._stop_event.set()
            if self._down_timer is not None:
                self._down_timer.cancel()
            self._sync_listening()
        with self._state_lock:
            for r in self._runners.values():
                r.ready.set()
        deadline = time.monotonic() + 5.0
        with self._handlers_idle:
            while self._active_handlers > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    logger.warning(
                        "node %s: %d handler(s) still running at stop", self.name, self._active_handlers
                    )
                    break
                self._handlers_idle.wait(left)

    def __enter__(self) -> EmulatedNode:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The TCP port (0 until started with port 0)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` once started (stays valid after stop, for "node down" tests)."""
        if not self._port:
            raise EmulatorError(f"node {self.name} has no port yet; call start() first")
        return f"http://{self.host}:{self._port}"

    @property
    def metrics_url(self) -> str:
        """The dcgm-exporter style endpoint on the same port (answers 404 unless ``metrics=True``)."""
        return self.url + "/metrics"

    @property
    def running(self) -> bool:
        """True while the listening socket is open."""
        return self._server is not None

    def _sync_listening(self) -> None:
        with self._listen_lock:
            fault = self._fault
            refusing = fault is not None and fault.fault is Fault.REFUSE and fault.paths is None
            want = self._started and not self._stopped and not self._down and not refusing
            if want and self._server is None:
                self._listen()
            elif not want and self._server is not None:
                self._unlisten()

    def _listen(self) -> None:
        last_error: OSError | None = None
        for _ in range(20):
            try:
                server = _Server((self.host, self._port), self)
                break
            except OSError as exc:
                # Re-listening on the same port right after closing it can race the kernel.
                last_error = exc
                time.sleep(0.05)
        else:
            raise EmulatorError(f"node {self.name}: cannot listen on {self.host}:{self._port}: {last_error}")
        self._port = int(server.server_address[1])
        self._server = server
        self._serve_thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name=f"emulator-{self.name}",
            daemon=True,
        )
        self._serve_thread.start()
        logger.debug("node %s listening on %s", self.name, self.url)

    def _unlisten(self) -> None:
        server, thread = self._server, self._serve_thread
        self._server = self._serve_thread = None
        if server is not None:
            stopper = threading.Thread(target=server.shutdown, name=f"emulator-{self.name}-stop", daemon=True)
            stopper.start()
            # Wake the accept loop with an empty connection so it sees the shutdown at once
            # instead of at its next poll; tests stop hundreds of nodes.
            deadline = time.monotonic() + 5.0
            while stopper.is_alive() and time.monotonic() < deadline:
                self._poke(server)
                stopper.join(0.01)
            server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)

    @staticmethod
    def _poke(server: _Server) -> None:
        try:
            with socket.create_connection(
                (str(server.server_address[0]), int(server.server_address[1])), 0.2
            ):
                pass
        except OSError:
            pass

    def _handler_enter(self) -> None:
        with self._handlers_idle:
            self._active_handlers += 1

    def _handler_leave(self) -> None:
        with self._handlers_idle:
            self._active_handlers -= 1
            if self._active_handlers == 0:
                self._handlers_idle.notify_all()

    # -- faults and restarts -----------------------------------------------------------------

    def set_fault(self, fault: Fault, *, slow_s: float = 1.0, paths: Iterable[str] | None = None) -> None:
        """Misbehave until :meth:`clear_fault`. ``paths`` limits the fault to those request paths.

        REFUSE without paths closes the listening socket (connection refused); with paths it drops
        those requests' connections unanswered. Faulted requests (except SLOW) have no side effects.
        """
        if slow_s < 0:
            raise EmulatorError("slow_s must be >= 0")
        with self._listen_lock:
            with self._state_lock:
                self._fault = _FaultState(
                    Fault(fault), float(slow_s), None if paths is None else frozenset(paths)
                )
            self._sync_listening()

    def clear_fault(self) -> None:
        """Behave again; after REFUSE the node listens again on the same port."""
        with self._listen_lock:
            with self._state_lock:
                self._fault = None
            self._sync_listening()

    def restart(self, down_s: float = 0.0, *, wait: bool = True) -> None:
        """Simulate an Ollama restart: every loaded model is gone.

        With ``down_s > 0`` the port refuses connections for that long first; ``wait=False`` returns
        at once and comes back in the background.
        """
        with self._state_lock:
            dropped = sorted(self._runners)
            for r in self._runners.values():
                r.ready.set()
            self._runners.clear()
            self._epoch += 1
            self._event("restart", "", ",".join(dropped))
        if down_s <= 0 or not self._started or self._stopped:
            return
        with self._listen_lock:
            self._down = True
            self._sync_listening()
        if wait:
            self._stop_event.wait(down_s)
            self._come_back()
        else:
            timer = threading.Timer(down_s, self._come_back)
            timer.daemon = True
            self._down_timer = timer
            timer.start()

    def _come_back(self) -> None:
        with self._listen_lock:
            self._down = False
            self._sync_listening()

    # -- observation and set-up for tests ------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every HTTP request received so far, oldest first (a copy)."""
        with self._state_lock:
            return list(self._requests)

    def mutating_requests(self) -> list[RecordedRequest]:
        """Recorded POST/DELETE requests to the state-changing paths (:data:`MUTATING_PATHS`)."""
        return [r for r in self.requests if r.method in ("POST", "DELETE") and r.path in MUTATING_PATHS]

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        with self._state_lock:
            self._requests.clear()

    def events(self) -> list[SchedulerEvent]:
        """What the scheduler did (load, reload, evict, expire, unload, restart), oldest first."""
        with self._state_lock:
            return list(self._events)

    def clear_events(self) -> None:
        """Forget the scheduler events."""
        with self._state_lock:
            self._events.clear()

    def installed(self) -> list[ModelSpec]:
        """The models on this node's disk."""
        with self._state_lock:
            return [i.spec for i in self._installed.values()]

    def install(self, model: str | ModelSpec) -> ModelSpec:
        """Put a model on disk (like ``ollama pull``, without a request)."""
        spec = resolve_model(model)
        with self._state_lock:
            if spec.name not in self._installed:
                self._installed[spec.name] = _Installed(spec, time.time_ns())
        return spec

    def loaded(self) -> list[dict[str, Any]]:
        """The ``/api/ps`` entries, exactly as the API returns them."""
        with self._state_lock:
            self._expire_locked()
            return self._ps_locked()

    def load(
        self,
        model: str | ModelSpec,
        keep_alive: float | str | None = None,
        num_ctx: int | None = None,
        num_gpu: int | None = None,
    ) -> dict[str, Any]:
        """Load an installed model without HTTP, under the same scheduler rules; returns its ps entry."""
        spec = self._installed_spec(model)
        if spec is None:
            raise EmulatorError(f"node {self.name}: model {model!r} is not installed")
        try:
            keep = parse_keep_alive(keep_alive)
        except ValueError as exc:
            raise EmulatorError(f"keep_alive {keep_alive!r}: {exc}") from None
        try:
            runner = self._acquire(spec, keep, num_ctx, num_gpu)
        except _ApiError as exc:
            raise EmulatorError(f"node {self.name}: cannot load {spec.name}: {exc.message}") from None
        with self._state_lock:
            entry = self._ps_entry(runner)
        self._release(runner)
        return entry

    def unload(self, model: str | ModelSpec) -> None:
        """Unload a model now (like ``keep_alive: 0``); nothing happens if it is not loaded."""
        name = model.name if isinstance(model, ModelSpec) else normalize_name(model)
        self._expire_runner(name)

    def set_other_usage_mib(self, gpu_index: int, mib: int) -> None:
        """VRAM held by other processes on one GPU: less free for Ollama, more "used" in /metrics."""
        if not 0 <= gpu_index < len(self.gpus_mib):
            raise EmulatorError(f"node {self.name} has no GPU {gpu_index}")
        if mib < 0:
            raise EmulatorError("other usage must be >= 0 MiB")
        with self._state_lock:
            self._other_usage_bytes[gpu_index] = int(mib) * MIB

    def gpu_state(self) -> list[dict[str, Any]]:
        """Per GPU: index, name, uuid, total_bytes, used_bytes, free_bytes, reserved_bytes."""
        with self._state_lock:
            self._expire_locked()
            out: list[dict[str, Any]] = []
            for i, total_mib in enumerate(self.gpus_mib):
                total = total_mib * MIB
                reserved = self.reserved_mib * MIB
                used = self._other_usage_bytes[i] + sum(
                    r.vram_by_gpu.get(i, 0) for r in self._runners.values()
                )
                out.append(
                    {
                        "index": i,
                        "name": _gpu_model_name(total_mib),
                        "uuid": self._gpu_uuid(i),
                        "total_bytes": total,
                        "used_bytes": used,
                        "free_bytes": max(0, total - reserved - used),
                        "reserved_bytes": reserved,
                    }
                )
            return out

    @property
    def max_loaded_models(self) -> int:
        """OLLAMA_MAX_LOADED_MODELS auto: 3 per GPU, 3 on a CPU-only host."""
        return 3 * max(1, len(self.gpus_mib))

    def estimate(self, model: str | ModelSpec, num_ctx: int | None = None) -> MemoryEstimate:
        """This node's memory estimate at ``num_ctx`` (default: as for a request without options)."""
        spec = resolve_model(model)
        return estimate_memory(spec, self._effective_num_ctx(spec, num_ctx))

    # -- scheduler ---------------------------------------------------------------------------

    def _event(self, kind: str, model: str, detail: str = "") -> None:
        self._events.append(SchedulerEvent(kind, model, time.monotonic(), detail))
        logger.debug("node %s: %s %s %s", self.name, kind, model, detail)

    def _gpu_uuid(self, index: int) -> str:
        digest = hashlib.sha256(f"{self.name}/gpu{index}".encode()).digest()
        return f"GPU-{uuid.UUID(bytes=digest[:16])}"

    def _installed_spec(self, model: str | ModelSpec) -> ModelSpec | None:
        name = model.name if isinstance(model, ModelSpec) else normalize_name(model)
        with self._state_lock:
            inst = self._installed.get(name)
            return inst.spec if inst else None

    def _effective_num_ctx(self, spec: ModelSpec, requested: int | None) -> int:
        if requested is not None and requested > 0:
            return int(requested)
        if spec.num_ctx_param:
            return spec.num_ctx_param
        return self.default_num_ctx

    @staticmethod
    def _needs_reload(runner: _Runner, num_ctx: int, num_gpu: int) -> bool:
        # needsReload: num_gpu -1 (auto) never forces a reload.
        return runner.num_ctx != num_ctx or (num_gpu >= 0 and num_gpu != runner.num_gpu)

    def _expire_locked(self) -> None:
        now = time.monotonic()
        for name, r in list(self._runners.items()):
            if r.refcount == 0 and not r.loading and r.expires_mono <= now:
                del self._runners[name]
                self._event("expire", name)

    def _expire_runner(self, name: str) -> None:
        with self._state_lock:
            r = self._runners.get(name)
            if r is None:
                return
            r.session_s = 0.0
            if r.refcount == 0 and not r.loading:
                del self._runners[name]
                self._event("unload", name)

    def _acquire(
        self, spec: ModelSpec, keep_alive_s: float | None, num_ctx_opt: int | None, num_gpu_opt: int | None
    ) -> _Runner:
        """Get the model loaded and count one in-flight request on it; pair with :meth:`_release`."""
        num_ctx = self._effective_num_ctx(spec, num_ctx_opt)
        num_gpu = -1 if num_gpu_opt is None or num_gpu_opt < 0 else int(num_gpu_opt)
        while True:
            with self._state_lock:
                self._expire_locked()
                r = self._runners.get(spec.name)
                if r is None or (not r.loading and self._needs_reload(r, num_ctx, num_gpu)):
                    if self._pending >= self.max_queue:
                        raise _ApiError(503, SERVER_BUSY)
                    self._pending += 1
                    break
                if not r.loading:
                    # The fast path: loaded models never enter the load queue.
                    r.refcount += 1
                    if keep_alive_s is not None:
                        r.session_s = keep_alive_s
                    return r
                waiting = r
            while not waiting.ready.wait(_HANG_POLL_S):
                if self._stop_event.is_set():
                    raise _ApiError(500, "server shutting down")
        try:
            with self._sched_lock:
                return self._load_serialized(spec, keep_alive_s, num_ctx, num_gpu)
        finally:
            with self._state_lock:
                self._pending -= 1

    def _load_serialized(
        self, spec: ModelSpec, keep_alive_s: float | None, num_ctx: int, num_gpu: int
    ) -> _Runner:
        reload = False
        with self._state_lock:
            self._expire_locked()
            existing = self._runners.get(spec.name)
            if existing is not None:
                if not self._needs_reload(existing, num_ctx, num_gpu):
                    existing.refcount += 1
                    if keep_alive_s is not None:
                        existing.session_s = keep_alive_s
                    return existing
                del self._runners[spec.name]
                reload = True
            placement = self._fit_locked(spec, num_ctx, num_gpu)
            runner = _Runner(
                spec=spec,
                num_ctx=num_ctx,
                num_gpu=num_gpu,
                session_s=self.default_keep_alive_s if keep_alive_s is None else keep_alive_s,
                size_bytes=placement.size_bytes,
                vram_by_gpu=dict(placement.vram_by_gpu),
                epoch=self._epoch,
                refcount=1,
            )
            # Visible in /api/ps while loading, expiring at now + keep_alive.
            runner.set_expiry(time.monotonic(), time.time_ns())
            self._runners[spec.name] = runner
            self._event(
                "reload" if reload else "load",
                spec.name,
                f"size={runner.size_bytes} size_vram={runner.size_vram} num_ctx={num_ctx}",
            )
        if self.load_delay_s > 0:
            self._stop_event.wait(self.load_delay_s)
        with self._state_lock:
            runner.ready.set()
            if (
                self._stop_event.is_set()
                or runner.epoch != self._epoch
                or self._runners.get(spec.name) is not runner
            ):
                if self._runners.get(spec.name) is runner:
                    del self._runners[spec.name]
                raise _ApiError(500, "llama runner process has terminated: signal: killed")
            runner.loading = False
            return runner

    def _release(self, runner: _Runner) -> None:
        """One request on ``runner`` finished: the idle timer (re)starts when none are left."""
        with self._state_lock:
            runner.refcount = max(0, runner.refcount - 1)
            if runner.refcount:
                return
            runner.set_expiry(time.monotonic(), time.time_ns())
            if runner.session_s == 0 and self._runners.get(runner.spec.name) is runner:
                del self._runners[runner.spec.name]
                self._event("unload", runner.spec.name)

    def _pick_victim(self, runners: list[_Runner]) -> _Runner:
        # ByDurationAndName: shortest session first (forever = inf sorts last), then name; idle ones first.
        ordered = sorted(runners, key=lambda r: (r.session_s, r.spec.name))
        for r in ordered:
            if r.refcount == 0 and not r.loading:
                return r
        return ordered[0]

    def _fit_locked(self, spec: ModelSpec, num_ctx: int, num_gpu: int) -> _Placement:
        est = estimate_memory(spec, num_ctx)
        while True:
            others = list(self._runners.values())
            if len(others) >= self.max_loaded_models:
                victim = self._pick_victim(others)
                del self._runners[victim.spec.name]
                self._event("evict", victim.spec.name, f"max loaded models reached, for {spec.name}")
                continue
            placement, why = self._try_place(est, num_gpu, require_full=bool(others))
            if placement is not None:
                return placement
            if not others:
                raise _ApiError(500, why)
            victim = self._pick_victim(others)
            del self._runners[victim.spec.name]
            self._event("evict", victim.spec.name, f"to make room for {spec.name}")

    def _gpu_free_locked(self) -> list[tuple[int, int]]:
        free: list[tuple[int, int]] = []
        for i, total_mib in enumerate(self.gpus_mib):
            used = self._other_usage_bytes[i] + sum(r.vram_by_gpu.get(i, 0) for r in self._runners.values())
            free.append((i, max(0, (total_mib - self.reserved_mib) * MIB - used)))
        return free

    def _ram_check(self, cpu_bytes: int) -> str:
        ram_used = sum(r.size_bytes - r.size_vram for r in self._runners.values())
        available = self.ram_bytes - ram_used
        if cpu_bytes > available:
            return (
                f"model requires more system memory ({_human_gib(cpu_bytes)}) "
                f"than is available ({_human_gib(max(0, available))})"
            )
        return ""

    def _try_place(
        self, est: MemoryEstimate, num_gpu: int, require_full: bool
    ) -> tuple[_Placement | None, str]:
        gpus = self._gpu_free_locked()
        if not gpus or num_gpu == 0:
            why = self._ram_check(est.cpu_bytes)
            return (None, why) if why else (_Placement({}, est.cpu_bytes), "")
        oom = "llama runner process has terminated: cudaMalloc failed: out of memory"
        layers = est.layers
        order = sorted(gpus, key=lambda g: (-g[1], g[0]))
        forced = num_gpu if 0 < num_gpu < layers else None
        caps, buf_gpu = self._layer_caps(order, est)
        if forced is None:
            best_index, best_free = order[0]
            if best_free >= est.full_bytes:
                return _Placement({best_index: est.full_bytes}, est.full_bytes), ""
            if len(order) > 1 and sum(caps.values()) >= layers:
                vram = self._spread(order, caps, buf_gpu, layers, est)
                return _Placement(vram, sum(vram.values())), ""
            if num_gpu >= layers:
                return None, oom
            if require_full:
                return None, "does not fit fully in VRAM with other models loaded"
            n = min(sum(caps.values()), layers - 1)
        else:
            if sum(caps.values()) < forced:
                return None, oom
            n = forced
        if n <= 0:
            why = self._ram_check(est.cpu_bytes)
            return (None, why) if why else (_Placement({}, est.cpu_bytes), "")
        vram = self._spread(order, caps, buf_gpu, n, est)
        cpu_part = (layers - n) * est.per_layer_bytes
        why = self._ram_check(cpu_part)
        if why:
            return None, why
        return _Placement(vram, sum(vram.values()) + cpu_part), ""

    @staticmethod
    def _layer_caps(order: list[tuple[int, int]], est: MemoryEstimate) -> tuple[dict[int, int], int | None]:
        """Whole layers each GPU can take after its overhead; the first usable GPU also holds the buffer."""
        caps: dict[int, int] = {}
        buf_gpu: int | None = None
        per_layer = max(1, est.per_layer_bytes)
        for index, free in order:
            overhead = est.gpu_overhead_bytes + (est.buffer_bytes if buf_gpu is None else 0)
            cap = max(0, (free - overhead) // per_layer)
            if cap > 0 and buf_gpu is None:
                buf_gpu = index
            caps[index] = cap
        return caps, buf_gpu

    @staticmethod
    def _spread(
        order: list[tuple[int, int]], caps: dict[int, int], buf_gpu: int | None, n: int, est: MemoryEstimate
    ) -> dict[int, int]:
        # Classic estimateGPULayers hands layers to the GPUs with space in turn.
        assigned = {index: 0 for index, _ in order}
        remaining = n
        while remaining > 0:
            progressed = False
            for index, _ in order:
                if remaining and assigned[index] < caps[index]:
                    assigned[index] += 1
                    remaining -= 1
                    progressed = True
            if not progressed:
                break
        vram: dict[int, int] = {}
        for index, count in assigned.items():
            if count > 0:
                overhead = est.gpu_overhead_bytes + (est.buffer_bytes if index == buf_gpu else 0)
                vram[index] = overhead + count * est.per_layer_bytes
        return vram

    # -- rendering ---------------------------------------------------------------------------

    def _details(self, spec: ModelSpec) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": spec.family,
            "families": list(spec.families),
            "parameter_size": spec.parameter_size,
            "quantization_level": spec.quantization_level,
        }

    def _ps_entry(self, r: _Runner) -> dict[str, Any]:
        return {
            "name": r.spec.name,
            "model": r.spec.name,
            "size": r.size_bytes,
            "digest": r.spec.digest,
            "details": self._details(r.spec),
            "expires_at": format_rfc3339nano(r.expires_wall_ns, self._tz),
            "size_vram": r.size_vram,
            "context_length": r.num_ctx,
        }

    def _ps_locked(self) -> list[dict[str, Any]]:
        runners = sorted(self._runners.values(), key=lambda r: (-r.expires_wall_ns, r.spec.name))
        return [self._ps_entry(r) for r in runners]

    def _show(self, spec: ModelSpec, modified_ns: int) -> dict[str, Any]:
        params: list[tuple[str, str]] = []
        if spec.num_ctx_param:
            params.append(("num_ctx", str(spec.num_ctx_param)))
        params.extend(("stop", json.dumps(s)) for s in spec.stop)
        blob = hashlib.sha256(f"{spec.name}/model".encode()).hexdigest()
        modelfile = [
            '# Modelfile generated by "ollama show"',
            "# To build a new Modelfile based on this one, replace the FROM line with:",
            f"# FROM {spec.name}",
            "",
            f"FROM /usr/share/ollama/.ollama/models/blobs/sha256-{blob}",
            f'TEMPLATE """{spec.template}"""',
        ]
        modelfile.extend(f"PARAMETER {k} {v}" for k, v in params)
        if spec.license:
            modelfile.append(f'LICENSE """{spec.license}"""')
        out: dict[str, Any] = {}
        if spec.license:
            out["license"] = spec.license
        out["modelfile"] = "\n".join(modelfile) + "\n"
        if params:
            out["parameters"] = "\n".join(f"{k:<30} {v}" for k, v in params)
        out["template"] = spec.template
        out["details"] = self._details(spec)
        out["model_info"] = spec.model_info()
        out["capabilities"] = list(spec.capabilities)
        out["modified_at"] = format_rfc3339nano(modified_ns, self._tz)
        return out

    def _metrics_text(self) -> str:
        gpus = self.gpu_state()
        families = (
            ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", "free_bytes"),
            ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", "used_bytes"),
            ("DCGM_FI_DEV_FB_RESERVED", "Framebuffer memory reserved (in MiB).", "reserved_bytes"),
        )
        lines: list[str] = []
        for metric, help_text, key in families:
            lines.append(f"# HELP {metric} {help_text}")
            lines.append(f"# TYPE {metric} gauge")
            for g in gpus:
                labels = (
                    f'gpu="{g["index"]}",UUID="{g["uuid"]}",pci_bus_id="00000000:{g["index"] + 1:02X}:00.0",'
                    f'device="nvidia{g["index"]}",modelName="{g["name"]}",Hostname="{self.name}"'
                )
                lines.append(f"{metric}{{{labels}}} {g[key] // MIB}")
        return "\n".join(lines) + "\n"

    # -- HTTP --------------------------------------------------------------------------------

    def _fault_for(self, path: str) -> _FaultState | None:
        with self._state_lock:
            fault = self._fault
        if fault is None or (fault.paths is not None and path not in fault.paths):
            return None
        return fault

    def _handle_http(self, method: str, path: str, raw: bytes) -> _Reply | None:
        with self._state_lock:
            self._requests.append(RecordedRequest(method, path, _lenient_json(raw), time.monotonic()))
        fault = self._fault_for(path)
        while fault is not None and fault.fault is Fault.HANG:
            if self._stop_event.wait(_HANG_POLL_S):
                return None
            fault = self._fault_for(path)
        if fault is not None:
            if fault.fault is Fault.REFUSE:
                return None
            if fault.fault is Fault.HTTP500:
                return _json_reply(500, {"error": "internal server error (emulated fault)"})
            if fault.fault is Fault.GARBAGE:
                if path == "/metrics":
                    return _text_reply(200, "DCGM_FI_DEV_FB_FREE{gpu= 12 <<garbage\x00\n")
                return _Reply(200, b'{"models": [{"name": "trunc')
            if fault.fault is Fault.WRONG_SHAPE:
                return self._wrong_shape(path)
            if fault.fault is Fault.SLOW and self._stop_event.wait(fault.slow_s):
                return None
        try:
            return self._route(method, path, raw)
        except _ApiError as exc:
            return _json_reply(exc.status, {"error": exc.message})
        except Exception:  # an emulator bug must become a 500 here, not a dead thread
            logger.exception("node %s: error handling %s %s", self.name, method, path)
            return _json_reply(500, {"error": "emulator internal error"})

    @staticmethod
    def _wrong_shape(path: str) -> _Reply:
        if path == "/metrics":
            lines = (
                "# HELP unrelated_metric Something else.",
                "# TYPE unrelated_metric gauge",
                "unrelated_metric 1",
            )
            return _text_reply(200, "\n".join(lines) + "\n")
        shapes: dict[str, object] = {
            "/api/version": {"version": 12},
            "/api/show": {"model_info": "x", "capabilities": "x"},
            "/api/generate": {"done": "maybe"},
            "/api/chat": {"done": "maybe"},
            "/api/embed": {"embeddings": "x"},
            "/api/embeddings": {"embedding": "x"},
        }
        return _json_reply(200, shapes.get(path, {"models": "x"}))

    def _route(self, method: str, path: str, raw: bytes) -> _Reply:
        with self._state_lock:
            self._expire_locked()
        get_routes: dict[str, Callable[[], _Reply]] = {
            "/": lambda: _text_reply(200, "Ollama is running"),
            "/api/version": lambda: _json_reply(200, {"version": self.version}),
            "/api/tags": self._api_tags,
            "/api/ps": self._api_ps,
        }
        head_ok = {"/", "/api/version", "/api/tags"}
        post_routes: dict[str, Callable[[dict[str, Any]], _Reply]] = {
            "/api/show": self._api_show,
            "/api/generate": self._api_generate,
            "/api/chat": self._api_chat,
            "/api/embed": self._api_embed,
            "/api/embeddings": self._api_embeddings,
            "/api/pull": self._api_pull,
            "/api/push": lambda body: self._unsupported("push"),
            "/api/create": lambda body: self._unsupported("create"),
            "/api/copy": lambda body: self._unsupported("copy"),
        }
        if path == "/metrics" and self.metrics and method in ("GET", "HEAD"):
            return _text_reply(200, self._metrics_text(), "text/plain; version=0.0.4; charset=utf-8")
        if method in ("GET", "HEAD") and path in get_routes and (method == "GET" or path in head_ok):
            return get_routes[path]()
        if method == "POST" and path in post_routes:
            return post_routes[path](self._parse_body(raw))
        if method == "DELETE" and path == "/api/delete":
            return self._api_delete(self._parse_body(raw))
        return _text_reply(404, "404 page not found")

    @staticmethod
    def _parse_body(raw: bytes) -> dict[str, Any]:
        if not raw.strip():
            raise _ApiError(400, "missing request body")
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError:
            raise _ApiError(400, "invalid character in request body") from None
        except json.JSONDecodeError as exc:
            raise _ApiError(400, f"invalid JSON: {exc.msg} at offset {exc.pos}") from None
        if obj is None:
            return {}
        if not isinstance(obj, dict):
            kind = "array" if isinstance(obj, list) else type(obj).__name__
            raise _ApiError(400, f"json: cannot unmarshal {kind} into Go value of type api.Request")
        return obj

    @staticmethod
    def _keep_alive(body: dict[str, Any]) -> float | None:
        try:
            return parse_keep_alive(body.get("keep_alive"))
        except ValueError as exc:
            raise _ApiError(400, str(exc)) from None

    @staticmethod
    def _options(body: dict[str, Any]) -> tuple[int | None, int | None]:
        options = body.get("options")
        if options is None:
            return None, None
        if not isinstance(options, dict):
            raise _ApiError(
                400, "json: cannot unmarshal options into Go value of type map[string]interface {}"
            )
        values: list[int | None] = []
        for key in ("num_ctx", "num_gpu"):
            v = options.get(key)
            if v is None:
                values.append(None)
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
                raise _ApiError(400, f"option {key!r} must be of type integer")
            else:
                values.append(int(v))
        return values[0], values[1]

    @staticmethod
    def _model_field(body: dict[str, Any], *keys: str) -> str:
        for key in keys:
            v = body.get(key)
            if isinstance(v, str) and v:
                return v
        return ""

    def _now_utc(self) -> str:
        return format_rfc3339nano(time.time_ns(), timezone.utc)

    def _api_tags(self) -> _Reply:
        with self._state_lock:
            installed = sorted(self._installed.values(), key=lambda i: (-i.modified_wall_ns, i.spec.name))
            models = [
                {
                    "name": i.spec.name,
                    "model": i.spec.name,
                    "modified_at": format_rfc3339nano(i.modified_wall_ns, self._tz),
                    "size": i.spec.file_size_bytes,
                    "digest": i.spec.digest,
                    "details": self._details(i.spec),
                }
                for i in installed
            ]
        return _json_reply(200, {"models": models})

    def _api_ps(self) -> _Reply:
        with self._state_lock:
            return _json_reply(200, {"models": self._ps_locked()})

    def _api_show(self, body: dict[str, Any]) -> _Reply:
        model = self._model_field(body, "model", "name")
        if not model:
            raise _ApiError(400, "model is required")
        with self._state_lock:
            inst = self._installed.get(normalize_name(model))
            if inst is None:
                raise _ApiError(404, f"model '{model}' not found")
            return _json_reply(200, self._show(inst.spec, inst.modified_wall_ns))

    def _timings(self, prompt_tokens: int, eval_tokens: int) -> dict[str, int]:
        out = {"total_duration": 2_000_000 + 1_000_000 * eval_tokens, "load_duration": 1_000_000}
        out["prompt_eval_count"] = prompt_tokens
        out["prompt_eval_duration"] = 100_000 * prompt_tokens
        if eval_tokens:
            out["eval_count"] = eval_tokens
            out["eval_duration"] = 1_000_000 * eval_tokens
        return out

    def _api_generate(self, body: dict[str, Any]) -> _Reply:
        model = self._model_field(body, "model")
        keep = self._keep_alive(body)
        spec = self._installed_spec(model) if model else None
        if spec is None:
            raise _ApiError(404, f"model '{model}' not found")
        prompt = body.get("prompt") or ""
        if prompt == "" and keep == 0:
            self._expire_runner(spec.name)
            return _json_reply(
                200,
                {
                    "model": model,
                    "created_at": self._now_utc(),
                    "response": "",
                    "done": True,
                    "done_reason": "unload",
                },
            )
        if "completion" not in spec.capabilities:
            raise _ApiError(400, f"{json.dumps(model)} does not support generate")
        num_ctx, num_gpu = self._options(body)
        runner = self._acquire(spec, keep, num_ctx, num_gpu)
        try:
            if prompt == "":
                return _json_reply(
                    200,
                    {
                        "model": model,
                        "created_at": self._now_utc(),
                        "response": "",
                        "done": True,
                        "done_reason": "load",
                    },
                )
            text = f"This is an emulated answer from {spec.name}."
            words = text.split(" ")
            final = {
                "model": model,
                "created_at": self._now_utc(),
                "response": "" if body.get("stream", True) is not False else text,
                "done": True,
                "done_reason": "stop",
                "context": [1, 2, 3],
                **self._timings(len(str(prompt).split()), len(words)),
            }
            if body.get("stream", True) is False:
                return _json_reply(200, final)
            chunks: list[object] = [
                {
                    "model": model,
                    "created_at": self._now_utc(),
                    "response": w + (" " if i < len(words) - 1 else ""),
                    "done": False,
                }
                for i, w in enumerate(words)
            ]
            return _ndjson_reply([*chunks, final])
        finally:
            self._release(runner)

    def _api_chat(self, body: dict[str, Any]) -> _Reply:
        model = self._model_field(body, "model")
        if not model:
            raise _ApiError(400, "model is required")
        keep = self._keep_alive(body)
        spec = self._installed_spec(model)
        if spec is None:
            raise _ApiError(404, f"model '{model}' not found")
        messages = body.get("messages") or []
        if not isinstance(messages, list):
            raise _ApiError(400, "json: cannot unmarshal messages into Go struct field ChatRequest.messages")
        empty = {"role": "assistant", "content": ""}
        if not messages and keep == 0:
            self._expire_runner(spec.name)
            return _json_reply(
                200,
                {
                    "model": model,
                    "created_at": self._now_utc(),
                    "message": empty,
                    "done_reason": "unload",
                    "done": True,
                },
            )
        if "completion" not in spec.capabilities:
            raise _ApiError(400, f"{json.dumps(model)} does not support chat")
        num_ctx, num_gpu = self._options(body)
        runner = self._acquire(spec, keep, num_ctx, num_gpu)
        try:
            if not messages:
                return _json_reply(
                    200,
                    {
                        "model": model,
                        "created_at": self._now_utc(),
                        "message": empty,
                        "done_reason": "load",
                        "done": True,
                    },
                )
            text = f"This is an emulated answer from {spec.name}."
            final = {
                "model": model,
                "created_at": self._now_utc(),
                "message": {"role": "assistant", "content": text},
                "done_reason": "stop",
                "done": True,
                **self._timings(sum(len(str(m).split()) for m in messages), len(text.split())),
            }
            if body.get("stream", True) is False:
                return _json_reply(200, final)
            first = {
                "model": model,
                "created_at": self._now_utc(),
                "message": {"role": "assistant", "content": text},
                "done": False,
            }
            final["message"] = {"role": "assistant", "content": ""}
            return _ndjson_reply([first, final])
        finally:
            self._release(runner)

    @staticmethod
    def _vector(spec: ModelSpec, text: str) -> list[float]:
        seed = int.from_bytes(hashlib.sha256(f"{spec.name}\0{text}".encode()).digest()[:8], "big")
        rng = random.Random(seed)  # noqa: S311 - deterministic fake embeddings, not security
        raw = [rng.gauss(0.0, 1.0) for _ in range(spec.embedding_length)]
        norm = math.sqrt(sum(x * x for x in raw)) or 1.0
        return [round(x / norm, 7) for x in raw]

    def _embedding_model(self, body: dict[str, Any]) -> tuple[str, ModelSpec, float | None]:
        model = self._model_field(body, "model")
        if not model:
            raise _ApiError(400, "model is required")
        keep = self._keep_alive(body)
        spec = self._installed_spec(model)
        if spec is None:
            raise _ApiError(404, f"model {json.dumps(model)} not found, try pulling it first")
        return model, spec, keep

    def _api_embed(self, body: dict[str, Any]) -> _Reply:
        model, spec, keep = self._embedding_model(body)
        raw_input = body.get("input")
        if raw_input is None or raw_input == "":
            inputs: list[str] = []
        elif isinstance(raw_input, str):
            inputs = [raw_input]
        elif isinstance(raw_input, list):
            inputs = [x if isinstance(x, str) else json.dumps(x) for x in raw_input]
        else:
            raise _ApiError(400, "invalid input type")
        num_ctx, num_gpu = self._options(body)
        runner = self._acquire(spec, keep, num_ctx, num_gpu)
        try:
            if not inputs:
                return _json_reply(200, {"model": model, "embeddings": []})
            out = {
                "model": model,
                "embeddings": [self._vector(spec, t) for t in inputs],
                "total_duration": 14_000_000,
                "load_duration": 1_000_000,
                "prompt_eval_count": sum(len(t.split()) for t in inputs),
            }
            return _json_reply(200, out)
        finally:
            self._release(runner)

    def _api_embeddings(self, body: dict[str, Any]) -> _Reply:
        _, spec, keep = self._embedding_model(body)
        prompt = body.get("prompt") or ""
        num_ctx, num_gpu = self._options(body)
        runner = self._acquire(spec, keep, num_ctx, num_gpu)
        try:
            return _json_reply(200, {"embedding": self._vector(spec, str(prompt)) if prompt else []})
        finally:
            self._release(runner)

    def _api_pull(self, body: dict[str, Any]) -> _Reply:
        model = self._model_field(body, "model", "name")
        if not model:
            raise _ApiError(400, "model is required")
        try:
            spec = self.install(model)
        except EmulatorError:
            raise _ApiError(500, "pull model manifest: file does not exist") from None
        statuses: list[object] = [
            {"status": "pulling manifest"},
            {
                "status": f"pulling {spec.digest[:12]}",
                "digest": f"sha256:{spec.digest}",
                "total": spec.file_size_bytes,
            },
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        if body.get("stream", True) is False:
            return _json_reply(200, {"status": "success"})
        return _ndjson_reply(statuses)

    def _api_delete(self, body: dict[str, Any]) -> _Reply:
        model = self._model_field(body, "model", "name")
        if not model:
            raise _ApiError(400, "model is required")
        name = normalize_name(model)
        with self._state_lock:
            if name not in self._installed:
                raise _ApiError(404, f"model '{model}' not found")
            del self._installed[name]
        self._expire_runner(name)
        return _Reply(200, b"")

    @staticmethod
    def _unsupported(what: str) -> _Reply:
        return _json_reply(400, {"error": f"{what} is not supported by the emulator"})


# ---------------------------------------------------------------------------------------------
# clusters


class EmulatedCluster:
    """Several nodes started and stopped together; ``cluster["gpu-a"]`` finds one by name."""

    def __init__(self, nodes: Iterable[EmulatedNode]) -> None:
        self.nodes: tuple[EmulatedNode, ...] = tuple(nodes)
        names = [n.name for n in self.nodes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise EmulatorError(f"node names must be unique; repeated: {', '.join(dupes)}")

    def __getitem__(self, name: str) -> EmulatedNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def __iter__(self) -> Iterator[EmulatedNode]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def config(self, priority_models: Sequence[str] = (), **settings: object) -> dict[str, Any]:
        """A gpu-router config (as a dict, ready for YAML) pointing at this cluster's nodes.

        GPU nodes are read from their /metrics when they serve one, else given as static figures;
        ``settings`` are further top-level keys (request_timeout, state_dir, ...).
        """
        nodes: list[dict[str, Any]] = []
        for n in self.nodes:
            entry: dict[str, Any] = {"name": n.name, "url": n.url}
            if not n.gpus_mib:
                entry["gpu"] = "none"
            elif n.metrics:
                entry["gpu"] = {"exporter": n.metrics_url}
            else:
                entry["gpu"] = {"vram_mb": list(n.gpus_mib)}
            nodes.append(entry)
        return {"nodes": nodes, "priority_models": list(priority_models), **settings}

    def start(self) -> list[str]:
        """Start every node; returns their URLs in order. Stops the started ones if one fails."""
        urls: list[str] = []
        try:
            for n in self.nodes:
                urls.append(n.start())
        except BaseException:
            self.stop()
            raise
        return urls

    def stop(self) -> None:
        """Stop every node (idempotent)."""
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> EmulatedCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


DEMO_PRIORITY_MODELS: tuple[str, ...] = ("nomic-embed-text:latest", "llama3.2:latest", "llama3.1:8b")


def demo_cluster(*, port_base: int = 0, load_delay_s: float = 0.0) -> EmulatedCluster:
    """Three nodes in interesting states, not started (see the module docs of ``gpu_router.emulator``).

    - ``gpu-small``: 1 x 4096 MiB, metrics; llama3.1:8b (too big for the card) loaded partially offloaded.
    - ``cpu-only``: no GPU; nomic-embed-text loaded on CPU, forever.
    - ``gpu-8g``: 1 x 8192 MiB, metrics, 300 MiB used by another process; llama3.2 and mxbai-embed-large
      fully on GPU; qwen2.5:7b and llama3.1:8b installed but not loaded.
    ``port_base`` > 0 puts node *i* on ``port_base + i``.
    """

    def port(i: int) -> int:
        return port_base + i if port_base > 0 else 0

    small = EmulatedNode(
        "gpu-small",
        (4096,),
        ("nomic-embed-text:latest", "all-minilm:latest", "llama3.2:latest", "llama3.1:8b"),
        metrics=True,
        port=port(0),
        ram_bytes=16 * GIB,
    )
    cpu = EmulatedNode(
        "cpu-only",
        (),
        ("nomic-embed-text:latest", "all-minilm:latest", "llama3.2:1b", "llama3.2:latest"),
        port=port(1),
        ram_bytes=16 * GIB,
    )
    big = EmulatedNode(
        "gpu-8g",
        (8192,),
        (
            "nomic-embed-text:latest",
            "mxbai-embed-large:latest",
            "llama3.2:latest",
            "llama3.1:8b",
            "qwen2.5:7b",
        ),
        metrics=True,
        port=port(2),
    )
    small.load("llama3.1:8b", keep_alive="30m")
    cpu.load("nomic-embed-text:latest", keep_alive=-1)
    big.set_other_usage_mib(0, 300)
    big.load("mxbai-embed-large:latest", keep_alive=-1)
    big.load("llama3.2:latest", keep_alive="10m")
    for n in (small, cpu, big):
        n.clear_events()
        n.load_delay_s = float(load_delay_s)  # after the preloads, which should not wait
    return EmulatedCluster([small, cpu, big])
