"""What the daemon publishes for /metrics, the status API and the page: one frozen snapshot plus counters.

The main loop builds a new :class:`DaemonSnapshot` after each reconcile and each action result and
swaps it in with one reference assignment; readers (HTTP threads) take ``telemetry.snapshot`` once
and read only that. Counters and the reconcile histogram are bumped from any thread under a short
lock that is never held across I/O. Nothing here talks to a node.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from functools import cached_property
from types import MappingProxyType
from typing import Any

from gpu_router import __version__
from gpu_router.config import Config
from gpu_router.executor import ActionResult
from gpu_router.planner import Action, ActionKind, Placement, Plan
from gpu_router.pull import PullProgress
from gpu_router.records import field, record, replace
from gpu_router.report import Json, Report, build_report
from gpu_router.state import ClusterState, Gpu, NodeState, Processor

NODE_STATES = ("up", "degraded", "down")
RECENT_ACTIONS = 20
RECONCILE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
POLL_ERROR_REASONS = ("timeout", "refused", "unreachable", "http_error", "bad_response", "gpu_source")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def node_state_name(status: str) -> str:
    """The node state as the metrics and API name it: ``error`` (the older name) is ``degraded``."""
    return "degraded" if status == "error" else status


@record
class GpuHealth:
    """A GPU's utilization, temperature and health, where its source reports them."""

    utilization_ratio: float | None = None
    temperature_c: float | None = None
    healthy: bool = True
    health_reason: str = ""


def gpu_health(g: Gpu) -> GpuHealth:
    """Read the health fields off ``g``; sources without them report a healthy GPU with no figures.

    The fields arrive with the GPU-health work (``Gpu.utilization_ratio`` and friends); until then
    this is the one place that reads them, so it can become plain attribute access later.
    """
    util = getattr(g, "utilization_ratio", None)
    temp = getattr(g, "temperature_c", None)
    healthy = getattr(g, "healthy", True)
    reason = getattr(g, "health_reason", "")
    return GpuHealth(
        float(util) if isinstance(util, (int, float)) else None,
        float(temp) if isinstance(temp, (int, float)) else None,
        bool(healthy),
        str(reason or ""),
    )


def poll_error_reason(status: str, message: str) -> str:
    """A bounded label for why polling a node failed (the message itself is unbounded)."""
    text = message.lower()
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if "refused" in text:
        return "refused"
    if status == "down":
        return "unreachable"
    if text.startswith("http ") or " http " in text:
        return "http_error"
    return "bad_response"


# --------------------------------------------------------------------------- records


@record
class ActionRecord:
    """One action the daemon started, and how it ended (``result`` is ``in_flight`` until then)."""

    reconcile: int
    node: str
    model: str
    action: str
    reason: str
    started_at: datetime
    result: str = "in_flight"  # in_flight, ok, failed, abandoned (a pull cut short by a stop or reload)
    detail: str = ""
    duration_s: float | None = None

    def to_json(self) -> Json:
        """JSON-ready fields."""
        return {
            "reconcile": self.reconcile,
            "node": self.node,
            "model": self.model,
            "action": self.action,
            "reason": self.reason,
            "started_at": self.started_at.isoformat(),
            "result": self.result,
            "detail": self.detail,
            "duration_s": None if self.duration_s is None else round(self.duration_s, 3),
        }


@record
class BackoffRecord:
    """A (model, node) pair the daemon will not try again before ``until``."""

    model: str
    node: str
    failures: int
    until: datetime


@record
class RouteTarget:
    """A node a request for a model can go to."""

    node: str
    url: str
    on_gpu: bool
    utilization_ratio: float | None = None
    loaded_models: int = 0

    def to_json(self) -> Json:
        """JSON-ready fields."""
        return {
            "node": self.node,
            "url": self.url,
            "on_gpu": self.on_gpu,
            "utilization_ratio": self.utilization_ratio,
            "loaded_models": self.loaded_models,
        }


@record
class Route:
    """Where requests for one model should go now: replicas fully on GPU (least loaded first), or the plan."""

    model: str
    replicas: tuple[RouteTarget, ...]
    planned: RouteTarget | None
    placement: str
    reason: str

    @property
    def best(self) -> RouteTarget | None:
        """The least loaded replica on GPU, else the planned node."""
        return self.replicas[0] if self.replicas else self.planned


def _mean_utilization(n: NodeState) -> float | None:
    values = [u for u in (gpu_health(g).utilization_ratio for g in n.gpu.gpus) if u is not None]
    return sum(values) / len(values) if values else None


def build_routes(state: ClusterState, plan: Plan) -> dict[str, Route]:
    """model -> :class:`Route` for every model loaded or planned.

    "Least loaded" is the lowest mean GPU utilization where the source reports it (nodes without
    the figure come after those with it), then the fewest models loaded, then config order.
    """
    targets: dict[str, list[tuple[tuple[bool, float, int, int], RouteTarget]]] = {}
    by_node: dict[str, NodeState] = {}
    for i, n in enumerate(state.nodes):
        by_node[n.name] = n
        if not n.up:
            continue
        util = _mean_utilization(n)
        count = len(n.loaded)
        for m in n.loaded:
            if m.processor is Processor.GPU:
                key = (util is None, util or 0.0, count, i)
                targets.setdefault(m.name, []).append((key, RouteTarget(n.name, n.url, True, util, count)))
    routes: dict[str, Route] = {}
    for mp in plan.models:
        found = [t for _, t in sorted(targets.pop(mp.model, []), key=lambda kt: kt[0])]
        planned = None
        d = mp.decision
        if d.node is not None and d.placement is not Placement.NONE:
            target = by_node.get(d.node)
            if target is not None:
                planned = RouteTarget(
                    target.name,
                    target.url,
                    d.placement is Placement.GPU,
                    _mean_utilization(target),
                    len(target.loaded),
                )
        routes[mp.model] = Route(mp.model, tuple(found), planned, d.placement.value, d.reason)
    for model, found_keyed in targets.items():  # loaded, but unknown to the plan (should not happen)
        found = [t for _, t in sorted(found_keyed, key=lambda kt: kt[0])]
        routes[model] = Route(model, tuple(found), None, "gpu", "fully on GPU")
    return routes


_EMPTY_PLAN = Plan((), (), ())


def _no_pulls() -> tuple[PullProgress, ...]:
    return ()


_DERIVED = ("every_model", "report", "routes")  # the cached properties that depend on state and plan only


@record
class DaemonSnapshot:
    """Everything served, as of the last reconcile or action result. Never mutated; replaced whole."""

    config: Config
    started_at: datetime
    started_mono_s: float
    state: ClusterState | None = None
    plan: Plan | None = None
    reconciles: int = 0
    last_reconcile_at: datetime | None = None
    last_reconcile_mono_s: float | None = None
    last_reconcile_duration_s: float | None = None
    next_reconcile_at: datetime | None = None
    last_error: str | None = None
    recent_actions: tuple[ActionRecord, ...] = ()  # oldest first
    in_flight: tuple[ActionRecord, ...] = ()
    backoffs: tuple[BackoffRecord, ...] = ()
    node_since: Mapping[str, datetime] = field(default_factory=lambda: MappingProxyType({}))
    dry_run: bool = False
    pid: int = field(default_factory=os.getpid)
    # The daemon plans only what it acts on (the priority models); the report and the routes want
    # every model, so the full plan of the same observation is made on first use, if ever.
    full_plan: Callable[[], Plan] | None = field(default=None, compare=False, repr=False)
    # Pulls in flight, read live: their progress moves between snapshots (a short lock, no I/O).
    pulls: Callable[[], tuple[PullProgress, ...]] = field(default=_no_pulls, compare=False, repr=False)

    @cached_property
    def every_model(self) -> Plan | None:
        """The plan with every model the cluster knows, for the report and the routes."""
        if self.plan is None:
            return None
        return self.full_plan() if self.full_plan is not None else self.plan

    # Built on first use by whichever reader comes first: a snapshot is immutable, so computing
    # twice in a race gives the same answer and costs only the duplicate work.
    @cached_property
    def report(self) -> Report:
        """The report, the same records as ``--report-only`` (``to_json()`` is its ``--json``)."""
        plan = self.every_model
        if self.state is None or plan is None:
            # Before the first reconcile, or between a reload and the reconcile that follows it.
            return build_report(ClusterState(()), _EMPTY_PLAN)
        return build_report(self.state, plan)

    @cached_property
    def routes(self) -> Mapping[str, Route]:
        """model -> where requests for it should go."""
        plan = self.every_model
        if self.state is None or plan is None:
            return {}
        return build_routes(self.state, plan)

    def priority_on_gpu(self) -> tuple[int, int]:
        """(on GPU, configured); before the first reconcile nothing counts as on GPU."""
        if self.plan is None:
            return 0, len(self.config.priority_models)
        from gpu_router.planner import priority_on_gpu

        return priority_on_gpu(self.plan)

    def daemon_json(self, now: datetime | None = None) -> Json:
        """The daemon's own fields for ``/api/v1/status``; never a header value or the token."""
        now = now or _utcnow()

        def iso(t: datetime | None) -> str | None:
            return t.isoformat() if t is not None else None

        state_by_node = {n.name: n.status.value for n in (self.state.nodes if self.state else ())}
        on_gpu, priority = self.priority_on_gpu()
        c = self.config
        return {
            "version": __version__,
            "pid": self.pid,
            "started_at": iso(self.started_at),
            "uptime_s": round((now - self.started_at).total_seconds(), 3),
            "reconciles": self.reconciles,
            "last_reconcile_at": iso(self.last_reconcile_at),
            "last_reconcile_duration_s": None
            if self.last_reconcile_duration_s is None
            else round(self.last_reconcile_duration_s, 3),
            "next_reconcile_at": iso(self.next_reconcile_at),
            "last_error": self.last_error,
            "priority_models": priority,
            "priority_models_on_gpu": on_gpu,
            "check_interval_s": c.check_interval_s,
            "watch_interval_s": c.watch_interval_s,
            "auto_optimize": c.auto_optimize,
            "dry_run": self.dry_run,
            "actions": [a.to_json() for a in reversed(self.recent_actions)],
            "in_flight": [a.to_json() for a in self.in_flight],
            "pulls": [p.to_json(now) for p in self.pulls()],
            "backoffs": [
                {
                    "model": b.model,
                    "node": b.node,
                    "failures": b.failures,
                    "until": b.until.isoformat(),
                    "retry_in_s": round(max(0.0, (b.until - now).total_seconds()), 1),
                }
                for b in self.backoffs
            ],
            "nodes": [
                {
                    "node": name,
                    "state": node_state_name(state_by_node.get(name, "unknown")),
                    "since": iso(self.node_since.get(name)),
                    "for_s": None
                    if name not in self.node_since
                    else round((now - self.node_since[name]).total_seconds(), 1),
                }
                for name in (n.name for n in c.nodes)
            ],
        }

    def status_json(self, now: datetime | None = None) -> Json:
        """``/api/v1/status``: the report's JSON plus ``daemon``."""
        return {**self.report.to_json(), "daemon": self.daemon_json(now)}


# --------------------------------------------------------------------------- counters


class LabelledCounter:
    """A monotonic counter per label tuple, safe to bump from any thread."""

    def __init__(self, labelnames: Sequence[str]) -> None:
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add ``amount`` to the series with these label values (in ``labelnames`` order)."""
        if len(labels) != len(self.labelnames):
            raise ValueError(f"expected labels {self.labelnames}, got {labels}")
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def samples(self) -> list[tuple[tuple[str, ...], float]]:
        """Every series and its value, in label order."""
        with self._lock:
            return sorted(self._values.items())

    def value(self, *labels: str) -> float:
        """One series' value (0 when never bumped)."""
        with self._lock:
            return self._values.get(labels, 0.0)

    def keep_nodes(self, nodes: Iterable[str]) -> None:
        """Drop the series whose first label (the node) is not in ``nodes``: a removed node leaves."""
        keep = set(nodes)
        with self._lock:
            self._values = {k: v for k, v in self._values.items() if k[0] in keep}


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus histograms are exposed."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self._counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        with self._lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1
                    break
            else:
                self._counts[-1] += 1
            self._sum += value

    def cumulative(self) -> tuple[list[tuple[float, int]], float]:
        """([(upper bound, count <= bound)...] ending with +Inf, sum)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        out, running = [], 0
        for bound, c in zip((*self.buckets, float("inf")), counts, strict=True):
            running += c
            out.append((bound, running))
        return out, total


# --------------------------------------------------------------------------- the hub


class Telemetry:
    """The daemon's published snapshot, its counters and histogram; the one thing the API reads.

    Methods that publish are called from the main loop only (so snapshots are built in order);
    counters may be bumped from any thread.
    """

    def __init__(
        self,
        config: Config,
        *,
        dry_run: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _utcnow,
        pulls: Callable[[], tuple[PullProgress, ...]] = _no_pulls,
    ) -> None:
        self._clock = clock
        self._wall = wall_clock
        self.snapshot = DaemonSnapshot(config, wall_clock(), clock(), dry_run=dry_run, pulls=pulls)
        self.poll_errors = LabelledCounter(("node", "reason"))
        self.actions = LabelledCounter(("node", "model", "action", "result"))
        self.drift_events = LabelledCounter(("node", "kind"))
        self.reconcile_seconds = Histogram(RECONCILE_BUCKETS_S)
        self.loop_thread: threading.Thread | None = None  # the thread running the main loop
        self._recent: deque[ActionRecord] = deque(maxlen=RECENT_ACTIONS)
        self._in_flight: dict[tuple[str, str, str], ActionRecord] = {}
        self._since: dict[str, tuple[str, datetime]] = {}

    def _publish(self, **changes: Any) -> None:
        changes.setdefault("recent_actions", tuple(self._recent))
        changes.setdefault("in_flight", tuple(self._in_flight.values()))
        old = self.snapshot
        new = replace(old, **changes)
        if new.state is old.state and new.plan is old.plan:
            # An action result changes neither the observation nor the plan: keep what was
            # already derived from them (cached_property stores it in the instance __dict__).
            for key in _DERIVED:
                if key in old.__dict__:
                    new.__dict__[key] = old.__dict__[key]
        self.snapshot = new

    def loop_started(self) -> None:
        """Remember the calling thread as the main loop, for /healthz."""
        self.loop_thread = threading.current_thread()

    def reconciled(
        self,
        state: ClusterState,
        plan: Plan,
        *,
        reconcile: int,
        duration_s: float,
        next_in_s: float,
        backoffs: Iterable[tuple[str, str, int, float]] = (),
        full_plan: Callable[[], Plan] | None = None,
    ) -> None:
        """Publish a finished reconcile: count its poll errors, time it, swap the snapshot."""
        now = self._wall()
        gpu_kinds = {n.name: n.gpu.kind for n in self.snapshot.config.nodes}
        for n in state.nodes:
            if not n.up:
                self.poll_errors.inc(n.name, poll_error_reason(n.status.value, n.error or ""))
            if n.gpu.error and gpu_kinds.get(n.name) in ("exporter", "nvml"):
                self.poll_errors.inc(n.name, "gpu_source")
        self.reconcile_seconds.observe(duration_s)
        self._publish(
            state=state,
            plan=plan,
            full_plan=full_plan,
            reconciles=reconcile,
            last_reconcile_at=now,
            last_reconcile_mono_s=self._clock(),
            last_reconcile_duration_s=duration_s,
            next_reconcile_at=now + timedelta(seconds=next_in_s) if next_in_s != float("inf") else None,
            last_error=None,
            backoffs=tuple(
                BackoffRecord(m, n, count, now + timedelta(seconds=left)) for m, n, count, left in backoffs
            ),
            node_since=MappingProxyType(self._node_since(state, now)),
        )

    def _node_since(self, state: ClusterState, now: datetime) -> dict[str, datetime]:
        out: dict[str, datetime] = {}
        for n in state.nodes:
            given = getattr(n, "state_since", None)  # NodeState carries it once the state machine lands
            if isinstance(given, datetime):
                out[n.name] = given
                continue
            status = n.status.value
            before = self._since.get(n.name)
            if before is None or before[0] != status:
                self._since[n.name] = before = (status, now)
            out[n.name] = before[1]
        return out

    def reconcile_failed(self, reconcile: int, error: str) -> None:
        """A reconcile raised: say so in the status; the last good observation stays served."""
        self._publish(reconciles=reconcile, last_error=error)

    def actions_started(self, reconcile: int, actions: Iterable[Action]) -> None:
        """Actions handed to the executor: shown as in flight until their results come."""
        now = self._wall()
        for a in actions:
            self._in_flight[(a.node, a.model, a.kind.value)] = ActionRecord(
                reconcile, a.node, a.model, a.kind.value, a.reason, now
            )
        self._publish()

    def action_finished(self, r: ActionResult) -> None:
        """Count one result and move it from in flight to the recent actions."""
        a = r.action
        result = "ok" if r.ok else "failed"
        self.actions.inc(a.node, a.model, a.kind.value, result)
        started = self._in_flight.pop((a.node, a.model, a.kind.value), None)
        record = ActionRecord(
            started.reconcile if started else self.snapshot.reconciles,
            a.node,
            a.model,
            a.kind.value,
            a.reason,
            started.started_at if started else self._wall() - timedelta(seconds=r.duration_s),
            result,
            r.detail,
            r.duration_s,
        )
        self._recent.append(record)
        self._publish()

    def action_abandoned(self, a: Action, detail: str, duration_s: float) -> None:
        """An action cut short by a stop or a reload (a pull): shown, but not counted as a failure."""
        started = self._in_flight.pop((a.node, a.model, a.kind.value), None)
        self._recent.append(
            ActionRecord(
                started.reconcile if started else self.snapshot.reconciles,
                a.node,
                a.model,
                a.kind.value,
                a.reason,
                started.started_at if started else self._wall() - timedelta(seconds=duration_s),
                "abandoned",
                detail,
                duration_s,
            )
        )
        self._publish()

    def drift(self, node: str, kind: str) -> None:
        """Count one drift event seen by the watch (node_down, node_back, model_lost, model_unpinned)."""
        self.drift_events.inc(node, kind)

    def poll_error(self, node: str, status: str, message: str) -> None:
        """Count a failed poll outside a reconcile (the watch's /api/ps)."""
        self.poll_errors.inc(node, poll_error_reason(status, message))

    def reloaded(self, config: Config) -> None:
        """A new config: removed nodes leave the metrics, the counters and the served state."""
        names = {n.name for n in config.nodes}
        for counter in (self.poll_errors, self.actions, self.drift_events):
            counter.keep_nodes(names)
        self._since = {k: v for k, v in self._since.items() if k in names}
        self._in_flight = {k: v for k, v in self._in_flight.items() if k[0] in names}
        state = self.snapshot.state
        if state is not None:
            state = ClusterState(tuple(n for n in state.nodes if n.name in names), state.observed_at)
        # The old plan names removed nodes and models: drop it until the next reconcile (it comes at once).
        self._publish(config=config, state=state, plan=None)


def static_snapshot(
    config: Config, state: ClusterState, plan: Plan, *, now: datetime | None = None
) -> DaemonSnapshot:
    """A snapshot of one observation with no daemon behind it (``--report-only --textfile``, tests)."""
    at = now or state.observed_at or _utcnow()
    return DaemonSnapshot(config, at, time.monotonic(), state=state, plan=plan)


class OptimizeTicket:
    """One "reconcile now and tell me what happened" request (``gpu-router optimize`` through the API).

    The main loop fills it in: the reconcile that served it and what that reconcile planned and
    started, then every action result that comes in while the request waits, including those of
    actions an earlier reconcile had in flight (a load the request would otherwise have found
    "already happening"). ``done`` is set once that reconcile ran and nothing is in flight.
    """

    def __init__(self, after: int) -> None:
        self.after = after  # served by the first reconcile numbered above this
        self.done = threading.Event()
        self._lock = threading.Lock()
        self.reconcile: int | None = None
        self.planned: tuple[Action, ...] = ()
        self.started: tuple[Action, ...] = ()
        self.results: list[ActionResult] = []
        self.error: str | None = None
        self.summary: str = ""

    def attach(
        self, reconcile: int, planned: Sequence[Action], started: Sequence[Action], summary: str
    ) -> None:
        """The reconcile that serves this request, and what it planned and started."""
        with self._lock:
            self.reconcile = reconcile
            self.planned = tuple(planned)
            self.started = tuple(started)
            self.summary = summary

    def add_result(self, r: ActionResult) -> None:
        """An action finished while this request waited."""
        with self._lock:
            self.results.append(r)

    def finish(self, error: str | None = None) -> None:
        """No more results will come."""
        with self._lock:
            self.error = error
        self.done.set()

    def to_json(self) -> Json:
        """JSON-ready fields for the API's answer: every result, then what is still in flight."""
        with self._lock:
            finished = {id(r.action) for r in self.results}
            actions: list[Json] = [
                {
                    "action": r.action.kind.value,
                    "node": r.action.node,
                    "model": r.action.model,
                    "reason": r.action.reason,
                    "result": "ok" if r.ok else "failed",
                    "detail": r.detail,
                    "duration_s": round(r.duration_s, 3),
                }
                for r in self.results
            ]
            actions += [
                {
                    "action": a.kind.value,
                    "node": a.node,
                    "model": a.model,
                    "reason": a.reason,
                    "result": "in_flight",
                    # A pull runs on in the background (up to pull_timeout), not for this request.
                    "detail": "pulling in the background; `gpu-router status` shows how far"
                    if a.kind is ActionKind.PULL
                    else "",
                    "duration_s": None,
                }
                for a in self.started
                if id(a) not in finished
            ]
            return {
                "done": self.done.is_set(),
                "reconcile": self.reconcile,
                "error": self.error,
                "summary": self.summary,
                "planned": [
                    {"action": a.kind.value, "node": a.node, "model": a.model, "reason": a.reason}
                    for a in self.planned
                ],
                "actions": actions,
            }
