"""An emulated Ollama server: real HTTP on loopback, simulated GPUs, each version's scheduler rules.

One :class:`EmulatedNode` is one ``ollama serve`` of a given ``version`` with an ``OLLAMA_*``
environment (:mod:`versions` holds the per-version rules, :mod:`memory` what each engine era
allocates): the same JSON shapes and error strings, loads through generate/chat/embed/embeddings,
keep_alive expiry, serialized loads that take ``load_delay_s``, eviction of the idle model with the
shortest keep_alive, partial offload only when nothing else is loaded (classic and measured eras),
the >= v0.30 pre-load check and evict-all-and-retry after an out-of-memory load, ``/api/pull``
streamed over time, an optional dcgm-exporter ``/metrics`` on its own port, faults on demand and a
record of every request.

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
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any

from gpu_router.emulator import faults as bad
from gpu_router.emulator.catalogue import (
    MAX_DURATION_NS,
    EmulatorError,
    MemoryEstimate,
    ModelSpec,
    estimate_memory,
    normalize_name,
    resolve_model,
    show_parameters,
    show_system,
)
from gpu_router.emulator.engine import EngineView, NodeFacts, engine_view
from gpu_router.emulator.memory import (
    LLAMA_SERVER,
    LLAMA_SERVER_OOM,
    RUNNER_OOM,
    Allocation,
    GpuView,
    LoadShape,
    Outcome,
    allocate,
    automatic_generation_batch,
    generation_batch_surcharge,
    predict_llama_server_vram,
)
from gpu_router.emulator.pull import (
    MANIFEST_NOT_FOUND,
    PULL_ERROR,
    PULL_NO_SPACE,
    PULL_STALL,
    normalize_pull_name,
    pull_stream,
)
from gpu_router.emulator.server import (
    JSON,
    NDJSON,
    Listener,
    Reply,
    guarded,
    json_reply,
    ndjson_reply,
    text_reply,
)
from gpu_router.emulator.versions import Behaviour, OllamaEnv, Version
from gpu_router.emulator.wire import (
    FOREVER_S,
    format_rfc3339nano,
    parse_env_keep_alive,
    parse_go_duration,
    parse_keep_alive,
)
from gpu_router.records import field, record
from gpu_router.state import GIB, MIB

logger = logging.getLogger(__name__)

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
LOAD_PATHS = frozenset({"/api/generate", "/api/chat", "/api/embed", "/api/embeddings"})
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
_HANG_POLL_S = 0.05
# A hung request is woken at once by a fault change or stop(); this only bounds how late it notices
# that its client gave up (then the handler ends, so hundreds of hung polls do not pile up threads).
_HANG_CHECK_S = 2.0

__all__ = [
    "LOAD_PATHS",
    "MUTATING_PATHS",
    "SERVER_BUSY",
    "EmulatedNode",
    "Fault",
    "RecordedRequest",
    "SchedulerEvent",
    "format_rfc3339nano",
    "parse_go_duration",
    "parse_keep_alive",
]


class Fault(str, enum.Enum):
    """What a node does wrong on purpose (see :meth:`EmulatedNode.set_fault`)."""

    # -- the connection and the HTTP reply (any path; ``paths`` narrows them) --
    REFUSE = "refuse"  # listening socket closed: connection refused (with paths: connection dropped)
    HANG = "hang"  # accept and never answer until cleared or stopped
    HTTP500 = "http500"  # 500 {"error": ...}
    GARBAGE = "garbage"  # 200 with a body that is not valid JSON
    WRONG_SHAPE = "wrong_shape"  # 200 valid JSON of the wrong shape
    SLOW = "slow"  # the right answer, after slow_s
    DRIP = "drip"  # the right answer, trickled out at rate_bps bytes per second
    HUGE_BODY = "huge_body"  # 200 with size_bytes (default 200 MB) generated on the fly
    GZIP_BOMB = "gzip_bomb"  # Content-Encoding: gzip, about 2 MB that inflates to 2 GiB
    DEEP_JSON = "deep_json"  # "[" x 200,000
    NON_UTF8 = "non_utf8"  # JSON with bytes that are not UTF-8
    HTML_ERROR = "html_error"  # a proxy's HTML error page with status (default 502)
    REDIRECT = "redirect"  # status (default 302) with Location: location
    # -- /api/ps contents --
    PS_DUPLICATE = "ps_duplicate"  # every loaded model listed twice
    PS_NEGATIVE = "ps_negative"  # negative size and size_vram
    PS_HUGE = "ps_huge"  # sizes of 10**30
    PS_VRAM_OVER = "ps_vram_over"  # size_vram > size
    # -- loads (requests that need a model loaded; ``model`` narrows them) --
    LOAD_ERROR = "load_error"  # 500 "<runner> process has terminated: ..." (or message)
    LOAD_BUSY = "load_busy"  # 503 "server busy, please try again.  maximum pending requests exceeded"
    LOAD_OOM = "load_oom"  # the runner runs out of VRAM while loading (>= v0.30: evict all, retry once)
    # -- the dcgm-exporter endpoint --
    EXPORTER_DOWN = "exporter_down"  # only the /metrics port refuses connections
    EXPORTER_SENTINEL = "exporter_sentinel"  # framebuffer values are DCGM's NOT_SUPPORTED sentinel
    # -- /api/pull --
    PULL_ERROR = "pull_error"  # the stream ends half-way with {"error": "max retries exceeded: ..."}
    PULL_STALL = "pull_stall"  # the stream stops half-way and keeps the connection until cleared
    PULL_NO_SPACE = "pull_no_space"  # {"error": "write ...-partial: no space left on device"}


_HTTP_FAULTS = frozenset(
    {
        Fault.REFUSE,
        Fault.HANG,
        Fault.HTTP500,
        Fault.GARBAGE,
        Fault.WRONG_SHAPE,
        Fault.SLOW,
        Fault.DRIP,
        Fault.HUGE_BODY,
        Fault.GZIP_BOMB,
        Fault.DEEP_JSON,
        Fault.NON_UTF8,
        Fault.HTML_ERROR,
        Fault.REDIRECT,
    }
)
_PS_FAULTS = {
    Fault.PS_DUPLICATE: "duplicate",
    Fault.PS_NEGATIVE: "negative",
    Fault.PS_HUGE: "huge",
    Fault.PS_VRAM_OVER: "vram_over",
}
_PULL_FAULTS = {
    Fault.PULL_ERROR: PULL_ERROR,
    Fault.PULL_STALL: PULL_STALL,
    Fault.PULL_NO_SPACE: PULL_NO_SPACE,
}
_DEFAULT_PATHS: dict[Fault, frozenset[str]] = {
    **{f: frozenset({"/api/ps"}) for f in _PS_FAULTS},
    **{f: LOAD_PATHS for f in (Fault.LOAD_ERROR, Fault.LOAD_BUSY, Fault.LOAD_OOM)},
    Fault.EXPORTER_DOWN: frozenset({"/metrics"}),
    Fault.EXPORTER_SENTINEL: frozenset({"/metrics"}),
    **{f: frozenset({"/api/pull"}) for f in _PULL_FAULTS},
}


@record
class RecordedRequest:
    """One HTTP request the node received (recorded before any fault is applied)."""

    method: str
    path: str
    body: dict[str, Any] | None
    at_monotonic_s: float


@record
class SchedulerEvent:
    """Something the scheduler did.

    ``load``, ``reload``, ``evict``, ``expire``, ``unload``, ``restart``, ``crash`` (a lost GPU),
    ``retry`` (>= v0.30 after an out-of-memory load), ``delete`` or ``client`` (a simulated client
    request).
    """

    kind: str
    model: str
    at_monotonic_s: float
    detail: str = ""


def _human_gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


# ---------------------------------------------------------------------------------------------
# internal records


class _ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@record(frozen=False)
class _FaultRule:
    fault: Fault
    paths: frozenset[str] | None
    slow_s: float = 1.0
    rate_bps: float = 100.0
    size_bytes: int = bad.HUGE_BODY_BYTES
    status: int = 0
    location: str = ""
    model: str | None = None
    message: str = ""
    remaining: int | None = None  # None: until cleared

    def matches(self, path: str) -> bool:
        return self.paths is None or path in self.paths


@record
class _Placement:
    vram_by_gpu: dict[int, int]
    size_bytes: int
    num_parallel: int
    requested_ctx: int
    context_length: int
    num_ctx_auto: bool


@record(frozen=False)
class _Runner:
    """A loaded (or loading) model. Mutable; guarded by the node's state lock."""

    spec: ModelSpec
    requested_ctx: int  # num_ctx per slot as requested (what needsReload compares before v0.30)
    context_length: int  # the runner's context per slot (clamped to the trained context)
    num_ctx_auto: bool
    num_parallel: int
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
    def num_ctx(self) -> int:
        """The requested context (kept for callers of the v0.12-only emulator)."""
        return self.requested_ctx

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


@record(frozen=False)
class _Installed:
    spec: ModelSpec
    modified_wall_ns: int


@record(frozen=False)
class _Hook:
    path: str
    callback: Callable[[EmulatedNode], object]
    once: bool


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


def _lenient_json(raw: bytes) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


# ---------------------------------------------------------------------------------------------
# the node


class EmulatedNode:
    """One emulated ``ollama serve`` listening on loopback. Also a context manager (start/stop).

    ``version`` picks the behaviour (defaults, engine era, what ``/api/ps`` shows) and ``env`` the
    ``OLLAMA_*`` settings (:data:`gpu_router.emulator.versions.KNOWN_ENV`). ``default_num_ctx``, when
    given, is ``OLLAMA_CONTEXT_LENGTH``. With ``metrics=True`` a dcgm-exporter ``/metrics`` answers
    on its own port (:attr:`metrics_url`) and, for older callers, on the Ollama port too.
    ``memory_engine=False`` sizes models with the emulator's own port only, not the daemon's engine
    (``gpu_router.memory``), e.g. to compare the two.
    """

    def __init__(
        self,
        name: str = "gpu-a",
        gpus_mib: Sequence[int] = (8192,),
        models: Iterable[str | ModelSpec] = ("llama3.1:8b", "nomic-embed-text:latest"),
        *,
        load_delay_s: float = 0.0,
        metrics: bool = False,
        default_keep_alive_s: float = 300.0,
        default_num_ctx: int | None = None,
        version: str = "0.12.6",
        env: Mapping[str, object] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        metrics_port: int = 0,
        ram_bytes: int = 32 * GIB,
        reserved_mib: int = 0,
        utc_offset_s: int | None = None,
        max_queue: int = 512,
        max_recorded: int = 100_000,
        pull_speed_bps: float = 0.0,
        memory_engine: bool = True,
    ) -> None:
        if host not in _LOOPBACK_HOSTS and not host.startswith("127."):
            raise EmulatorError(f"node {name}: the emulator only listens on loopback, not {host!r}")
        if any(m <= 0 for m in gpus_mib):
            raise EmulatorError(f"node {name}: every GPU needs a positive size in MiB, got {list(gpus_mib)}")
        if load_delay_s < 0 or ram_bytes <= 0 or reserved_mib < 0 or pull_speed_bps < 0:
            raise EmulatorError(
                f"node {name}: load_delay_s, ram_bytes, reserved_mib, pull_speed_bps must be >= 0"
            )
        if default_num_ctx is not None and default_num_ctx <= 0:
            raise EmulatorError(f"node {name}: default_num_ctx must be positive")
        self.name = name
        self.gpus_mib: tuple[int, ...] = tuple(int(m) for m in gpus_mib)
        self.load_delay_s = float(load_delay_s)
        self.metrics = metrics
        self.version = str(Version.parse(version))
        env_map = dict(env or {})
        if default_num_ctx is not None:
            env_map.setdefault("OLLAMA_CONTEXT_LENGTH", int(default_num_ctx))
        self.env = OllamaEnv.from_mapping(env_map)
        self._env_map: dict[str, object] = env_map
        self.memory_engine = memory_engine
        if self.env.keep_alive is not None:
            try:
                self.default_keep_alive_s = parse_env_keep_alive(self.env.keep_alive)
            except ValueError as exc:
                raise EmulatorError(f"node {name}: {exc}") from None
        else:
            self.default_keep_alive_s = FOREVER_S if default_keep_alive_s < 0 else float(default_keep_alive_s)
        self.host = host
        self.ram_bytes = int(ram_bytes)
        self.reserved_mib = int(reserved_mib)
        self.max_queue = self.env.max_queue if "OLLAMA_MAX_QUEUE" in env_map else max_queue
        self.pull_speed_bps = float(pull_speed_bps)
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
        self._faults_changed = threading.Condition(threading.Lock())
        self._fault_generation = 0

        self._installed: dict[str, _Installed] = {}
        self._runners: dict[str, _Runner] = {}
        self._other_usage_bytes = [0] * len(self.gpus_mib)
        self._lost_gpus: set[int] = set()
        self._xid: dict[int, int] = {}
        self._requests: deque[RecordedRequest] = deque(maxlen=max_recorded)
        self._events: deque[SchedulerEvent] = deque(maxlen=max_recorded)
        self._faults: list[_FaultRule] = []
        self._hooks: list[_Hook] = []
        self._epoch = 0
        self._pending = 0
        self._behaviour = self._make_behaviour()

        self._api = Listener(self, "api", host, int(port))
        self._metrics = Listener(self, "metrics", host, int(metrics_port))
        self._started = False
        self._stopped = False
        self._down = False
        self._down_timer: threading.Timer | None = None

        base_ns = time.time_ns() - 3 * 86_400 * 10**9
        for i, model in enumerate(models):
            spec = resolve_model(model)
            self._installed[spec.name] = _Installed(spec, base_ns - i * 7_919 * 10**9)

    def __repr__(self) -> str:
        return (
            f"EmulatedNode(name={self.name!r}, gpus_mib={self.gpus_mib!r}, version={self.version!r}, "
            f"port={self._api.port})"
        )

    def _make_behaviour(self) -> Behaviour:
        totals = tuple(m * MIB for i, m in enumerate(self.gpus_mib) if i not in self._lost_gpus)
        return Behaviour(Version.parse(self.version), self.env, totals)

    @property
    def behaviour(self) -> Behaviour:
        """The version's rules as this node applies them (fixed at start and at each restart)."""
        return self._behaviour

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> str:
        """Listen on ``host:port`` (port 0 = any free port) and return the base URL."""
        with self._listen_lock:
            if self._stopped:
                raise EmulatorError(f"node {self.name} was stopped; create a new EmulatedNode")
            if not self._started:
                self._started = True
                if self._api.port == 0:
                    self._api.listen()  # pick the port now, even if a REFUSE fault is already set
                if self.metrics and self._metrics.port == 0:
                    self._metrics.listen()
                self._sync_listening()
        return self.url

    def stop(self) -> None:
        """Close the server and wait for its threads; safe to call twice."""
        with self._listen_lock:
            if self._stopped:
                return
            self._stopped = True
            self._stop_event.set()
            self._faults_moved()
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
        """The Ollama TCP port (0 until started with port 0)."""
        return self._api.port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` once started (stays valid after stop, for "node down" tests)."""
        if not self._api.port:
            raise EmulatorError(f"node {self.name} has no port yet; call start() first")
        return f"http://{self.host}:{self._api.port}"

    @property
    def metrics_url(self) -> str:
        """The dcgm-exporter endpoint: its own port with ``metrics=True``, else the Ollama port (404)."""
        if self.metrics and self._metrics.port:
            return f"http://{self.host}:{self._metrics.port}/metrics"
        return self.url + "/metrics"

    @property
    def connections_accepted(self) -> int:
        """TCP connections the Ollama port has accepted (kept-alive ones serve many requests)."""
        return self._api.accepted

    @property
    def running(self) -> bool:
        """True while the Ollama listening socket is open."""
        return self._api.open

    def _sync_listening(self) -> None:
        with self._listen_lock:
            with self._state_lock:
                rules = list(self._faults)
            refusing = any(r.fault is Fault.REFUSE and r.paths is None for r in rules)
            exporter_down = any(r.fault is Fault.EXPORTER_DOWN for r in rules)
            live = self._started and not self._stopped
            self._api.sync(live and not self._down and not refusing)
            self._metrics.sync(live and self.metrics and not exporter_down)

    # Listener host protocol -----------------------------------------------------------------

    def handler_enter(self) -> None:
        """A request handler started (stop() waits for them)."""
        with self._handlers_idle:
            self._active_handlers += 1

    def handler_leave(self) -> None:
        """A request handler finished."""
        with self._handlers_idle:
            self._active_handlers -= 1
            if self._active_handlers == 0:
                self._handlers_idle.notify_all()

    def stopping(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when the node is stopping."""
        return self._stop_event.wait(seconds)

    # -- faults, hooks and restarts ------------------------------------------------------------

    def set_fault(
        self,
        fault: Fault,
        *,
        slow_s: float = 1.0,
        paths: Iterable[str] | None = None,
        rate_bps: float = 100.0,
        size_bytes: int = bad.HUGE_BODY_BYTES,
        status: int = 0,
        location: str = "",
        model: str | None = None,
        message: str = "",
        count: int | None = None,
    ) -> None:
        """Misbehave until :meth:`clear_fault`, replacing any fault set before.

        ``paths`` limits a fault to those request paths (the PS_*, LOAD_*, EXPORTER_* and PULL_* faults
        have their own paths by default). REFUSE without paths closes the Ollama socket (connection
        refused); with paths it drops those requests' connections unanswered. ``rate_bps`` is DRIP's
        speed, ``size_bytes`` HUGE_BODY's size, ``status`` HTML_ERROR's (502) or REDIRECT's (302)
        code, ``location`` REDIRECT's target, ``model`` narrows LOAD_* faults to one model,
        ``message`` replaces LOAD_ERROR's text and ``count`` makes a fault expire after that many
        uses. Faulted requests (except SLOW and DRIP) have no side effects.
        """
        self._set_faults(
            [], fault, slow_s, paths, rate_bps, size_bytes, status, location, model, message, count
        )

    def add_fault(
        self,
        fault: Fault,
        *,
        slow_s: float = 1.0,
        paths: Iterable[str] | None = None,
        rate_bps: float = 100.0,
        size_bytes: int = bad.HUGE_BODY_BYTES,
        status: int = 0,
        location: str = "",
        model: str | None = None,
        message: str = "",
        count: int | None = None,
    ) -> None:
        """Like :meth:`set_fault`, keeping the faults already set (the first that matches wins)."""
        with self._state_lock:
            keep = list(self._faults)
        self._set_faults(
            keep, fault, slow_s, paths, rate_bps, size_bytes, status, location, model, message, count
        )

    def _set_faults(
        self,
        keep: list[_FaultRule],
        fault: Fault,
        slow_s: float,
        paths: Iterable[str] | None,
        rate_bps: float,
        size_bytes: int,
        status: int,
        location: str,
        model: str | None,
        message: str,
        count: int | None,
    ) -> None:
        fault = Fault(fault)
        if slow_s < 0 or rate_bps <= 0 or size_bytes < 0 or (count is not None and count <= 0):
            raise EmulatorError("slow_s and size_bytes must be >= 0, rate_bps and count > 0")
        if fault is Fault.REDIRECT and status and not 300 <= status < 400:
            raise EmulatorError(f"a redirect needs a 3xx status, not {status}")
        path_set = frozenset(paths) if paths is not None else _DEFAULT_PATHS.get(fault)
        rule = _FaultRule(
            fault,
            path_set,
            slow_s=float(slow_s),
            rate_bps=float(rate_bps),
            size_bytes=int(size_bytes),
            status=int(status),
            location=location,
            model=normalize_name(model) if model else None,
            message=message,
            remaining=count,
        )
        with self._listen_lock:
            with self._state_lock:
                self._faults = [*keep, rule]
            self._faults_moved()
            self._sync_listening()

    def clear_fault(self, fault: Fault | None = None) -> None:
        """Behave again (all faults, or only ``fault``); after REFUSE the node listens again on its port."""
        with self._listen_lock:
            with self._state_lock:
                self._faults = (
                    [] if fault is None else [r for r in self._faults if r.fault is not Fault(fault)]
                )
            self._faults_moved()
            self._sync_listening()

    def faults(self) -> list[Fault]:
        """The faults in force, first match first."""
        with self._state_lock:
            return [r.fault for r in self._faults]

    def _rule_for(
        self, path: str, kinds: Iterable[Fault] | None = None, model: str | None = None
    ) -> _FaultRule | None:
        # Lock-free: _faults is only ever replaced by a new list, never changed in place, so a
        # request sees one consistent set; with no faults (the soak's usual case) this is one test.
        rules = self._faults
        if not rules:
            return None
        wanted = None if kinds is None else frozenset(kinds)
        for rule in rules:
            if wanted is not None and rule.fault not in wanted:
                continue
            if not rule.matches(path):
                continue
            if rule.model is not None and model is not None and rule.model != model:
                continue
            return rule
        return None

    def _consume(self, rule: _FaultRule) -> None:
        if rule.remaining is None:
            return
        with self._listen_lock:
            with self._state_lock:
                rule.remaining -= 1
                if rule.remaining <= 0 and rule in self._faults:
                    self._faults = [r for r in self._faults if r is not rule]
            self._faults_moved()
            self._sync_listening()

    def _faults_moved(self) -> None:
        """Wake the requests a HANG holds: the faults changed, or the node is stopping."""
        with self._faults_changed:
            self._fault_generation += 1
            self._faults_changed.notify_all()

    def _hang(self, path: str, client_gone: Callable[[], bool]) -> tuple[bool, _FaultRule | None]:
        """Hold a request while a HANG fault matches it.

        Returns (False, the HTTP fault that applies now) or (True, None) when the client left or the
        node stops while it was held.
        """
        while True:
            generation = self._fault_generation
            rule = self._rule_for(path, _HTTP_FAULTS)
            if rule is None or rule.fault is not Fault.HANG:
                return False, rule
            if self._stop_event.is_set() or client_gone():
                return True, None
            with self._faults_changed:
                if generation == self._fault_generation:
                    self._faults_changed.wait(_HANG_CHECK_S)

    def on_request(self, path: str, callback: Callable[[EmulatedNode], object], *, once: bool = True) -> None:
        """Run ``callback(node)`` when a request for ``path`` arrives, before it is handled.

        For races a test wants on cue, e.g. a model that finishes loading out-of-band between the
        daemon's observation and its action: ``node.on_request("/api/generate", lambda n:
        n.client_request("qwen2.5:7b"))``. ``once=False`` keeps the hook for every such request.
        """
        with self._state_lock:
            self._hooks.append(_Hook(path, callback, once))

    def clear_hooks(self) -> None:
        """Forget every :meth:`on_request` hook."""
        with self._state_lock:
            self._hooks.clear()

    def _run_hooks(self, path: str) -> None:
        if not self._hooks:  # read without the lock: the common case has none
            return
        with self._state_lock:
            due = [h for h in self._hooks if h.path == path]
            self._hooks = [h for h in self._hooks if not (h.once and h.path == path)]
        for hook in due:
            try:
                hook.callback(self)
            except Exception:  # a test's hook that fails must not take the request down with it
                logger.exception("node %s: on_request hook for %s failed", self.name, path)

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
            self._behaviour = self._make_behaviour()
            self._event("restart", "", ",".join(dropped))
        # The old process's connections die with it, even when the port is back at once.
        self._api.drop_connections()
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

    # -- GPU health ----------------------------------------------------------------------------

    def raise_xid(self, gpu_index: int, xid: int = 79) -> None:
        """An XID error on a GPU: ``DCGM_FI_DEV_XID_ERRORS`` (the last XID seen) shows ``xid``."""
        self._check_gpu(gpu_index)
        if xid <= 0:
            raise EmulatorError("an XID is a positive number (79: fallen off the bus, 31: MMU fault...)")
        with self._state_lock:
            self._xid[gpu_index] = int(xid)

    def lose_gpu(self, gpu_index: int) -> None:
        """The GPU falls off the bus: runners using it die, the exporter and Ollama stop seeing it."""
        self._check_gpu(gpu_index)
        with self._state_lock:
            self._lost_gpus.add(gpu_index)
            for name, r in list(self._runners.items()):
                if gpu_index in r.vram_by_gpu:
                    r.ready.set()
                    del self._runners[name]
                    self._event("crash", name, f"gpu {gpu_index} lost")

    def restore_gpu(self, gpu_index: int) -> None:
        """The lost GPU is back (after a reset): visible again, with its XID cleared."""
        self._check_gpu(gpu_index)
        with self._state_lock:
            self._lost_gpus.discard(gpu_index)
            self._xid.pop(gpu_index, None)

    def _check_gpu(self, gpu_index: int) -> None:
        if not 0 <= gpu_index < len(self.gpus_mib):
            raise EmulatorError(f"node {self.name} has no GPU {gpu_index}")

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
        """What the scheduler did, oldest first (see :class:`SchedulerEvent`)."""
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

    def remove(self, model: str | ModelSpec) -> bool:
        """Delete a model from disk out-of-band (like ``ollama rm``); unloads it. True if it was there."""
        name = model.name if isinstance(model, ModelSpec) else normalize_name(model)
        with self._state_lock:
            found = self._installed.pop(name, None) is not None
            if found:
                self._event("delete", name)
        self._expire_runner(name)
        return found

    def loaded(self) -> list[dict[str, Any]]:
        """The ``/api/ps`` entries, exactly as the API returns them (without PS_* faults)."""
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
        if spec.is_cloud:
            raise EmulatorError(f"node {self.name}: {spec.name} is a cloud model; it never loads locally")
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

    def client_request(
        self,
        model: str | ModelSpec,
        *,
        keep_alive: float | str | None = None,
        num_ctx: int | None = None,
        num_gpu: int | None = None,
    ) -> dict[str, Any]:
        """What another client's request does (e.g. ``keep_alive="6s"`` or another ``num_ctx``):
        the model is used, reloaded or loaded under the scheduler's rules; returns its ps entry.
        Not recorded in :attr:`requests` (that record is the daemon's), but as a ``client`` event.
        """
        name = model.name if isinstance(model, ModelSpec) else normalize_name(model)
        with self._state_lock:
            self._event("client", name, f"keep_alive={keep_alive} num_ctx={num_ctx} num_gpu={num_gpu}")
        return self.load(model, keep_alive=keep_alive, num_ctx=num_ctx, num_gpu=num_gpu)

    def unload(self, model: str | ModelSpec) -> None:
        """Unload a model now (like ``keep_alive: 0``); nothing happens if it is not loaded."""
        name = model.name if isinstance(model, ModelSpec) else normalize_name(model)
        self._expire_runner(name)

    def set_other_usage_mib(self, gpu_index: int, mib: int) -> None:
        """VRAM held by other processes on one GPU: less free for Ollama, more "used" in /metrics."""
        self._check_gpu(gpu_index)
        if mib < 0:
            raise EmulatorError("other usage must be >= 0 MiB")
        with self._state_lock:
            self._other_usage_bytes[gpu_index] = int(mib) * MIB

    def gpu_state(self) -> list[dict[str, Any]]:
        """Per present GPU: index, name, uuid, total_bytes, used_bytes, free_bytes, reserved_bytes, xid."""
        with self._state_lock:
            self._expire_locked()
            out: list[dict[str, Any]] = []
            for i, total_mib in enumerate(self.gpus_mib):
                if i in self._lost_gpus:
                    continue
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
                        "xid": self._xid.get(i, 0),
                    }
                )
            return out

    @property
    def max_loaded_models(self) -> int:
        """OLLAMA_MAX_LOADED_MODELS, else 3 per GPU (3 on a CPU-only host)."""
        return self._behaviour.max_loaded_models()

    def estimate(self, model: str | ModelSpec, num_ctx: int | None = None) -> MemoryEstimate:
        """The classic approximation (weights + KV + graph + 457 MiB + one layer) at ``num_ctx``."""
        spec = resolve_model(model)
        return estimate_memory(spec, self._behaviour.request_num_ctx(spec, num_ctx))

    def predict(self, model: str | ModelSpec, num_ctx: int | None = None) -> Allocation:
        """What this node's Ollama would allocate for ``model`` with every GPU empty (no faults)."""
        spec = resolve_model(model)
        beh = self._behaviour
        views = [
            GpuView(i, m * MIB, max(0, (m - self.reserved_mib) * MIB))
            for i, m in enumerate(self.gpus_mib)
            if i not in self._lost_gpus
        ]
        ctx = beh.request_num_ctx(spec, num_ctx)
        parallel = beh.parallel_candidates(spec, cpu_only=not views)[-1]
        out = allocate(
            beh.era(spec),
            self._shape(spec, ctx, parallel, -1),
            views,
            require_full=False,
            gpu_overhead_bytes=self.env.gpu_overhead_bytes,
            sched_spread=self.env.sched_spread,
            ollama_engine=beh.ollama_engine(spec),
            ram_free_bytes=self.ram_bytes,
            engine=self._engine(spec, ctx, parallel),
        )
        if out.allocation is None:
            raise EmulatorError(f"node {self.name}: {spec.name} cannot load here: {out.error}")
        return out.allocation

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

    def _needs_reload(self, runner: _Runner, requested_ctx: int, auto: bool, num_gpu: int) -> bool:
        # needsReload (server/sched.go): num_gpu -1 (auto) never forces a reload.
        if num_gpu >= 0 and num_gpu != runner.num_gpu:
            return True
        if self._behaviour.era(runner.spec) == LLAMA_SERVER:
            # @v0.30.0: the new num_ctx clamped to the trained context against the runner's
            # effective one, and two automatic (VRAM-tier) contexts compare equal.
            if runner.num_ctx_auto and auto:
                return False
            return min(requested_ctx, runner.spec.context_length) != runner.context_length
        return runner.requested_ctx != requested_ctx

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
        beh = self._behaviour
        requested_ctx = beh.request_num_ctx(spec, num_ctx_opt)
        auto = beh.num_ctx_auto(spec, num_ctx_opt)
        num_gpu = -1 if num_gpu_opt is None or num_gpu_opt < 0 else int(num_gpu_opt)
        while True:
            with self._state_lock:
                self._expire_locked()
                r = self._runners.get(spec.name)
                if r is None or (not r.loading and self._needs_reload(r, requested_ctx, auto, num_gpu)):
                    self._load_faults(spec)
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
                return self._load_serialized(spec, keep_alive_s, requested_ctx, auto, num_gpu)
        finally:
            with self._state_lock:
                self._pending -= 1

    def _load_faults(self, spec: ModelSpec) -> None:
        for kind in (Fault.LOAD_BUSY, Fault.LOAD_ERROR):
            rule = self._rule_for("/api/generate", (kind,), spec.name)
            if rule is None:
                continue
            self._consume(rule)
            if kind is Fault.LOAD_BUSY:
                raise _ApiError(503, SERVER_BUSY)
            runner = self._behaviour.runner_name
            exit_code = 1 if runner == "llama-server" else 2
            raise _ApiError(500, rule.message or f"{runner} process has terminated: exit status {exit_code}")

    def _load_serialized(
        self, spec: ModelSpec, keep_alive_s: float | None, requested_ctx: int, auto: bool, num_gpu: int
    ) -> _Runner:
        reload = False
        with self._state_lock:
            self._expire_locked()
            existing = self._runners.get(spec.name)
            if existing is not None:
                if not self._needs_reload(existing, requested_ctx, auto, num_gpu):
                    existing.refcount += 1
                    if keep_alive_s is not None:
                        existing.session_s = keep_alive_s
                    return existing
                del self._runners[spec.name]
                reload = True
            placement = self._place_locked(spec, requested_ctx, auto, num_gpu)
            runner = _Runner(
                spec=spec,
                requested_ctx=placement.requested_ctx,
                context_length=placement.context_length,
                num_ctx_auto=placement.num_ctx_auto,
                num_parallel=placement.num_parallel,
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
                f"size={runner.size_bytes} size_vram={runner.size_vram} num_ctx={runner.requested_ctx} "
                f"context={runner.context_length} parallel={runner.num_parallel}",
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
                raise _ApiError(500, f"{self._behaviour.runner_name} process has terminated: signal: killed")
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
        # findRunnerToUnload / ByDurationAndName: shortest session first (forever = inf sorts last),
        # then name; the first idle one, else the first.
        ordered = sorted(runners, key=lambda r: (r.session_s, r.spec.name))
        for r in ordered:
            if r.refcount == 0 and not r.loading:
                return r
        return ordered[0]

    def _evict_locked(self, reason: str) -> None:
        victim = self._pick_victim(list(self._runners.values()))
        victim.ready.set()
        del self._runners[victim.spec.name]
        self._event("evict", victim.spec.name, reason)

    def _gpu_views_locked(self) -> list[GpuView]:
        # updateFreeSpace: free = min(reported, total - what the loaded runners hold); here both agree.
        views: list[GpuView] = []
        for i, total_mib in enumerate(self.gpus_mib):
            if i in self._lost_gpus:
                continue
            used = self._other_usage_bytes[i] + sum(r.vram_by_gpu.get(i, 0) for r in self._runners.values())
            views.append(GpuView(i, total_mib * MIB, max(0, (total_mib - self.reserved_mib) * MIB - used)))
        return views

    def _ram_free_locked(self) -> int:
        return self.ram_bytes - sum(r.size_bytes - r.size_vram for r in self._runners.values())

    def _shape(
        self, spec: ModelSpec, requested_ctx: int, parallel: int, num_gpu: int, batch: int = 512
    ) -> LoadShape:
        beh = self._behaviour
        return LoadShape(
            spec,
            requested_ctx,
            num_parallel=parallel,
            num_gpu=num_gpu,
            kv_cache_type=beh.kv_cache_type(spec),
            flash_attention=beh.flash_attention(spec),
            num_batch=batch,
            clamp_to_trained=beh.clamps_num_ctx,
        )

    def _placement(
        self, out: Allocation, parallel: int, requested_ctx: int, auto: bool, shape: LoadShape
    ) -> _Placement:
        return _Placement(
            vram_by_gpu=dict(out.vram_by_gpu),
            size_bytes=out.total_bytes,
            num_parallel=parallel,
            requested_ctx=requested_ctx,
            context_length=shape.context_length,
            num_ctx_auto=auto,
        )

    def _allocate(
        self,
        spec: ModelSpec,
        requested_ctx: int,
        parallel: int,
        num_gpu: int,
        gpus: list[GpuView],
        *,
        require_full: bool,
    ) -> Outcome:
        beh = self._behaviour
        return allocate(
            beh.era(spec),
            self._shape(spec, requested_ctx, parallel, num_gpu),
            gpus,
            require_full=require_full,
            gpu_overhead_bytes=self.env.gpu_overhead_bytes,
            sched_spread=self.env.sched_spread,
            ollama_engine=beh.ollama_engine(spec),
            ram_free_bytes=self._ram_free_locked(),
            engine=self._engine(spec, requested_ctx, parallel),
        )

    def _engine(self, spec: ModelSpec, requested_ctx: int, parallel: int) -> EngineView | None:
        if not self.memory_engine or spec.is_cloud:
            return None
        totals = tuple(m * MIB for i, m in enumerate(self.gpus_mib) if i not in self._lost_gpus)
        return engine_view(spec, NodeFacts.of(self.version, totals, self._env_map), requested_ctx, parallel)

    def _take_oom_fault(self, spec: ModelSpec) -> bool:
        rule = self._rule_for("/api/generate", (Fault.LOAD_OOM,), spec.name)
        if rule is None:
            return False
        self._consume(rule)
        return True

    def _place_locked(self, spec: ModelSpec, requested_ctx: int, auto: bool, num_gpu: int) -> _Placement:
        """processPending's loop for one request: evict until it fits (the version's rules), then place."""
        beh = self._behaviour
        era = beh.era(spec)
        oom_retried = False
        while True:
            others = list(self._runners.values())
            if others and len(others) >= beh.max_loaded_models():
                self._evict_locked(f"max loaded models reached, for {spec.name}")
                continue
            gpus = [] if num_gpu == 0 else self._gpu_views_locked()
            if era == LLAMA_SERVER:
                placed = self._place_llama_server(
                    spec, requested_ctx, auto, num_gpu, gpus, others, oom_retried
                )
                if isinstance(placed, _Placement):
                    return placed
                kind, requested_ctx = placed
                if kind == "evict":
                    self._evict_locked("llama-server model predicted to exceed available memory")
                else:
                    oom_retried = True
                    for _ in others:
                        self._evict_locked("evicting all other loaded models for OOM retry")
                continue
            candidates = beh.parallel_candidates(spec, cpu_only=not gpus)
            chosen: tuple[int, Outcome] | None = None
            if len(candidates) > 1:
                # Before v0.10.0 (OLLAMA_NUM_PARALLEL unset): the most slots that fit fully, then 1.
                for p in candidates:
                    out = self._allocate(spec, requested_ctx, p, num_gpu, gpus, require_full=True)
                    if out.allocation is not None:
                        chosen = (p, out)
                        break
                if chosen is None and others:
                    self._evict_locked(f"to make room for {spec.name}")
                    continue
            if chosen is None:
                p = candidates[-1]
                out = self._allocate(spec, requested_ctx, p, num_gpu, gpus, require_full=bool(others))
                chosen = (p, out)
            p, out = chosen
            if out.allocation is not None and gpus and self._take_oom_fault(spec):
                out = Outcome(error=RUNNER_OOM, out_of_memory=True)
            if out.needs_eviction or (out.error and not out.out_of_memory and others):
                # ErrLoadRequiredFull, or not enough system memory beside the others.
                self._evict_locked(f"to make room for {spec.name}")
                continue
            if out.allocation is None:
                raise _ApiError(500, out.error or "unable to load model")
            shape = self._shape(spec, requested_ctx, p, num_gpu)
            return self._placement(out.allocation, p, requested_ctx, auto, shape)

    def _place_llama_server(
        self,
        spec: ModelSpec,
        requested_ctx: int,
        auto: bool,
        num_gpu: int,
        gpus: list[GpuView],
        others: list[_Runner],
        oom_retried: bool,
    ) -> _Placement | tuple[str, int]:
        """One pass of Scheduler.load at v0.30.0: a placement, ("evict", ctx) or ("retry", new ctx)."""
        beh = self._behaviour
        parallel = beh.parallel_candidates(spec, cpu_only=not gpus)[0]
        effective = min(requested_ctx, spec.context_length) * parallel
        predicted = predict_llama_server_vram(spec, effective)
        engine = self._engine(spec, requested_ctx, parallel)
        selected = self._select_llama_server_gpus(gpus, predicted)
        completion = "completion" in spec.capabilities
        available = sum(g.free_bytes for g in selected)
        small_cuda = any(g.total_bytes <= 8 * GIB for g in selected)
        batch = 512
        if completion:
            batch = automatic_generation_batch(
                effective,
                predicted,
                available,
                flash_attention=beh.flash_attention(spec),
                small_cuda=small_cuda,
            )
        surcharge = generation_batch_surcharge(batch) if completion else 0
        preload = predicted + surcharge
        if engine is not None and engine.estimate.preload_bytes is not None:
            preload = engine.estimate.preload_bytes  # the daemon engine's figure for the same check
        explicit_partial = 0 < num_gpu < spec.block_count + 1
        if others and selected and not explicit_partial and preload > available * 80 // 100:
            return ("evict", requested_ctx)
        shape = self._shape(spec, requested_ctx, parallel, num_gpu, batch)
        if selected and self._take_oom_fault(spec):
            out = Outcome(error=LLAMA_SERVER_OOM, out_of_memory=True)
        else:
            out = allocate(
                LLAMA_SERVER,
                shape,
                selected,
                require_full=False,
                ram_free_bytes=self._ram_free_locked(),
                engine=engine,
            )
        if out.allocation is not None:
            return self._placement(out.allocation, parallel, requested_ctx, auto, shape)
        if out.out_of_memory and not oom_retried:
            # reduceAutoNumCtxForLoadOOM: an automatic context steps down 262144 -> 32768 -> 4096.
            if auto:
                current = min(requested_ctx, spec.context_length)
                lower = 32768 if current > 32768 else 4096 if current > 4096 else 0
                if lower and lower < requested_ctx:
                    self._event("retry", spec.name, f"num_ctx {requested_ctx} -> {lower} after: {out.error}")
                    return ("retry", lower)
            if others:
                self._event("retry", spec.name, f"evict all and retry after: {out.error}")
                return ("retry", requested_ctx)
        raise _ApiError(500, out.error or "unable to load model")

    def _select_llama_server_gpus(self, gpus: list[GpuView], predicted: int) -> list[GpuView]:
        # selectLlamaServerPlacement@v0.30.0: the single GPU with most free memory when the
        # prediction fits in 80% of it (not with OLLAMA_SCHED_SPREAD), else the whole group.
        if len(gpus) <= 1:
            return gpus
        if not self.env.sched_spread and predicted > 0:
            fitting = [g for g in gpus if predicted <= g.free_bytes * 80 // 100]
            if fitting:
                return [max(fitting, key=lambda g: g.free_bytes)]
        return gpus

    # -- rendering ---------------------------------------------------------------------------

    def _details(self, spec: ModelSpec) -> dict[str, Any]:
        if spec.is_cloud:
            # A cloud stub's config has no format and names its upstream model as the parent.
            return {
                "parent_model": spec.remote_model,
                "format": "",
                "family": spec.family,
                "families": None,
                "parameter_size": spec.parameter_size,
                "quantization_level": spec.quantization_level,
            }
        return {
            "parent_model": "",
            "format": "gguf",
            "family": spec.family,
            "families": list(spec.families),
            "parameter_size": spec.parameter_size,
            "quantization_level": spec.quantization_level,
        }

    def _ps_entry(self, r: _Runner) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": r.spec.name,
            "model": r.spec.name,
            "size": r.size_bytes,
            "digest": r.spec.digest,
            "details": self._details(r.spec),
            "expires_at": format_rfc3339nano(r.expires_wall_ns, self._tz),
            "size_vram": r.size_vram,
        }
        context = self._behaviour.ps_context_length(r.requested_ctx, r.context_length)
        if context is not None:
            entry["context_length"] = context
        return entry

    def _ps_locked(self) -> list[dict[str, Any]]:
        runners = sorted(self._runners.values(), key=lambda r: (-r.expires_wall_ns, r.spec.name))
        return [self._ps_entry(r) for r in runners]

    def _show(self, spec: ModelSpec, modified_ns: int, verbose: bool) -> dict[str, Any]:
        params = show_parameters(spec)
        blob = hashlib.sha256(f"{spec.name}/model".encode()).hexdigest()
        modelfile = [
            '# Modelfile generated by "ollama show"',
            "# To build a new Modelfile based on this, replace FROM with:",
            f"# FROM {spec.name}",
            "",
        ]
        if spec.is_cloud:
            modelfile.append(f"FROM {spec.remote_model}")
        else:
            modelfile.append(f"FROM /usr/share/ollama/.ollama/models/blobs/sha256-{blob}")
        if spec.projector_bytes:
            projector = hashlib.sha256(f"{spec.name}/projector".encode()).hexdigest()
            modelfile.append(f"FROM /usr/share/ollama/.ollama/models/blobs/sha256-{projector}")
        if spec.template:
            modelfile.append(f'TEMPLATE """{spec.template}"""')
        system = show_system(spec)
        if system:
            modelfile.append(f'SYSTEM """{system}"""')
        for line in params.splitlines():
            key, _, value = line.partition(" ")
            modelfile.append(f"PARAMETER {key} {value.strip()}")
        if spec.license:
            modelfile.append(f'LICENSE """{spec.license}"""')
        out: dict[str, Any] = {}
        if spec.license:
            out["license"] = spec.license
        out["modelfile"] = "\n".join(modelfile) + "\n"
        if params:
            out["parameters"] = params
        if spec.template:
            out["template"] = spec.template
        if system:
            out["system"] = system
        out["details"] = self._details(spec)
        if spec.is_cloud and self._behaviour.remote_models:
            out["remote_model"] = spec.remote_model
            out["remote_host"] = spec.remote_host
        out["model_info"] = spec.model_info(verbose)
        projector_info = spec.projector_info()
        if projector_info:
            out["projector_info"] = projector_info
        if not spec.is_cloud and self._behaviour.version >= Version(0, 6, 1):
            # ShowHandler returns tensors (name, type, shape) even without verbose since v0.6.1.
            out["tensors"] = [t.as_json() for t in spec.tensors]
        out["capabilities"] = list(spec.capabilities)
        out["modified_at"] = format_rfc3339nano(modified_ns, self._tz)
        return out

    def _metrics_text(self) -> str:
        gpus = self.gpu_state()
        sentinel = self._rule_for("/metrics", (Fault.EXPORTER_SENTINEL,)) is not None
        families = (
            ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", "free_bytes"),
            ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", "used_bytes"),
            ("DCGM_FI_DEV_FB_RESERVED", "Framebuffer memory reserved (in MiB).", "reserved_bytes"),
            ("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.", "xid"),
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
                if key == "xid":
                    value = g["xid"]
                elif sentinel and key != "reserved_bytes":
                    value = bad.DCGM_INT64_NOT_SUPPORTED
                else:
                    value = g[key] // MIB
                lines.append(f"{metric}{{{labels}}} {value}")
        return "\n".join(lines) + "\n"

    # -- HTTP --------------------------------------------------------------------------------

    def handle_http(
        self,
        listener: str,
        method: str,
        path: str,
        raw: bytes,
        client_gone: Callable[[], bool] = lambda: False,
    ) -> Reply | None:
        """Answer one request (None: drop the connection). Called by the listeners' threads.

        ``client_gone`` says whether the client closed its end (a HANG then lets the request go).
        """
        with self._state_lock:
            self._requests.append(RecordedRequest(method, path, _lenient_json(raw), time.monotonic()))
        self._run_hooks(path)
        if path == "/metrics" and self._rule_for(path, (Fault.EXPORTER_DOWN,)) is not None:
            return None
        gone, rule = self._hang(path, client_gone)
        if gone:
            return None
        drip = 0.0
        if rule is not None:
            self._consume(rule)
            if rule.fault is Fault.SLOW:
                if self._stop_event.wait(rule.slow_s):
                    return None
            elif rule.fault is Fault.DRIP:
                drip = rule.rate_bps
            else:
                return self._fault_reply(rule, path)
        try:
            if listener == "metrics" and path not in ("/metrics", "/"):
                reply = text_reply(404, "404 page not found")
            else:
                reply = self._route(method, path, raw)
        except _ApiError as exc:
            reply = json_reply(exc.status, {"error": exc.message})
        except Exception:  # an emulator bug must become a 500 here, not a dead thread
            logger.exception("node %s: error handling %s %s", self.name, method, path)
            reply = json_reply(500, {"error": "emulator internal error"})
        return reply.with_drip(drip) if drip > 0 else reply

    def _fault_reply(self, rule: _FaultRule, path: str) -> Reply | None:
        f = rule.fault
        if f is Fault.REFUSE:
            return None
        if f is Fault.HTTP500:
            return json_reply(500, {"error": "internal server error (emulated fault)"})
        if f is Fault.GARBAGE:
            if path == "/metrics":
                return text_reply(200, "DCGM_FI_DEV_FB_FREE{gpu= 12 <<garbage\x00\n")
            return Reply(200, b'{"models": [{"name": "trunc')
        if f is Fault.WRONG_SHAPE:
            return self._wrong_shape(path)
        if f is Fault.HUGE_BODY:
            return Reply(200, stream=bad.huge_body(rule.size_bytes), length=rule.size_bytes)
        if f is Fault.GZIP_BOMB:
            return Reply(200, headers=(("Content-Encoding", "gzip"),), stream=bad.gzip_bomb())
        if f is Fault.DEEP_JSON:
            return Reply(200, bad.deep_json())
        if f is Fault.NON_UTF8:
            return Reply(200, bad.non_utf8_json())
        if f is Fault.HTML_ERROR:
            status = rule.status or 502
            return Reply(status, bad.html_error_page(status), "text/html")
        if f is Fault.REDIRECT:
            location = rule.location or f"http://127.0.0.1:9{path}"
            return Reply(rule.status or 302, b"", "text/html; charset=utf-8", (("Location", location),))
        raise AssertionError(f"no reply for fault {f}")

    @staticmethod
    def _wrong_shape(path: str) -> Reply:
        if path == "/metrics":
            lines = (
                "# HELP unrelated_metric Something else.",
                "# TYPE unrelated_metric gauge",
                "unrelated_metric 1",
            )
            return text_reply(200, "\n".join(lines) + "\n")
        shapes: dict[str, object] = {
            "/api/version": {"version": 12},
            "/api/show": {"model_info": "x", "capabilities": "x"},
            "/api/generate": {"done": "maybe"},
            "/api/chat": {"done": "maybe"},
            "/api/embed": {"embeddings": "x"},
            "/api/embeddings": {"embedding": "x"},
        }
        return json_reply(200, shapes.get(path, {"models": "x"}))

    def _route(self, method: str, path: str, raw: bytes) -> Reply:
        with self._state_lock:
            self._expire_locked()
        get_routes: dict[str, Callable[[], Reply]] = {
            "/": lambda: text_reply(200, "Ollama is running"),
            "/api/version": lambda: json_reply(200, {"version": self.version}),
            "/api/tags": self._api_tags,
            "/api/ps": self._api_ps,
        }
        head_ok = {"/", "/api/version", "/api/tags"}
        post_routes: dict[str, Callable[[dict[str, Any]], Reply]] = {
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
            return text_reply(200, self._metrics_text(), "text/plain; version=0.0.4; charset=utf-8")
        if method in ("GET", "HEAD") and path in get_routes and (method == "GET" or path in head_ok):
            return get_routes[path]()
        if method == "POST" and path in post_routes:
            return post_routes[path](self._parse_body(raw))
        if method == "DELETE" and path == "/api/delete":
            return self._api_delete(self._parse_body(raw))
        return text_reply(404, "404 page not found")

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
        except RecursionError:
            raise _ApiError(400, "exceeded max depth") from None
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

    def _api_tags(self) -> Reply:
        with self._state_lock:
            installed = sorted(self._installed.values(), key=lambda i: (-i.modified_wall_ns, i.spec.name))
            models: list[dict[str, Any]] = []
            for i in installed:
                entry: dict[str, Any] = {"name": i.spec.name, "model": i.spec.name}
                if i.spec.is_cloud and self._behaviour.remote_models:
                    entry["remote_model"] = i.spec.remote_model
                    entry["remote_host"] = i.spec.remote_host
                entry["modified_at"] = format_rfc3339nano(i.modified_wall_ns, self._tz)
                entry["size"] = i.spec.file_size_bytes
                entry["digest"] = i.spec.digest
                entry["details"] = self._details(i.spec)
                models.append(entry)
        return json_reply(200, {"models": models})

    def _api_ps(self) -> Reply:
        with self._state_lock:
            entries = self._ps_locked()
        rule = self._rule_for("/api/ps", tuple(_PS_FAULTS))
        if rule is not None:
            self._consume(rule)
            if not entries:
                entries = self._fake_ps_entry()
            entries = bad.ps_anomaly(_PS_FAULTS[rule.fault], entries)
        return json_reply(200, {"models": entries})

    def _fake_ps_entry(self) -> list[dict[str, Any]]:
        # Nothing loaded: bend an entry for an installed model so the anomaly is there to see.
        with self._state_lock:
            specs = [i.spec for i in self._installed.values() if not i.spec.is_cloud]
        if not specs:
            return []
        spec = specs[0]
        now = time.time_ns()
        entry: dict[str, Any] = {
            "name": spec.name,
            "model": spec.name,
            "size": spec.file_size_bytes,
            "digest": spec.digest,
            "details": self._details(spec),
            "expires_at": format_rfc3339nano(now + 300 * 10**9, self._tz),
            "size_vram": spec.file_size_bytes,
        }
        context = self._behaviour.ps_context_length(4096, 4096)
        if context is not None:
            entry["context_length"] = context
        return [entry]

    def _api_show(self, body: dict[str, Any]) -> Reply:
        model = self._model_field(body, "model", "name")
        if not model:
            raise _ApiError(400, "model is required")
        with self._state_lock:
            inst = self._installed.get(normalize_name(model))
            if inst is None:
                raise _ApiError(404, f"model '{model}' not found")
            return json_reply(200, self._show(inst.spec, inst.modified_wall_ns, body.get("verbose") is True))

    def _timings(self, prompt_tokens: int, eval_tokens: int) -> dict[str, int]:
        out = {"total_duration": 2_000_000 + 1_000_000 * eval_tokens, "load_duration": 1_000_000}
        out["prompt_eval_count"] = prompt_tokens
        out["prompt_eval_duration"] = 100_000 * prompt_tokens
        if eval_tokens:
            out["eval_count"] = eval_tokens
            out["eval_duration"] = 1_000_000 * eval_tokens
        return out

    def _remote(self, spec: ModelSpec) -> dict[str, Any]:
        # A cloud model's reply comes from upstream and says so (GenerateResponse.RemoteModel/Host).
        return {"remote_model": spec.remote_model, "remote_host": spec.remote_host} if spec.is_cloud else {}

    def _api_generate(self, body: dict[str, Any]) -> Reply:
        model = self._model_field(body, "model")
        keep = self._keep_alive(body)
        spec = self._installed_spec(model) if model else None
        if spec is None:
            raise _ApiError(404, f"model '{model}' not found")
        prompt = body.get("prompt") or ""
        if prompt == "" and keep == 0:
            self._expire_runner(spec.name)
            return json_reply(
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
        if spec.is_cloud:
            reply = {"model": model, **self._remote(spec), "created_at": self._now_utc(), "response": ""}
            return json_reply(200, {**reply, "done": True, "done_reason": "load" if not prompt else "stop"})
        num_ctx, num_gpu = self._options(body)
        runner = self._acquire(spec, keep, num_ctx, num_gpu)
        try:
            if prompt == "":
                return json_reply(
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
                return json_reply(200, final)
            chunks: list[object] = [
                {
                    "model": model,
                    "created_at": self._now_utc(),
                    "response": w + (" " if i < len(words) - 1 else ""),
                    "done": False,
                }
                for i, w in enumerate(words)
            ]
            return ndjson_reply([*chunks, final])
        finally:
            self._release(runner)

    def _api_chat(self, body: dict[str, Any]) -> Reply:
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
            return json_reply(
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
        if spec.is_cloud:
            reply = {"model": model, **self._remote(spec), "created_at": self._now_utc(), "message": empty}
            return json_reply(200, {**reply, "done_reason": "load" if not messages else "stop", "done": True})
        num_ctx, num_gpu = self._options(body)
        runner = self._acquire(spec, keep, num_ctx, num_gpu)
        try:
            if not messages:
                return json_reply(
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
                return json_reply(200, final)
            first = {
                "model": model,
                "created_at": self._now_utc(),
                "message": {"role": "assistant", "content": text},
                "done": False,
            }
            final["message"] = {"role": "assistant", "content": ""}
            return ndjson_reply([first, final])
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
        if spec.is_cloud:
            raise _ApiError(400, f"{json.dumps(model)} does not support embeddings")
        return model, spec, keep

    def _api_embed(self, body: dict[str, Any]) -> Reply:
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
                return json_reply(200, {"model": model, "embeddings": []})
            out = {
                "model": model,
                "embeddings": [self._vector(spec, t) for t in inputs],
                "total_duration": 14_000_000,
                "load_duration": 1_000_000,
                "prompt_eval_count": sum(len(t.split()) for t in inputs),
            }
            return json_reply(200, out)
        finally:
            self._release(runner)

    def _api_embeddings(self, body: dict[str, Any]) -> Reply:
        _, spec, keep = self._embedding_model(body)
        prompt = body.get("prompt") or ""
        num_ctx, num_gpu = self._options(body)
        runner = self._acquire(spec, keep, num_ctx, num_gpu)
        try:
            return json_reply(200, {"embedding": self._vector(spec, str(prompt)) if prompt else []})
        finally:
            self._release(runner)

    def _api_pull(self, body: dict[str, Any]) -> Reply:
        raw_name = self._model_field(body, "model", "name")
        if not raw_name.strip():
            raise _ApiError(400, "model is required")
        name, cloud = normalize_pull_name(raw_name)
        stream = body.get("stream", True) is not False
        spec: ModelSpec | None
        try:
            spec = resolve_model(name)
        except EmulatorError:
            spec = None
        if spec is not None and (spec.is_cloud or cloud) and not self._behaviour.remote_models:
            spec = None  # no cloud models before v0.12.0: the registry has no such manifest here
        if spec is None:
            if not stream:
                raise _ApiError(500, MANIFEST_NOT_FOUND)
            return ndjson_reply([{"status": "pulling manifest"}, {"error": MANIFEST_NOT_FOUND}])
        found = spec
        with self._state_lock:
            already = found.name in self._installed

        def fault() -> str | None:
            rule = self._rule_for("/api/pull", tuple(_PULL_FAULTS))
            return None if rule is None else _PULL_FAULTS[rule.fault]

        def install() -> None:
            with self._state_lock:
                self._installed[found.name] = _Installed(found, time.time_ns())

        progress = pull_stream(
            found,
            installed=already,
            speed_bps=self.pull_speed_bps,
            fault=fault,
            wait=self._stop_event.wait,
            install=install,
        )
        if not stream:
            # waitForStream: the last progress object, or the error as a 500.
            last: dict[str, object] = {}
            for item in progress:
                if "error" in item:
                    raise _ApiError(500, str(item["error"]))
                last = item
            return json_reply(200, last)
        lines = (json.dumps(o, separators=(",", ":")).encode() + b"\n" for o in progress)
        return Reply(200, content_type=NDJSON, stream=guarded(lines, self._stream_error))

    def _stream_error(self, exc: BaseException) -> None:
        logger.error("node %s: streaming reply failed: %s", self.name, exc)

    def _api_delete(self, body: dict[str, Any]) -> Reply:
        model = self._model_field(body, "model", "name")
        if not model:
            raise _ApiError(400, "model is required")
        name = normalize_name(model)
        with self._state_lock:
            if name not in self._installed:
                raise _ApiError(404, f"model '{model}' not found")
            del self._installed[name]
        self._expire_runner(name)
        return Reply(200, b"", JSON)

    @staticmethod
    def _unsupported(what: str) -> Reply:
        return json_reply(400, {"error": f"{what} is not supported by the emulator"})
