"""Apply a plan: unload victims, load with a keep_alive pin, verify with ``/api/ps``.

Each node gets at most one sequence of actions in flight, run in its own thread so nodes proceed
in parallel and the daemon's main loop keeps polling and pinging the watchdog while a load takes
minutes. Threads are daemon threads: a load hung on a dead node must never hold up an exit.

A sequence acts on the present, not on the plan's picture of it: it starts from a fresh
``/api/ps`` of its node and skips what is already true (a model someone else loaded meanwhile, a
victim already gone). A load that does not end fully on GPU is not left pinned there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone

from gpu_router.ollama import OllamaClient, OllamaError
from gpu_router.planner import Action, ActionKind, is_pinned
from gpu_router.records import record, replace
from gpu_router.state import LoadedModel, Processor

log = logging.getLogger(__name__)

PIN = -1  # keep_alive as a JSON number: negative means forever; the string "-1" is a 400
# What a model gets back when a load of ours ended partly on CPU and someone was using it before:
# Ollama's own default keep_alive (OLLAMA_KEEP_ALIVE, 5m), so it expires as if we had never come.
GIVE_BACK_KEEP_ALIVE = "5m"


@record
class ActionResult:
    """What one action did."""

    action: Action
    ok: bool
    detail: str
    duration_s: float
    observed: LoadedModel | None = None  # the /api/ps entry after a load
    skipped: bool = False  # nothing was sent: the wanted state was already true


class Backoff:
    """Per (model, node) failure backoff: doubling from ``base_s``, capped at ``cap_s``."""

    def __init__(
        self, base_s: float = 30.0, cap_s: float = 3600.0, clock: Callable[[], float] = time.monotonic
    ):
        self.base_s = base_s
        self.cap_s = cap_s
        self._clock = clock
        self._failures: dict[tuple[str, str], tuple[int, float]] = {}

    def failed(self, model: str, node: str) -> float:
        """Record a failure; returns the seconds until the next try."""
        count = self._failures.get((model, node), (0, 0.0))[0] + 1
        delay = float(min(self.cap_s, self.base_s * 2.0 ** (count - 1)))
        self._failures[(model, node)] = (count, self._clock() + delay)
        return delay

    def succeeded(self, model: str, node: str) -> None:
        """Forget the failures of a pair that worked."""
        self._failures.pop((model, node), None)

    def entries(self) -> list[tuple[str, str, int, float]]:
        """(model, node, failures, seconds left) of every pair still waiting, for the status API."""
        now = self._clock()
        return sorted(
            (model, node, count, until - now)
            for (model, node), (count, until) in self._failures.items()
            if until > now
        )

    def blocked(self) -> frozenset[tuple[str, str]]:
        """Pairs that are still waiting."""
        now = self._clock()
        return frozenset(k for k, (_, until) in self._failures.items() if until > now)

    def in_force(self) -> dict[tuple[str, str], float]:
        """(model, node) -> seconds left, for the pairs still waiting."""
        now = self._clock()
        return {k: until - now for k, (_, until) in self._failures.items() if until > now}


class Executor:
    """Runs action sequences, one per node at a time."""

    def __init__(
        self,
        clients: Mapping[str, OllamaClient],
        *,
        load_timeout_s: float,
        on_done: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clients = clients
        self.load_timeout_s = load_timeout_s
        self._on_done = on_done
        self._clock = clock
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._in_flight: dict[str, tuple[str, ...]] = {}  # node -> models its sequence loads
        self._finished_at: dict[str, float] = {}  # node -> when its last sequence ended (clock)
        self._results: list[ActionResult] = []
        self._stopping = threading.Event()

    def busy_nodes(self) -> set[str]:
        """Nodes with a sequence in flight."""
        with self._lock:
            return set(self._threads)

    def loading_models(self) -> set[str]:
        """Models that a sequence in flight is loading somewhere."""
        with self._lock:
            return {m for models in self._in_flight.values() for m in models}

    def finished_since(self, node: str, since: float) -> bool:
        """True when a sequence on ``node`` ended at or after ``since``: a plan older than that is stale."""
        with self._lock:
            return self._finished_at.get(node, float("-inf")) >= since

    def submit(self, node: str, actions: Sequence[Action]) -> bool:
        """Start ``actions`` on ``node``; False when that node is busy or the executor stops."""
        if self._stopping.is_set() or not actions:
            return False
        with self._lock:
            if node in self._threads:
                return False
            t = threading.Thread(
                target=self._run, args=(node, tuple(actions)), name=f"act-{node}", daemon=True
            )
            self._threads[node] = t
            self._in_flight[node] = tuple(a.model for a in actions if a.kind is ActionKind.LOAD)
        t.start()
        return True

    def collect(self) -> list[ActionResult]:
        """Results finished since the last call."""
        with self._lock:
            out, self._results = self._results, []
        return out

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait for every sequence in flight; True when none is left."""
        return wait_for_threads(self._lock, self._threads, timeout_s)

    def begin_stop(self) -> None:
        """Start no new sequence, and no new step of one that has not unloaded anything yet."""
        self._stopping.set()

    def stop(self, grace_s: float) -> bool:
        """Start nothing new; give steps in flight ``grace_s`` to finish. True when all did."""
        self.begin_stop()
        return self.wait_idle(grace_s)

    def _record(self, result: ActionResult) -> None:
        with self._lock:
            self._results.append(result)

    def _run(self, node: str, actions: tuple[Action, ...]) -> None:
        started = False
        client = self.clients[node]
        try:
            t0 = time.monotonic()
            try:
                now = {m.name: m for m in client.ps()}
            except OllamaError as exc:
                # Without a fresh picture nothing is sent: the plan may no longer be true there.
                took = time.monotonic() - t0
                for a in actions:
                    self._record(ActionResult(a, False, f"before acting: {exc.message}", took))
                return
            for a in actions:
                # A sequence not yet begun is dropped on stop; one that has unloaded something goes
                # on to its load, so a move is never left half-way when there is time to finish it.
                if self._stopping.is_set() and not started:
                    log.info("node %s: stopping; %s %s not started", node, a.kind.value, a.model)
                    return
                skip = _already_true(a, now)
                if skip is not None:
                    self._record(ActionResult(a, True, skip, 0.0, now.get(a.model), skipped=True))
                    continue
                started = True
                a = _in_place(a, now.get(a.model))
                result = self._do(client, a, now)
                self._record(result)
                if result.observed is not None:
                    now[a.model] = result.observed
                elif a.kind is ActionKind.UNLOAD and result.ok:
                    now.pop(a.model, None)
                if not result.ok:
                    if a.kind is ActionKind.UNLOAD:
                        # Without the room, the load that follows would only make Ollama evict on its own.
                        log.warning("node %s: skipping the rest of the sequence after a failed unload", node)
                    break
        finally:
            with self._lock:
                self._threads.pop(node, None)
                self._in_flight.pop(node, None)
                self._finished_at[node] = self._clock()
            self._on_done()

    def _do(self, client: OllamaClient, a: Action, before: Mapping[str, LoadedModel]) -> ActionResult:
        start = time.monotonic()
        options = {"num_ctx": a.num_ctx} if a.num_ctx else None
        try:
            if a.kind is ActionKind.UNLOAD:
                client.unload(a.model)
                return ActionResult(a, True, "unload requested", time.monotonic() - start)
            client.load(
                a.model, embedding=a.embedding, keep_alive=PIN, timeout_s=self.load_timeout_s, options=options
            )
            loaded = next((m for m in client.ps() if m.name == a.model), None)
        except OllamaError as exc:
            return ActionResult(a, False, exc.message, time.monotonic() - start)
        took = time.monotonic() - start
        if loaded is None:
            return ActionResult(a, False, "load answered, but the model is not in /api/ps", took)
        if loaded.processor is Processor.GPU:
            what = "pinned in place" if a.kind is ActionKind.PIN else "fully on GPU"
            return ActionResult(a, True, f"{what} ({loaded.size_bytes / 2**30:.1f} GiB)", took, loaded)
        if a.on_cpu:
            # A cpu_fallback load: CPU is where it was meant to go. No ``observed``: a size on
            # CPU is not the VRAM the model needs, so nothing is learned or watched.
            return ActionResult(a, True, f"loaded as {loaded.processor_label} (cpu_fallback)", took)
        # Not fully on GPU: do not leave it pinned there, holding VRAM at CPU speed for ever.
        undo = self._give_back(client, a, a.model in before)
        return ActionResult(
            a, False, f"loaded as {loaded.processor_label}, not fully on GPU; {undo}", took, loaded
        )

    def _give_back(self, client: OllamaClient, a: Action, was_loaded: bool) -> str:
        """Undo our pin on a model that did not fit: unload what we brought, unpin what was there."""
        try:
            if was_loaded:
                client.load(
                    a.model,
                    embedding=a.embedding,
                    keep_alive=GIVE_BACK_KEEP_ALIVE,
                    timeout_s=self.load_timeout_s,
                    options={"num_ctx": a.num_ctx} if a.num_ctx else None,
                )
                return f"it was loaded before, so it got back keep_alive {GIVE_BACK_KEEP_ALIVE}"
            client.unload(a.model)
            return "unloaded it again"
        except OllamaError as exc:
            return f"could not undo the pin: {exc.message}"


def wait_for_threads(
    lock: threading.Lock,
    threads: Mapping[str, threading.Thread],
    timeout_s: float,
    tick: Callable[[], object] = lambda: None,
) -> bool:
    """Wait until ``threads`` (a map their owner empties under ``lock``) is empty, calling ``tick``
    between short joins; True when it emptied within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        with lock:
            left = list(threads.values())
        if not left:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        left[0].join(min(remaining, 0.2))
        tick()


def _already_true(a: Action, now: Mapping[str, LoadedModel]) -> str | None:
    """Why ``a`` need not be sent given the node's present /api/ps, or None when it must be."""
    m = now.get(a.model)
    if a.kind is ActionKind.UNLOAD:
        return "already unloaded" if m is None else None
    on_gpu = m is not None and m.processor is Processor.GPU and not a.on_cpu
    if a.kind is not ActionKind.PIN and on_gpu and m is not None and is_pinned(m, datetime.now(timezone.utc)):
        return "already fully on GPU and pinned (loaded meanwhile)"
    return None


def _in_place(a: Action, m: LoadedModel | None) -> Action:
    """A load of a model already fully on GPU pins it where it is, at the context it runs with."""
    if a.kind is ActionKind.LOAD and m is not None and m.processor is Processor.GPU and not a.on_cpu:
        return replace(a, kind=ActionKind.PIN, num_ctx=a.num_ctx or m.context_length)
    return a
