"""Pure planning: ``plan(state, config) -> Plan``.

For every model the cluster knows (priority models first, in config order) it decides which nodes
can hold it fully on GPU, why the others cannot, and the best node; for priority models it also
lists the actions (unload victims, load) that make it so. No I/O, no clock, no randomness: the
same inputs always give the same plan.

Placement rule, in order:
1. A model already fully on a GPU of an acceptable node stays there (never churn).
2. Otherwise, among up nodes where it is installed and fits in free usable VRAM now, take the
   *best fit*: the GPU (or, if no single GPU can hold it, the node's GPUs together) that the model
   leaves with the least free VRAM, so the large holes stay open for later, larger models.
   Ties go to the node listed first in the config.
3. For a priority model with no such node, make room where policy (``evict``) allows: unload
   non-priority models, soonest-expiring first, on the node that needs the fewest bytes unloaded.
4. Still nowhere on GPU: ``cpu_fallback`` loads a priority model on a CPU-only node.

Usable VRAM per GPU = total x vram_safety_margin - vram_reserve. Free = usable - used, where used
is what the GPU source reports (Ollama's models and every other process) or, when it reports only
totals, what ``/api/ps`` proves is resident.
"""

from __future__ import annotations

import enum
import gc
import heapq
import itertools
import sys
from bisect import bisect_left, insort
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import partial
from typing import Any, NamedTuple, cast

from gpu_router.config import Config, PriorityModel, is_cloud_name
from gpu_router.memory import max_loaded_models, preload_check_passes
from gpu_router.records import field, record, replace
from gpu_router.sizing import SizeEstimate, Sizer, SizeSource
from gpu_router.state import MIB, ClusterState, LoadedModel, NodeState, Processor, VramSource
from gpu_router.store import SizeKey

# Ollama prints "Forever" for an expiry this far ahead: it was loaded with keep_alive < 0.
PINNED_AFTER_S = 20 * 365 * 24 * 3600


class Placement(str, enum.Enum):
    """Where a model should run."""

    GPU = "gpu"
    CPU = "cpu"
    NONE = "none"


class Verdict(str, enum.Enum):
    """Why a node can or cannot hold a model fully on GPU."""

    RESIDENT = "resident"  # already there, fully on GPU
    FITS = "fits"
    FITS_AFTER_EVICTION = "fits_after_eviction"
    NO_ROOM = "no_room"  # would fit in usable VRAM, but not in what is free now
    TOO_LARGE = "too_large"  # larger than the node's usable VRAM
    NO_GPU = "no_gpu"
    VRAM_UNKNOWN = "vram_unknown"
    SIZE_UNKNOWN = "size_unknown"
    NOT_INSTALLED = "not_installed"
    NOT_ALLOWED = "not_allowed"  # excluded by the priority model's nodes list
    NODE_DOWN = "node_down"
    CLOUD = "cloud"  # a cloud model: it runs on Ollama's servers, never on a node's GPU
    BACKOFF = "backoff"  # a recent load here failed; the daemon waits before trying again
    UNCLEAR = "unclear"  # its /api/ps entry there could not be believed: no action on it
    GPU_UNHEALTHY = "gpu_unhealthy"  # every GPU of the node is unhealthy: nothing counts or goes there
    PULL = "pull"  # not installed, would fit: the daemon pulls it here (pull: true), then places it
    PULLING = "pulling"  # not installed yet: a pull to this node is in flight


class GpuCapacity(NamedTuple):
    """One GPU's memory as the planner sees it.

    A NamedTuple, as :class:`Fit`: a pass over 10,000 nodes makes 40,000 of these, and a frozen
    dataclass takes several times as long to build.
    """

    index: int  # type: ignore[assignment]  # shadows tuple.index, which nothing calls on a GpuCapacity
    name: str
    total_bytes: int
    usable_bytes: int
    used_bytes: int
    free_bytes: int  # usable - used, never negative; 0 on an unhealthy GPU
    healthy: bool = True


class NodeCapacity(NamedTuple):
    """A node's GPUs after margin and reserve; ``known`` is False when VRAM could not be learned."""

    node: str
    vram_source: VramSource
    known: bool
    gpus: tuple[GpuCapacity, ...] = ()

    @property
    def usable_bytes(self) -> int | None:
        """Sum of usable VRAM, None if unknown."""
        return sum(g.usable_bytes for g in self.gpus) if self.known else None

    @property
    def free_bytes(self) -> int | None:
        """Sum of free usable VRAM, None if unknown."""
        return sum(g.free_bytes for g in self.gpus) if self.known else None


class Fit(NamedTuple):
    """One node's verdict on one model.

    A NamedTuple rather than a frozen dataclass, and figures rather than a sentence: a large
    cluster has hundreds of thousands of verdicts per pass and only a few are ever read.
    """

    node: str
    verdict: Verdict
    gpus: tuple[int, ...] = ()
    evict: tuple[str, ...] = ()
    left_bytes: int | None = None  # free VRAM the placement would leave
    need_bytes: int | None = None
    have_bytes: int | None = None  # free now (NO_ROOM), usable per GPU (TOO_LARGE), resident (RESIDENT)
    span_bytes: int | None = None  # usable over all GPUs, for multi-GPU TOO_LARGE
    note: str = ""  # the whole reason, where it is not built from figures

    @property
    def fits(self) -> bool:
        """True when the model is, or can now be, fully on this node's GPU."""
        return self.verdict in (Verdict.RESIDENT, Verdict.FITS, Verdict.FITS_AFTER_EVICTION)

    @property
    def reason(self) -> str:
        """Why, in one sentence for people."""
        if self.note:
            return self.note
        v = self.verdict
        if v is Verdict.RESIDENT:
            return f"already fully on GPU ({_gib(self.have_bytes)})"
        if v is Verdict.FITS:
            where = f"GPU {self.gpus[0]}" if len(self.gpus) == 1 else "GPUs " + ",".join(map(str, self.gpus))
            return f"fits on {where}, {_gib(self.left_bytes)} left"
        if v is Verdict.NO_ROOM:
            return f"needs {_gib(self.need_bytes)}, free now {_gib(self.have_bytes)}"
        if v is Verdict.TOO_LARGE:
            text = f"needs {_gib(self.need_bytes)}, usable VRAM is {_gib(self.have_bytes)}"
            return text + (f" per GPU, {_gib(self.span_bytes)} in all" if self.span_bytes is not None else "")
        return _FIXED_REASONS.get(v, str(v.value))


_FIXED_REASONS = {
    Verdict.NOT_ALLOWED: "not in this model's nodes list",
    Verdict.NOT_INSTALLED: "not installed (ollama pull it there)",
    Verdict.NO_GPU: "CPU-only node",
    Verdict.SIZE_UNKNOWN: "size unknown",
    Verdict.BACKOFF: "a recent load here failed; backing off",
    Verdict.CLOUD: "a cloud model: it runs on Ollama's servers",
    Verdict.UNCLEAR: "its /api/ps entry there could not be believed; leaving it alone",
    Verdict.PULL: "not installed; would pull it here",
    Verdict.PULLING: "not installed yet; pulling it here now",
}


@record
class Decision:
    """Where a model should run and why."""

    placement: Placement
    node: str | None
    reason: str
    nodes: tuple[str, ...] = ()  # every node chosen (replicas); ``node`` is the first


class ActionKind(str, enum.Enum):
    """What the executor does."""

    LOAD = "load"
    UNLOAD = "unload"
    PIN = "pin"  # already fully on GPU, but a client left it with a finite keep_alive: pin it in place
    PULL = "pull"  # not installed where it would fit: POST /api/pull (run apart from the node's sequence)


@record
class Action:
    """One request the executor sends."""

    kind: ActionKind
    node: str
    model: str
    reason: str
    embedding: bool = False  # load through /api/embed
    for_model: str = ""  # the priority model an unload makes room for
    gpus: tuple[int, ...] = ()  # GPU indices a load was planned onto
    need_bytes: int = 0  # VRAM a load was planned to take
    on_cpu: bool = False  # a cpu_fallback load: CPU is where it is meant to go
    num_ctx: int | None = None  # sent as options.num_ctx (None: no options at all)


@record
class ModelPlan:
    """Everything decided about one model."""

    model: str
    priority: bool
    need: SizeEstimate  # on the decided node, else the smallest need of any node
    fits: tuple[Fit, ...]  # every node's verdict; empty in the daemon's plan (``plan(full=False)``)
    decision: Decision
    replicas_wanted: int = 0  # priority models only
    replicas_on_gpu: int = 0
    # The need on each node: one estimate per sizing profile, and each node's profile index.
    profile_needs: tuple[SizeEstimate, ...] = ()
    node_profiles: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def need_on(self, node: str) -> SizeEstimate:
        """What the model needs on ``node`` (the summary need for a node the pass did not size)."""
        pid = self.node_profiles.get(node)
        return self.profile_needs[pid] if pid is not None and pid < len(self.profile_needs) else self.need

    @property
    def satisfied(self) -> bool:
        """A priority model is "on GPU" when its replicas fully on GPU reach max(1, wanted)."""
        return self.priority and self.replicas_on_gpu >= max(1, self.replicas_wanted)


@record
class Plan:
    """The result of one planning pass."""

    nodes: tuple[NodeCapacity, ...]
    models: tuple[ModelPlan, ...]
    actions: tuple[Action, ...]

    def model(self, name: str) -> ModelPlan | None:
        """The plan for ``name``."""
        for m in self.models:
            if m.model == name:
                return m
        return None


def priority_on_gpu(plan: Plan) -> tuple[int, int]:
    """(priority models on GPU, priority models): the one count the report, STATUS and metrics show."""
    priority = [m for m in plan.models if m.priority]
    return sum(1 for m in priority if m.satisfied), len(priority)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / (1024 * MIB):.1f} GiB"


def is_pinned(model: LoadedModel, now: datetime | None) -> bool:
    """True when the model was loaded with a negative keep_alive (Ollama shows "Forever")."""
    if model.expires_at is None or now is None:
        return False
    return (model.expires_at - now).total_seconds() > PINNED_AFTER_S


def capacity(node: NodeState, config: Config) -> NodeCapacity:
    """Usable and free VRAM of one node's GPUs."""
    reading = node.gpu
    if reading.source is VramSource.NONE:
        return NodeCapacity(node.name, reading.source, True)
    if not node.up or not reading.gpus:
        return NodeCapacity(node.name, reading.source, False)
    # A source that gives totals only (static): attribute what /api/ps proves resident, filling
    # GPUs in index order, since ps does not say which GPU holds what.
    resident = sum(m.vram_bytes for m in node.loaded)
    margin, reserve = config.vram_safety_margin, config.vram_reserve_bytes
    gpus = []
    listed = reading.gpus
    if any(a.index > b.index for a, b in itertools.pairwise(listed)):
        listed = tuple(sorted(listed, key=lambda g: g.index))
    for g in listed:
        usable = max(0, int(g.total_bytes * margin) - reserve)
        if g.used_bytes is not None:
            used = g.used_bytes
        else:
            used = min(resident, g.total_bytes)
            resident -= used
        # The margin keeps (1 - margin) of total for what we cannot see; used counts against usable.
        free = max(0, usable - used) if g.healthy else 0  # a sick GPU gets no new placement
        gpus.append(GpuCapacity(g.index, g.name, g.total_bytes, usable, used, free, g.healthy))
    return NodeCapacity(node.name, reading.source, True, tuple(gpus))


def _index(free: list[int]) -> tuple[list[int], list[tuple[int]], int]:
    """A node's free room sorted (ties by GPU index), each as a placement, and the total."""
    if len(free) == 1:
        return free[:], [(0,)], free[0]
    pairs = sorted(zip(free, range(len(free)), strict=True))
    return [f for f, _ in pairs], [(i,) for _, i in pairs], sum(free)


class _Room:
    """Free VRAM per node during one pass; placements made earlier in the pass use it up.

    ``index`` keeps each node's free room sorted, so the best fit is a binary search; a placement
    re-sorts the one node it went to.
    """

    def __init__(self, caps: Iterable[NodeCapacity]) -> None:
        self.free = {c.node: [g.free_bytes for g in c.gpus] for c in caps if c.known}
        self.index = {node: _index(free) for node, free in self.free.items()}

    def place(
        self, node: str, need: int, span_need: int, extra_free: int = 0
    ) -> tuple[tuple[int, ...], int] | None:
        """GPUs that can take ``need`` (best fit) and the bytes left after it, or None.

        ``span_need`` is what the model needs split over all the node's GPUs, used only when no
        single GPU holds it. ``extra_free`` is room that planned unloads would give back; /api/ps
        does not say on which GPU, so it is only counted when the node has one GPU or the model
        spans all of them.
        """
        free = self.free.get(node)
        if not free:
            return None
        if len(free) == 1:
            left = free[0] + extra_free - need
            return ((0,), left) if left >= 0 else None
        best_i, best_left = -1, -1
        for i, f in enumerate(free):
            left = f - need
            if left >= 0 and (best_i < 0 or left < best_left):
                best_i, best_left = i, left
        if best_i >= 0:
            return (best_i,), best_left
        total = sum(free) + extra_free
        if total >= span_need:
            return tuple(range(len(free))), total - span_need
        return None

    def take(self, node: str, gpus: tuple[int, ...], need: int, span_need: int, returned: int = 0) -> None:
        """Use up room for a placement, after the ``returned`` bytes of planned unloads.

        Returned bytes are credited exactly where ``place`` counted them: on a one-GPU node, or
        to the pool of a span. A single-GPU placement on a multi-GPU node gets no credit, since
        /api/ps does not say which GPU the unloaded models were on.
        """
        free = self.free[node]
        if len(gpus) == 1:
            if len(free) == 1:
                free[0] += returned
            free[gpus[0]] = max(0, free[gpus[0]] - need)
        else:
            remaining = span_need - returned
            for i in gpus:
                used = min(free[i], max(0, remaining))
                free[i] -= used
                remaining -= used
        self.index[node] = _index(free)


def _victims(
    node: NodeState, protected: Collection[str], policy: str, now: datetime | None
) -> list[LoadedModel]:
    """Models that policy allows unloading on ``node``, the ones to go first first."""
    if policy == "never":
        return []
    out = [m for m in node.loaded if m.name not in protected and (policy == "any" or not is_pinned(m, now))]
    far = datetime.max.replace(tzinfo=timezone.utc)
    return sorted(out, key=lambda m: (m.expires_at or far, m.name))


def _context(config: Config, pm: PriorityModel | None) -> int:
    """The context a model is sized at: its configured num_ctx, else the cluster's Ollama setting."""
    if pm is not None and pm.num_ctx:
        return pm.num_ctx
    try:
        return int(str(config.ollama_env.get("OLLAMA_CONTEXT_LENGTH", 4096)))
    except ValueError:
        return 4096


def _replicas(pm: PriorityModel, gpu_nodes: int) -> int:
    return gpu_nodes if pm.replicas == "all" else int(pm.replicas)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic collector for one pass.

    A pass makes a few hundred thousand small tuples and no reference cycles; the collector
    would otherwise rescan them over and over (a third of the time on 1,000 nodes x 200 models).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def plan(
    state: ClusterState,
    config: Config,
    learned: Mapping[SizeKey, int] | None = None,
    backoff: Collection[tuple[str, str]] = (),
    needs: Mapping[str, int] | None = None,
    full: bool = True,
    sizer: Sizer | None = None,
    pulling: Collection[tuple[str, str]] = (),
) -> Plan:
    """Decide where every known model should run, and what to do for the priority ones.

    ``learned`` holds sizes observed earlier; ``backoff`` holds (model, node) pairs whose last load
    or pull failed recently and are not to be chosen now; ``needs`` fixes models' needs by name
    (tests, benchmarks and what-if questions), over every other source. ``full=False`` (the
    daemon's path) judges only the priority models, which are all it acts on, and keeps no
    verdict per node (``ModelPlan.fits`` is empty): its actions and decisions are the full plan's.
    The report wants every model and every verdict. ``sizer`` is one already built on this state
    (the daemon's, which also learns sizes from it). ``pulling`` holds the (model, node) pairs
    with a pull in flight.
    """
    with _gc_paused():
        return _plan(state, config, sizer or Sizer(state, config, learned, needs), backoff, full, pulling)


def _plan(
    state: ClusterState,
    config: Config,
    sizer: Sizer,
    backoff: Collection[tuple[str, str]],
    full: bool,
    pulling: Collection[tuple[str, str]] = (),
) -> Plan:
    caps = tuple(capacity(n, config) for n in state.nodes)
    cap_by_node = {c.node: c for c in caps}
    room = _Room(caps)
    # Nodes that share a sizing profile (version, GPUs, settings) share every model's need.
    node_pid = sizer.profile_ids
    n_all: list[int] = [1] * len(sizer.distinct_profiles)  # GPUs of a profile's first node, for the span
    seen_pid: set[int] = set()
    for c in caps:
        pid = node_pid[c.node]
        if pid not in seen_pid:
            seen_pid.add(pid)
            n_all[pid] = max(1, len(c.gpus))
    views = [_view(n, cap_by_node[n.name], node_pid[n.name]) for n in state.nodes]
    position = {v.name: i for i, v in enumerate(views)}
    # Plain tuples for the hot loop: unpacking a tuple subclass (a NamedTuple) takes the generic,
    # slow path, which cost a quarter of the judging on 10,000 nodes.
    views = cast(list[_View], [tuple(v) for v in views])
    index = None if full else _FitIndex(views, room)
    priority = {p.name: p for p in config.priority_models}
    models = list(priority)
    others: list[str] = []
    if full:
        known: set[str] = set()
        for n in state.nodes:
            if n.up:
                known.update(n.installed_by_name)
                known.update(n.loaded_by_name)
        others = sorted(known - set(priority))
    gpu_node_count = 0
    if any(p.replicas == "all" for p in priority.values()):
        gpu_node_count = sum(
            1 for n in state.nodes if n.up and cap_by_node[n.name].known and cap_by_node[n.name].gpus
        )
    ctx = _Pass(state, config, sizer, cap_by_node, node_pid, room, priority)
    actions: list[Action] = []
    pulls: list[Action] = []
    plans: list[ModelPlan] = []

    for name in [*models, *others]:
        pm = priority.get(name)
        num_ctx = pm.num_ctx if pm is not None else None
        ests = tuple(sizer.profile_need(name, p, num_ctx) for p in range(len(n_all)))
        per_pid = [(e.need_bytes, e.span_need(n_all[p])) for p, e in enumerate(ests)]
        if sizer.is_cloud(name):
            fits = [Fit(v[0], Verdict.CLOUD) for v in views] if full else []
            decision = Decision(
                Placement.NONE, None, "a cloud model: it runs on Ollama's servers, not on a node"
            )
            plans.append(
                ModelPlan(
                    name,
                    pm is not None,
                    ests[0] if ests else _NO_SIZE,
                    tuple(fits),
                    decision,
                    profile_needs=ests,
                    node_profiles=node_pid,
                )
            )
            continue
        wanted = _replicas(pm, gpu_node_count) if pm is not None else 0
        # The daemon's path keeps a few best fits past the replicas it wants, for the nodes where
        # Ollama's own limits refuse a load; past those the verdicts are judged in full.
        judge = partial(_judge, views, name, per_pid, pm, room, backoff, ctx.evicted)
        if index is None or wanted + 2 >= len(views):
            judged = judge()
        else:
            judged = index.judge(name, per_pid, pm, backoff, ctx.evicted, keep=wanted + 2)
        verdicts = _Verdicts(judged.fits, judge)
        if pm is None:
            decision = _decide_other(state, name, judged, verdicts)
            summary = _summary_need(ests, node_pid, decision.node)
            plans.append(
                ModelPlan(
                    name,
                    False,
                    summary,
                    tuple(verdicts.all()),
                    decision,
                    profile_needs=ests,
                    node_profiles=node_pid,
                )
            )
            continue
        resident = judged.resident
        chosen = list(resident)
        refused: list[str] = []  # nodes where Ollama itself would unload what policy forbids
        reasons = [f"already on GPU on {n}" for n in resident]
        info = state.model_info(name)
        embedding = info.embedding_only if info else False
        actions.extend(_repins(state, name, resident, embedding, pm, backoff))
        fitting = _Fitting(judged, verdicts)
        while len(chosen) < wanted:
            # New copies: fit now first, best fit; then room made by policy.
            pick = fitting.best(state, name, chosen + refused)
            if pick is None:
                pick = _make_room(ctx, name, per_pid, verdicts.all(), chosen + refused)
            if pick is None:
                break
            node_name, gpus, victims, returned = pick
            need_bytes, span = per_pid[node_pid[node_name]]
            assert need_bytes is not None
            assert span is not None
            more = ctx.ollama_unloads(name, ests[node_pid[node_name]], node_name, gpus, victims, returned)
            if isinstance(more, str):
                refused.append(node_name)
                verdicts.change(position[node_name], verdict=Verdict.NO_ROOM, note=more)
                continue
            node = state.node(node_name)
            assert node is not None
            for v in more:
                loaded = node.loaded_model(v)
                returned += loaded.vram_bytes if loaded is not None else 0
            victims = [*victims, *more]
            before = room.index.get(node_name)
            room.take(node_name, gpus, need_bytes, span, returned)
            if index is not None and before is not None:
                index.moved(position[node_name], before)
            for v in victims:
                ctx.evicted.setdefault(node_name, set()).add(v)
                actions.append(
                    Action(
                        ActionKind.UNLOAD,
                        node_name,
                        v,
                        f"make room for priority model {name}",
                        for_model=name,
                    )
                )
            ctx.loads[node_name] = ctx.loads.get(node_name, 0) + 1
            actions.append(
                Action(
                    ActionKind.LOAD,
                    node_name,
                    name,
                    _load_reason(state, node_name, name, ctx.on_gpu_somewhere),
                    embedding=embedding,
                    gpus=gpus,
                    need_bytes=need_bytes,
                    num_ctx=pm.num_ctx,
                )
            )
            chosen.append(node_name)
            reasons.append(
                f"load on {node_name}" + (f" after unloading {', '.join(victims)}" if victims else "")
            )
            if victims:
                verdicts.change(
                    position[node_name],
                    verdict=Verdict.FITS_AFTER_EVICTION,
                    evict=tuple(victims),
                    note=reasons[-1],
                )
        if chosen:
            note = "" if len(chosen) >= wanted else f"; only {len(chosen)} of {wanted} replicas fit on GPU"
            decision = Decision(Placement.GPU, chosen[0], "; ".join(reasons) + note, tuple(chosen))
        else:
            decision = _cpu_decision(state, name, verdicts, config, embedding, backoff, actions)
        # After the decision: its reason counts the verdicts as judged, before pulls mark them.
        pulled = _pulls(ctx, name, pm, wanted, chosen, verdicts, per_pid, backoff, pulling)
        if pulled.note:
            decision = replace(decision, reason=f"{decision.reason}; {pulled.note}")
        pulls.extend(pulled.actions)
        summary = _summary_need(ests, node_pid, decision.node)
        plans.append(
            ModelPlan(
                name,
                True,
                summary,
                tuple(verdicts.all()) if full else (),
                decision,
                wanted,
                len(resident),
                profile_needs=ests,
                node_profiles=node_pid,
            )
        )
    # Pulls last: they run apart from the nodes' unload/load sequences (see pull.py).
    return Plan(caps, tuple(plans), (*_order(actions), *pulls))


_NO_SIZE = SizeEstimate(None, SizeSource.UNKNOWN, "no node to size it on")


def _summary_need(
    ests: Sequence[SizeEstimate], node_pid: Mapping[str, int], node: str | None
) -> SizeEstimate:
    """The need on the decided node, else the smallest known need of any node."""
    if node is not None and node in node_pid:
        return ests[node_pid[node]]
    known = [e for e in ests if e.need_bytes is not None]
    if known:
        return min(known, key=lambda e: e.need_bytes or 0)
    return ests[0] if ests else _NO_SIZE


class _Pass:
    """What one planning pass knows and has decided so far, for the room-making steps."""

    def __init__(
        self,
        state: ClusterState,
        config: Config,
        sizer: Sizer,
        caps: Mapping[str, NodeCapacity],
        node_pid: Mapping[str, int],
        room: _Room,
        priority: Mapping[str, PriorityModel],
    ) -> None:
        self.state = state
        self.config = config
        self.sizer = sizer
        self.caps = caps
        self.node_pid = node_pid
        self.room = room
        self.priority = priority
        self.evicted: dict[str, set[str]] = {}  # node -> models planned for unload in this pass
        self.loads: dict[str, int] = {}  # node -> loads planned in this pass
        self._pull_room: dict[str, tuple[int, int, int]] | None = None
        self._on_gpu: frozenset[str] | None = None

    def pull_room(self) -> Mapping[str, tuple[int, int, int]]:
        """(max, sum, count) of usable VRAM over the healthy GPUs of each node a pull may go to.

        Only nodes with GPUs of known size and at least one healthy; made once per pass, on the
        first model that wants a pull.
        """
        if self._pull_room is None:
            room: dict[str, tuple[int, int, int]] = {}
            for name, cap in self.caps.items():
                usable = [g.usable_bytes for g in cap.gpus if g.healthy]
                if cap.vram_source is not VramSource.NONE and cap.known and usable:
                    room[name] = (max(usable), sum(usable), len(usable))
            self._pull_room = room
        return self._pull_room

    def on_gpu_somewhere(self, model: str) -> bool:
        """``model`` is fully on GPU on some node that is up (as observed, before this pass)."""
        if self._on_gpu is None:
            gpu = Processor.GPU
            self._on_gpu = frozenset(
                m.name for n in self.state.nodes if n.up for m in n.loaded if m.processor is gpu
            )
        return model in self._on_gpu

    def allowed_victims(self, node: NodeState, model: str, taken: Collection[str]) -> list[LoadedModel]:
        """What policy lets this pass unload on ``node`` for ``model``, first to go first."""
        protected = set(self.priority) | {model} | set(taken) | self.evicted.get(node.name, set())
        return _victims(node, protected, self.config.evict, self.state.observed_at)

    def ollama_unloads(
        self,
        model: str,
        est: SizeEstimate,
        node_name: str,
        gpus: tuple[int, ...],
        victims: Sequence[str],
        returned: int,
    ) -> list[str] | str:
        """What else must be unloaded first so that the node's Ollama does not unload on its own.

        Ollama keeps at most OLLAMA_MAX_LOADED_MODELS models (3 per GPU by default), and from
        v0.30 refuses a load whose predicted size is over 80% of the free VRAM while other models
        are loaded: in both cases it evicts models of its own choosing, pinned ones included. So
        the pass unloads what policy allows itself, or, when that is not enough, gives up on the
        node (returns why).
        """
        node = self.state.node(node_name)
        assert node is not None
        profile = self.sizer.profiles[node_name]
        gone = set(victims) | self.evicted.get(node_name, set())
        staying = [m for m in node.loaded if m.name not in gone and m.name != model]
        candidates = self.allowed_victims(node, model, victims)
        extra: list[str] = []
        limit = max_loaded_models(profile.env, len(profile.gpu_total_bytes))
        while len(staying) + self.loads.get(node_name, 0) + 1 > limit:
            if not candidates:
                return (
                    f"Ollama keeps at most {limit} models here (OLLAMA_MAX_LOADED_MODELS)"
                    " and would unload one that policy protects"
                )
            v = candidates.pop(0)
            extra.append(v.name)
            staying = [m for m in staying if m.name != v.name]
        if est.memory is None or est.memory.preload_bytes is None or not staying:
            return extra
        cap = self.caps[node_name]
        free = sum(cap.gpus[i].total_bytes - cap.gpus[i].used_bytes for i in gpus if i < len(cap.gpus))
        free += returned + sum(m.vram_bytes for m in node.loaded if m.name in extra)
        while not preload_check_passes(est.memory, free):
            left = [m for m in candidates if m.name not in extra]
            if not left:
                names = ", ".join(m.name for m in staying if m.name not in extra)
                return (
                    f"Ollama's pre-load check ({_gib(est.memory.preload_bytes)} against 80% of free VRAM)"
                    f" would unload {names} first, which policy protects"
                )
            extra.append(left[0].name)
            free += left[0].vram_bytes
            if not [m for m in staying if m.name not in extra]:
                break  # nothing else loaded: Ollama loads without the check
        return extra


class _View(NamedTuple):
    """Per-node facts that do not change while one pass plans every model.

    A NamedTuple so the hot loop can unpack it in its ``for`` header.
    """

    name: str
    up: bool
    pid: int  # index of the node's sizing profile: nodes that share one share every model's need
    max_usable: int
    sum_usable: int
    n_gpus: int
    loaded: Mapping[str, LoadedModel]
    installed: Collection[str]
    stale: bool  # degraded, but its last good picture still counts for what is resident there
    suspect: Collection[str]
    sick: Fit | None  # every GPU unhealthy: its residents do not count (they fail over), nothing goes there
    # Verdicts that do not depend on the model, made once per node.
    down: Fit
    not_allowed: Fit
    not_installed: Fit
    no_gpu: Fit | None  # set when the node cannot take any model on GPU (CPU-only, no GPU, unknown)


def _down_note(node: NodeState) -> str:
    return f"node {node.status.value}: {node.error or 'no answer'}"


# A node that is up never gives this verdict: one shared placeholder instead of one per node.
_DOWN_UP = Fit("", Verdict.NODE_DOWN)


def _view(node: NodeState, cap: NodeCapacity, pid: int) -> _View:
    usable = [g.usable_bytes for g in cap.gpus if g.healthy]
    n = node.name
    no_gpu: Fit | None = None
    if cap.vram_source is VramSource.NONE:
        no_gpu = Fit(n, Verdict.NO_GPU)
    elif not cap.known:
        no_gpu = Fit(
            n, Verdict.VRAM_UNKNOWN, note=f"GPU memory unknown: {node.gpu.error or 'no GPU figures'}"
        )
    elif not cap.gpus:
        no_gpu = Fit(n, Verdict.NO_GPU, note="no GPU found")
    sick: Fit | None = None
    if cap.gpus and not any(g.healthy for g in cap.gpus):
        why = "; ".join(sorted({g.health_reason for g in node.gpu.gpus if not g.healthy and g.health_reason}))
        sick = Fit(n, Verdict.GPU_UNHEALTHY, note=f"GPU unhealthy: {why or 'no reason given'}")
    up = node.up
    new = tuple.__new__
    # Positional, in _View's field order (name, up, pid, max_usable, sum_usable, n_gpus, loaded,
    # installed, stale, suspect, sick, down, not_allowed, not_installed, no_gpu): built per node.
    return new(
        _View,
        (
            n,
            up,
            pid,
            max(usable, default=0),
            sum(usable),
            len(usable),
            node.loaded_by_name,
            node.installed_by_name,
            node.stale,
            node.suspect,
            sick,
            _DOWN_UP if up else Fit(n, Verdict.NODE_DOWN, note=_down_note(node)),
            new(Fit, (n, Verdict.NOT_ALLOWED, (), (), None, None, None, None, "")),
            new(Fit, (n, Verdict.NOT_INSTALLED, (), (), None, None, None, None, "")),
            no_gpu,
        ),
    )


class _Judged(NamedTuple):
    fits: list[Fit] | None  # every node's verdict, in node order; None from _FitIndex
    resident: list[str]  # nodes holding it fully on GPU, in node order
    top: list[Fit]  # the best FITS verdicts, best first: the one best, or _FitIndex's few
    fitting: int | None  # how many nodes it fits on now (None: not counted, see _FitIndex)


def _judge(
    views: Iterable[_View],
    model: str,
    needs: Sequence[tuple[int | None, int | None]],
    pm: PriorityModel | None,
    room: _Room,
    backoff: Collection[tuple[str, str]],
    evicted: Mapping[str, set[str]],
) -> _Judged:
    """Every node's verdict on ``model``, in node order, with the residents and the best fit.

    One loop with the best fit inlined (a binary search in the room's index) and positional tuples:
    this runs nodes x models times per pass, so it is written for speed.
    """
    out: list[Fit] = []
    add = out.append
    resident: list[str] = []
    best: Fit | None = None
    best_left = sys.maxsize
    fitting = 0
    allowed = pm.nodes if pm is not None and pm.nodes else None
    index = room.index
    gpu, fits_v, no_room = Processor.GPU, Verdict.FITS, Verdict.NO_ROOM
    new = tuple.__new__  # skips NamedTuple's keyword-handling constructor: every field is given
    for (
        name,
        up,
        pid,
        max_usable,
        sum_usable,
        n_gpus,
        loaded_map,
        installed,
        stale,
        suspect,
        sick,
        down,
        not_allowed,
        not_installed,
        no_gpu,
    ) in views:
        if not up:
            held = loaded_map.get(model) if stale else None
            if held is not None and held.processor is gpu and (allowed is None or name in allowed):
                # Missed a poll or two, not down yet: what it held still counts, so one lost answer
                # does not fail a priority model over (and back). Nothing new goes there.
                add(
                    Fit(
                        name,
                        Verdict.RESIDENT,
                        (),
                        (),
                        None,
                        None,
                        held.vram_bytes,
                        None,
                        "as of its last answer",
                    )
                )
                resident.append(name)
            else:
                add(down)
            continue
        if allowed is not None and name not in allowed:
            add(not_allowed)
            continue
        if model in suspect:
            add(Fit(name, Verdict.UNCLEAR))
            continue
        if sick is not None:
            add(sick)
            continue
        loaded = loaded_map.get(model)
        if loaded is not None and loaded.processor is gpu and model not in evicted.get(name, ()):
            add(Fit(name, Verdict.RESIDENT, (), (), None, None, loaded.vram_bytes))
            resident.append(name)
            continue
        if loaded is None and model not in installed:
            add(not_installed)
            continue
        if no_gpu is not None:
            add(no_gpu)
            continue
        need, span_all = needs[pid]
        if need is None or span_all is None:
            add(Fit(name, Verdict.SIZE_UNKNOWN))
            continue
        if backoff and (model, name) in backoff:
            add(Fit(name, Verdict.BACKOFF))
            continue
        if max_usable < need and (n_gpus < 2 or sum_usable < span_all):
            span = sum_usable if n_gpus > 1 else None
            add(Fit(name, Verdict.TOO_LARGE, (), (), None, need, max_usable, span))
            continue
        # A copy of this model already there (partly on CPU) gives its VRAM back on reload.
        returned = loaded.vram_bytes if loaded is not None else 0
        if not returned:
            frees, singles, total = index[name]
            k = bisect_left(frees, need)  # the smallest free that holds it is the best fit
            if k < len(frees):
                left = frees[k] - need
                f = new(Fit, (name, fits_v, singles[k], (), left, need, None, None, ""))
            elif total >= span_all and len(frees) > 1:
                left = total - span_all
                f = new(Fit, (name, fits_v, tuple(range(len(frees))), (), left, need, None, None, ""))
            else:
                add(new(Fit, (name, no_room, (), (), None, need, total, None, "")))
                continue
        else:
            spot = room.place(name, need, span_all, returned)
            if spot is None:
                add(Fit(name, no_room, (), (), None, need, sum(room.free.get(name, ()))))
                continue
            left = spot[1]
            f = Fit(name, fits_v, spot[0], (), left, need)
        fitting += 1
        add(f)
        if left < best_left:  # the first node wins a tie
            best, best_left = f, left
    return _Judged(out, resident, [best] if best is not None else [], fitting)


class _FitIndex:
    """The daemon's best-fit search: every candidate GPU's free room, sorted, per sizing profile.

    Candidates are the nodes that are up with GPUs of known size, not all unhealthy. For a model,
    a binary search finds the GPUs with room for it, least room first; the first few nodes there
    that may take it are its best fits (the least room left, then the node listed first, as
    ``_judge`` ranks them). Nodes where the model is loaded are judged one by one by ``_judge``
    itself. So a priority model costs a search, not a pass over 10,000 nodes; its other verdicts
    are judged in full if a step needs them (``_Verdicts``).
    """

    def __init__(self, views: Sequence[_View], room: _Room) -> None:
        self._views = views
        self._room = room
        # model -> positions of the nodes whose /api/ps shows it, in node order
        self._loaded: dict[str, list[int]] = {}
        # pid -> sorted (free, position, slot) of each GPU; pid -> sorted (total, position) of each
        # node with two GPUs or more, for a model that no single GPU can hold.
        self._singles: dict[int, list[tuple[int, int, int]]] = {}
        self._spans: dict[int, list[tuple[int, int]]] = {}
        self._candidates: set[int] = set()
        for position, v in enumerate(views):
            for m in v[6]:
                self._loaded.setdefault(m, []).append(position)
            if v[1] and v[10] is None and v[14] is None:  # up, not sick, with known GPUs
                self._candidates.add(position)
                entries, span = self._entries(position)
                self._singles.setdefault(v[2], []).extend(entries)
                if span is not None:
                    self._spans.setdefault(v[2], []).append(span)
        for entries in self._singles.values():
            entries.sort()
        for spans in self._spans.values():
            spans.sort()

    def _entries(self, position: int) -> tuple[list[tuple[int, int, int]], tuple[int, int] | None]:
        frees, singles, total = self._room.index[self._views[position][0]]
        entries = [(f, position, slot[0]) for f, slot in zip(frees, singles, strict=True)]
        return entries, ((total, position) if len(frees) > 1 else None)

    def moved(self, position: int, before: tuple[list[int], list[tuple[int]], int]) -> None:
        """A placement changed this node's room (``before`` is its old index entry)."""
        if position not in self._candidates:
            return
        pid = self._views[position][2]
        frees, singles, total = before
        singles_list = self._singles[pid]
        for f, slot in zip(frees, singles, strict=True):
            at = bisect_left(singles_list, (f, position, slot[0]))
            del singles_list[at]
        spans_list = self._spans.get(pid)
        if spans_list is not None and len(frees) > 1:
            del spans_list[bisect_left(spans_list, (total, position))]
        entries, span = self._entries(position)
        for entry in entries:
            insort(singles_list, entry)
        if span is not None and spans_list is not None:
            insort(spans_list, span)

    def judge(
        self,
        model: str,
        needs: Sequence[tuple[int | None, int | None]],
        pm: PriorityModel | None,
        backoff: Collection[tuple[str, str]],
        evicted: Mapping[str, set[str]],
        keep: int,
    ) -> _Judged:
        """The residents and the ``keep`` best fits that ``_judge`` would find (not the count)."""
        views = self._views
        on = self._loaded.get(model, [])
        # The nodes where it is loaded (a few), judged as _judge judges every node.
        judged = _judge([views[i] for i in on], model, needs, pm, self._room, backoff, evicted)
        assert judged.fits is not None
        fits_v = Verdict.FITS
        found: list[tuple[int, int, Fit]] = [
            (f.left_bytes or 0, i, f) for i, f in zip(on, judged.fits, strict=True) if f.verdict is fits_v
        ]
        allowed = pm.nodes if pm is not None and pm.nodes else None
        new = tuple.__new__

        def takes(position: int) -> bool:
            # _judge's checks for a node that is up, healthy, with GPUs, and without it loaded.
            name, _, _, _, _, _, loaded_map, installed, _, suspect = views[position][:10]
            return (
                (allowed is None or name in allowed)
                and model not in suspect
                and model not in loaded_map
                and model in installed
                and not (backoff and (model, name) in backoff)
            )

        for pid, (need, span_all) in enumerate(needs):
            if need is None or span_all is None:
                continue
            taken: set[int] = set()
            singles = self._singles.get(pid, [])
            for free, position, slot in singles[bisect_left(singles, (need, -1, -1)) :]:
                if len(taken) >= keep:
                    break  # the rest leave more room
                if position in taken or not takes(position):
                    continue
                taken.add(position)
                left = free - need
                fit = new(Fit, (views[position][0], fits_v, (slot,), (), left, need, None, None, ""))
                found.append((left, position, fit))
            ranked = sorted(c[:2] for c in found)
            worst = ranked[keep - 1][0] if len(ranked) >= keep else sys.maxsize
            spans = self._spans.get(pid, [])
            count = 0
            for total, position in spans[bisect_left(spans, (span_all, -1)) :]:
                left = total - span_all
                if count >= keep or left > worst:
                    break
                v = views[position]
                frees = self._room.index[v[0]][0]
                if frees[-1] >= need:
                    continue  # a single GPU holds it there: found above
                # Never too large (_judge's check): free room is within usable VRAM, 0 on a sick GPU.
                if not takes(position):
                    continue
                count += 1
                gpus = tuple(range(len(frees)))
                found.append((left, position, new(Fit, (v[0], fits_v, gpus, (), left, need, None, None, ""))))
        found.sort(key=lambda c: (c[0], c[1]))
        return _Judged(None, judged.resident, [f for _, _, f in found[:keep]], None)


class _Verdicts:
    """One model's per-node verdicts, with the changes the pass makes to them.

    The daemon's path judges without them (see ``_FitIndex``); a step that needs them
    (making room, pulls, the reason nothing fits) has them judged then. Only this model's own
    placements have changed the room since, on nodes every later step excludes, so the verdicts
    it reads are the ones a full judgement would have given.
    """

    def __init__(self, fits: list[Fit] | None, judge: Callable[[], _Judged]) -> None:
        self._fits = fits
        self._judge = judge
        self._changes: list[tuple[int, dict[str, Any]]] = []

    def all(self) -> list[Fit]:
        """Every node's verdict, in node order."""
        if self._fits is None:
            fits = self._judge().fits
            assert fits is not None  # _judge gives every verdict
            for at, changes in self._changes:
                fits[at] = fits[at]._replace(**changes)
            self._fits = fits
        return self._fits

    def change(self, at: int, **changes: Any) -> None:
        """Change fields of the verdict at position ``at`` (now, or once they are judged)."""
        if self._fits is None:
            self._changes.append((at, changes))
        else:
            self._fits[at] = self._fits[at]._replace(**changes)


class _Fitting:
    """A model's FITS verdicts, best fit first, for placing its replicas one after another.

    The verdicts were judged against the current room, and a placement changes only the node it
    goes to, which is then excluded: their figures stay true across this model's replicas. The
    picks come from the judge's best fits while they last, then off a heap of every FITS verdict,
    built only when needed.
    """

    def __init__(self, judged: _Judged, verdicts: _Verdicts) -> None:
        self._judged = judged
        self._verdicts = verdicts
        self._heap: list[tuple[int, int]] | None = None

    def best(
        self, state: ClusterState, model: str, chosen: list[str]
    ) -> tuple[str, tuple[int, ...], list[str], int] | None:
        """The FITS verdict leaving the least room (first node on ties) among nodes not chosen."""
        pick = self._pick(chosen)
        if pick is None:
            return None
        node = state.node(pick.node)
        loaded = node.loaded_model(model) if node is not None else None
        # A copy on CPU or split with the CPU is unloaded first: loading again without a change of
        # options would just reuse that runner.
        victims = [model] if loaded is not None else []
        return pick.node, pick.gpus, victims, loaded.vram_bytes if loaded is not None else 0

    def _pick(self, chosen: list[str]) -> Fit | None:
        judged = self._judged
        if self._heap is None:
            for f in judged.top:
                if f.node not in chosen:
                    return f
            if judged.fitting is not None and judged.fitting <= len(judged.top):
                return None
            fits = self._verdicts.all()
            self._heap = [(f.left_bytes or 0, i) for i, f in enumerate(fits) if f.verdict is Verdict.FITS]
            heapq.heapify(self._heap)
        fits = self._verdicts.all()
        while self._heap:
            f = fits[self._heap[0][1]]
            if f.verdict is Verdict.FITS and f.node not in chosen:
                return f
            heapq.heappop(self._heap)
        return None


def _make_room(
    ctx: _Pass,
    model: str,
    per_pid: Sequence[tuple[int | None, int | None]],
    fits: list[Fit],
    exclude: list[str],
) -> tuple[str, tuple[int, ...], list[str], int] | None:
    """The node that needs the fewest bytes unloaded (as policy allows) to take ``model``."""
    if ctx.config.evict == "never":
        return None
    best: tuple[tuple[int, int, int], str, tuple[int, ...], list[str], int] | None = None
    for i, f in enumerate(fits):  # fits are in node order: i breaks ties like config order
        if f.verdict is not Verdict.NO_ROOM or f.node in exclude:
            continue
        need, span = per_pid[ctx.node_pid[f.node]]
        if need is None or span is None:
            continue
        node = ctx.state.node(f.node)
        assert node is not None
        own = node.loaded_model(model)
        returned = own.vram_bytes if own is not None else 0
        victims = [model] if own is not None else []
        for v in ctx.allowed_victims(node, model, ()):
            if ctx.room.place(f.node, need, span, returned) is not None:
                break
            victims.append(v.name)
            returned += v.vram_bytes
        spot = ctx.room.place(f.node, need, span, returned)
        if spot is None:
            continue
        key = (returned, len(victims), i)
        if best is None or key < best[0]:
            best = (key, f.node, spot[0], victims, returned)
    if best is None:
        return None
    return best[1], best[2], best[3], best[4]


class _Pulled(NamedTuple):
    actions: list[Action]
    note: str  # for the decision's reason; empty when no pull is planned or in flight


def _pulls(
    ctx: _Pass,
    model: str,
    pm: PriorityModel,
    wanted: int,
    chosen: Sequence[str],
    verdicts: _Verdicts,
    per_pid: Sequence[tuple[int | None, int | None]],
    backoff: Collection[tuple[str, str]],
    pulling: Collection[tuple[str, str]],
) -> _Pulled:
    """Pull a priority model still short of its replicas onto nodes that would fit it (``pull: true``).

    Candidates are the nodes judged ``not_installed`` (so up and allowed by ``nodes``) with healthy
    GPUs of known size, not backing off for this model, where it would be placed fully on GPU once
    it is there: in the room free now (after the placements this pass made for models listed
    before it), plus what ``evict`` lets the daemon unload for it. A pull takes minutes and the
    room will have moved by then, so the room is judged as ``fits`` or ``fits*`` would judge it,
    and not taken: a later cycle places the model against the room there is then. Best fit first
    (the least room left), up to the replicas missing; pulls in flight count towards them.

    A model installed on no node that is up has no size to judge by (no file size, no
    ``/api/show``). Leaving it would leave it stuck, which is what ``pull: true`` is there to
    prevent, so one pull at a time goes to the candidate with the most usable VRAM (the node
    likeliest to hold it); once it is there it is sized, and any further replicas go by the rule
    above. A cloud model is never pulled.
    """
    not_installed = Verdict.NOT_INSTALLED
    in_flight: list[str] = []
    if pulling and any(m == model for m, _ in pulling):
        for i, f in enumerate(verdicts.all()):
            if f.verdict is not_installed and (model, f.node) in pulling:
                in_flight.append(f.node)
                verdicts.change(i, verdict=Verdict.PULLING)
    note = f"pulling it to {', '.join(in_flight)}" if in_flight else ""
    short = wanted - len(chosen) - len(in_flight)
    if short <= 0 or not ctx.config.wants_pull(pm) or is_cloud_name(model):
        return _Pulled([], note)
    out = verdicts.all()
    gpu_room = ctx.pull_room()
    node_pid = ctx.node_pid
    place = ctx.room.place
    # Figures only; the verdicts of the few chosen are built after the sort.
    sized: list[tuple[int, int, tuple[int, ...], int, bool]] = []  # (left, index, gpus, need, evicting)
    unsized: list[tuple[int, int, int]] = []  # (-max usable, -sum usable, index)
    for i, f in enumerate(out):
        if f.verdict is not not_installed:
            continue
        name = f.node
        usable = gpu_room.get(name)
        if usable is None or (backoff and (model, name) in backoff):
            continue
        max_usable, sum_usable, n_healthy = usable
        need, span = per_pid[node_pid[name]]
        if need is None or span is None:
            unsized.append((-max_usable, -sum_usable, i))
            continue
        if max_usable < need and (n_healthy < 2 or sum_usable < span):
            continue  # too large for this node whatever is unloaded
        spot = place(name, need, span)
        evicting = spot is None
        if evicting:
            node = ctx.state.node(name)
            assert node is not None
            spot = place(name, need, span, sum(v.vram_bytes for v in ctx.allowed_victims(node, model, ())))
        if spot is not None:
            sized.append((spot[1], i, spot[0], need, evicting))
    placed = len(chosen)
    why_pull = (
        "priority model not on GPU anywhere"
        if not placed and not in_flight
        else f"{placed} of {wanted} replicas placed"
    )
    actions: list[Action] = []
    if sized:
        for left, i, gpus, need, evicting in sorted(sized)[:short]:
            where = f"GPU {gpus[0]}" if len(gpus) == 1 else "GPUs " + ",".join(map(str, gpus))
            after = f" once what evict: {ctx.config.evict} allows is unloaded" if evicting else ""
            verdicts.change(
                i,
                verdict=Verdict.PULL,
                gpus=gpus,
                left_bytes=left,
                need_bytes=need,
                note=f"not installed; would pull it here: it needs {_gib(need)}"
                f" and would fit on {where}{after}",
            )
            actions.append(
                Action(
                    ActionKind.PULL,
                    out[i].node,
                    model,
                    f"{why_pull}: not installed where it would fit",
                    need_bytes=need,
                )
            )
    elif unsized and not any(m == model for m, _ in pulling):
        max_usable, _, i = min(unsized)
        verdicts.change(
            i,
            verdict=Verdict.PULL,
            note=f"not installed; would pull it here: size unknown until it is on a node, and this node "
            f"has the most usable VRAM ({_gib(-max_usable)} per GPU)",
        )
        actions.append(
            Action(
                ActionKind.PULL,
                out[i].node,
                model,
                f"{why_pull}: installed on no node that is up; the node with the most usable VRAM",
            )
        )
    if actions:
        targets = ", ".join(a.node for a in actions)
        note = f"{note}; would pull it to {targets}" if note else f"would pull it to {targets}"
    return _Pulled(actions, note)


def _repins(
    state: ClusterState,
    model: str,
    resident: list[str],
    embedding: bool,
    pm: PriorityModel,
    backoff: Collection[tuple[str, str]],
) -> Iterator[Action]:
    """Pin in place the copies a client reloaded with a finite keep_alive: they would expire.

    The load goes out with the context the copy runs at (options.num_ctx = its context_length),
    so Ollama keeps the runner instead of reloading it at another context. A pair in backoff is
    left alone: a failed pin starts a reconcile at once, which would pin again, and fail again.
    """
    for node_name in resident:
        if (model, node_name) in backoff:
            continue
        node = state.node(node_name)
        m = node.loaded_model(model) if node is not None and node.up else None
        if m is None or is_pinned(m, state.observed_at) or m.expires_at is None:
            continue
        yield Action(
            ActionKind.PIN,
            node_name,
            model,
            "pin in place: a client reloaded it with a finite keep_alive",
            embedding=embedding,
            num_ctx=m.context_length or pm.num_ctx,
        )


def _load_reason(
    state: ClusterState, node_name: str, model: str, on_gpu_somewhere: Callable[[str], bool]
) -> str:
    node = state.node(node_name)
    loaded = node.loaded_model(model) if node else None
    if loaded is None:
        return "add a replica" if on_gpu_somewhere(model) else "priority model not on GPU anywhere"
    return f"reload fully on GPU (now {loaded.processor_label})"


def _decide_other(state: ClusterState, model: str, judged: _Judged, verdicts: _Verdicts) -> Decision:
    if judged.resident:
        first = judged.resident[0]
        return Decision(Placement.GPU, first, f"already on GPU on {first}", tuple(judged.resident))
    if judged.top:
        f = judged.top[0]
        return Decision(Placement.GPU, f.node, f"best fit: {f.reason}", (f.node,))
    return _cpu_or_none(state, model, verdicts)


def _cpu_or_none(state: ClusterState, model: str, verdicts: _Verdicts) -> Decision:
    # Only ``size_vram == size`` is on GPU: a partial offload runs at CPU speed, so it is CPU here.
    for n in state.nodes:
        loaded = n.loaded_model(model) if n.up else None
        if loaded is not None:
            split = "partially offloaded, " if loaded.processor is Processor.PARTIAL else ""
            return Decision(
                Placement.CPU,
                n.name,
                f"loaded on {n.name} as {loaded.processor_label}"
                f" ({split}no node can hold it fully on GPU now)",
                (n.name,),
            )
    return Decision(Placement.NONE, None, f"no node can hold it on GPU: {_summary(verdicts.all())}")


def _summary(fits: list[Fit]) -> str:
    counts: dict[Verdict, int] = {}
    for f in fits:
        counts[f.verdict] = counts.get(f.verdict, 0) + 1
    words = (v.value.replace("_", " ").replace("gpu", "GPU").replace("vram", "VRAM") for v in counts)
    return ", ".join(f"{w} on {c}" for w, c in zip(words, counts.values(), strict=True)) or "no nodes"


def _cpu_decision(
    state: ClusterState,
    model: str,
    verdicts: _Verdicts,
    config: Config,
    embedding: bool,
    backoff: Collection[tuple[str, str]],
    actions: list[Action],
) -> Decision:
    current = _cpu_or_none(state, model, verdicts)
    if current.placement is not Placement.NONE or not config.cpu_fallback:
        return current
    reason = "cpu_fallback: no GPU room anywhere"
    fits = verdicts.all()
    for f in fits:
        node = state.node(f.node)
        if f.verdict is not Verdict.NO_GPU or node is None or node.installed_model(model) is None:
            continue
        if (model, f.node) in backoff:
            continue
        actions.append(Action(ActionKind.LOAD, f.node, model, reason, embedding, on_cpu=True))
        return Decision(Placement.CPU, f.node, f"{reason} ({_summary(fits)})", (f.node,))
    return current


def _order(actions: list[Action]) -> list[Action]:
    """Per node, unloads before loads; nodes in the order their first action was planned."""
    first: dict[str, int] = {}
    for i, a in enumerate(actions):
        first.setdefault(a.node, i)
    ranked = sorted(
        range(len(actions)), key=lambda i: (first[actions[i].node], actions[i].kind is ActionKind.LOAD, i)
    )
    return [actions[i] for i in ranked]
