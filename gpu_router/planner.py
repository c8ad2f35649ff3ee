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
from bisect import bisect_left
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple

from gpu_router.config import Config, PriorityModel
from gpu_router.sizing import SizeEstimate, SizeIndex, span_need
from gpu_router.state import MIB, ClusterState, LoadedModel, NodeState, Processor, VramSource

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
    BACKOFF = "backoff"  # a recent load here failed; the daemon waits before trying again


@dataclass(frozen=True)
class GpuCapacity:
    """One GPU's memory as the planner sees it."""

    index: int
    name: str
    total_bytes: int
    usable_bytes: int
    used_bytes: int
    free_bytes: int  # usable - used, never negative


@dataclass(frozen=True)
class NodeCapacity:
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
}


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class ModelPlan:
    """Everything decided about one model."""

    model: str
    priority: bool
    need: SizeEstimate
    fits: tuple[Fit, ...]
    decision: Decision
    replicas_wanted: int = 0  # priority models only
    replicas_on_gpu: int = 0

    @property
    def satisfied(self) -> bool:
        """A priority model is "on GPU" when its replicas fully on GPU reach max(1, wanted)."""
        return self.priority and self.replicas_on_gpu >= max(1, self.replicas_wanted)


@dataclass(frozen=True)
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
        return NodeCapacity(node.name, reading.source, known=True)
    if not node.up or not reading.gpus:
        return NodeCapacity(node.name, reading.source, known=False)
    # A source that gives totals only (static): attribute what /api/ps proves resident, filling
    # GPUs in index order, since ps does not say which GPU holds what.
    resident = sum(m.vram_bytes for m in node.loaded)
    gpus = []
    for g in sorted(reading.gpus, key=lambda g: g.index):
        usable = max(0, int(g.total_bytes * config.vram_safety_margin) - config.vram_reserve_bytes)
        if g.used_bytes is not None:
            used = g.used_bytes
        else:
            used = min(resident, g.total_bytes)
            resident -= used
        # The margin keeps (1 - margin) of total for what we cannot see; used counts against usable.
        free = max(0, usable - used)
        gpus.append(GpuCapacity(g.index, g.name, g.total_bytes, usable, used, free))
    return NodeCapacity(node.name, reading.source, known=True, gpus=tuple(gpus))


class _Room:
    """Free VRAM per node during one pass; placements made earlier in the pass use it up."""

    def __init__(self, caps: Iterable[NodeCapacity]) -> None:
        self.free = {c.node: [g.free_bytes for g in c.gpus] for c in caps if c.known}
        self.frozen: dict[str, tuple[list[int], list[tuple[int]], int]] | None = None

    def freeze(self) -> None:
        """No more placements: index the free room so best fit is a binary search."""
        frozen = {}
        for node, free in self.free.items():
            order = sorted(range(len(free)), key=lambda i: (free[i], i))
            frozen[node] = ([free[i] for i in order], [(i,) for i in order], sum(free))
        self.frozen = frozen

    def place(self, node: str, need: int, extra_free: int = 0) -> tuple[tuple[int, ...], int] | None:
        """GPUs that can take ``need`` (best fit) and the bytes left after it, or None.

        ``extra_free`` is room that planned unloads would give back; /api/ps does not say on
        which GPU, so it is only counted when the node has one GPU or the model spans all of them.
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
        need_all = span_need(need, len(free))
        if total >= need_all:
            return tuple(range(len(free))), total - need_all
        return None

    def take(self, node: str, gpus: tuple[int, ...], need: int, returned: int = 0) -> None:
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
            return
        remaining = span_need(need, len(gpus)) - returned
        for i in gpus:
            used = min(free[i], max(0, remaining))
            free[i] -= used
            remaining -= used


def _victims(
    node: NodeState, protected: Collection[str], policy: str, now: datetime | None
) -> list[LoadedModel]:
    """Models that policy allows unloading on ``node``, the ones to go first first."""
    if policy == "never":
        return []
    out = [m for m in node.loaded if m.name not in protected and (policy == "any" or not is_pinned(m, now))]
    far = datetime.max.replace(tzinfo=timezone.utc)
    return sorted(out, key=lambda m: (m.expires_at or far, m.name))


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
    learned: Mapping[str, int] | None = None,
    backoff: Collection[tuple[str, str]] = (),
) -> Plan:
    """Decide where every known model should run, and what to do for the priority ones.

    ``learned`` maps model -> size observed earlier; ``backoff`` holds (model, node) pairs whose
    last load failed recently and are not to be chosen now.
    """
    with _gc_paused():
        return _plan(state, config, learned, backoff)


def _plan(
    state: ClusterState,
    config: Config,
    learned: Mapping[str, int] | None,
    backoff: Collection[tuple[str, str]],
) -> Plan:
    caps = tuple(capacity(n, config) for n in state.nodes)
    cap_by_node = {c.node: c for c in caps}
    room = _Room(caps)
    views = [_view(n, cap_by_node[n.name]) for n in state.nodes]
    sizes = SizeIndex(state)
    priority = {p.name: p for p in config.priority_models}
    models = list(priority)
    known: set[str] = set()
    for n in state.nodes:
        if n.up:
            known.update(n.model_digests())
    others = sorted(known - set(priority))
    gpu_nodes = [n for n in state.nodes if n.up and cap_by_node[n.name].known and cap_by_node[n.name].gpus]
    actions: list[Action] = []
    plans: list[ModelPlan] = []
    evicted: dict[str, set[str]] = {}  # node -> models planned for unload in this pass

    for i, name in enumerate([*models, *others]):
        if i == len(models):
            room.freeze()  # non-priority models are judged, never placed: the room stops changing
        pm = priority.get(name)
        need = sizes.need(name, config.num_ctx, learned)
        judged = _judge(views, name, need.need_bytes, pm, room, backoff, evicted)
        fits = judged.fits
        if pm is None:
            decision = _decide_other(state, name, judged)
            plans.append(ModelPlan(name, False, need, tuple(fits), decision))
            continue
        wanted = _replicas(pm, len(gpu_nodes))
        resident = judged.resident
        chosen = list(resident)
        reasons = [f"already on GPU on {n}" for n in resident]
        info = state.model_info(name)
        embedding = info.embedding_only if info else False
        if need.need_bytes is not None:
            # New copies: fit now first, best fit; then room made by policy.
            while len(chosen) < wanted:
                pick = _best_fit(state, name, fits, chosen)
                if pick is None:
                    pick = _make_room(
                        state, name, need.need_bytes, fits, chosen, room, priority, config, evicted
                    )
                if pick is None:
                    break
                node_name, gpus, victims, returned = pick
                room.take(node_name, gpus, need.need_bytes, returned)
                for v in victims:
                    evicted.setdefault(node_name, set()).add(v)
                    actions.append(
                        Action(
                            ActionKind.UNLOAD,
                            node_name,
                            v,
                            f"make room for priority model {name}",
                            for_model=name,
                        )
                    )
                load_reason = _load_reason(state, node_name, name)
                actions.append(
                    Action(
                        ActionKind.LOAD,
                        node_name,
                        name,
                        load_reason,
                        embedding=embedding,
                        gpus=gpus,
                        need_bytes=need.need_bytes,
                    )
                )
                chosen.append(node_name)
                reasons.append(
                    f"load on {node_name}" + (f" after unloading {', '.join(victims)}" if victims else "")
                )
                fits = [
                    f._replace(verdict=Verdict.FITS_AFTER_EVICTION, evict=tuple(victims), note=reasons[-1])
                    if f.node == node_name and victims
                    else f
                    for f in fits
                ]
        if chosen:
            note = "" if len(chosen) >= wanted else f"; only {len(chosen)} of {wanted} replicas fit on GPU"
            decision = Decision(Placement.GPU, chosen[0], "; ".join(reasons) + note, tuple(chosen))
        else:
            decision = _cpu_decision(state, name, fits, config, embedding, backoff, actions)
        plans.append(ModelPlan(name, True, need, tuple(fits), decision, wanted, len(resident)))
    return Plan(caps, tuple(plans), tuple(_order(actions)))


class _View(NamedTuple):
    """Per-node facts that do not change while one pass plans every model.

    A NamedTuple so the hot loop can unpack it in its ``for`` header.
    """

    name: str
    up: bool
    max_usable: int
    sum_usable: int
    n_gpus: int
    loaded: Mapping[str, LoadedModel]
    installed: Collection[str]
    # Verdicts that do not depend on the model, made once per node.
    down: Fit
    not_allowed: Fit
    not_installed: Fit
    no_gpu: Fit | None  # set when the node cannot take any model on GPU (CPU-only, no GPU, unknown)


def _view(node: NodeState, cap: NodeCapacity) -> _View:
    usable = [g.usable_bytes for g in cap.gpus]
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
    return _View(
        name=n,
        up=node.up,
        max_usable=max(usable, default=0),
        sum_usable=sum(usable),
        n_gpus=len(usable),
        loaded={m.name: m for m in node.loaded},
        installed={m.name for m in node.installed},
        down=Fit(n, Verdict.NODE_DOWN, note=f"node {node.status.value}: {node.error or 'no answer'}"),
        not_allowed=Fit(n, Verdict.NOT_ALLOWED),
        not_installed=Fit(n, Verdict.NOT_INSTALLED),
        no_gpu=no_gpu,
    )


class _Judged(NamedTuple):
    fits: list[Fit]
    resident: list[str]  # nodes holding it fully on GPU, in node order
    best: Fit | None  # the FITS verdict leaving the least room (first node on ties)


def _judge(
    views: Iterable[_View],
    model: str,
    need: int | None,
    pm: PriorityModel | None,
    room: _Room,
    backoff: Collection[tuple[str, str]],
    evicted: Mapping[str, set[str]],
) -> _Judged:
    """Every node's verdict on ``model``, in node order, with the residents and the best fit.

    One loop with the frozen-room best fit inlined and positional NamedTuples: this runs
    nodes x models times per pass, so it is written for speed.
    """
    out: list[Fit] = []
    add = out.append
    resident: list[str] = []
    best: Fit | None = None
    allowed = pm.nodes if pm is not None and pm.nodes else None
    frozen = room.frozen
    gpu, fits_v, no_room = Processor.GPU, Verdict.FITS, Verdict.NO_ROOM
    new = tuple.__new__  # skips NamedTuple's keyword-handling constructor: every field is given
    for (
        name,
        up,
        max_usable,
        sum_usable,
        n_gpus,
        loaded_map,
        installed,
        down,
        not_allowed,
        not_installed,
        no_gpu,
    ) in views:
        if not up:
            add(down)
            continue
        if allowed is not None and name not in allowed:
            add(not_allowed)
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
        if need is None:
            add(Fit(name, Verdict.SIZE_UNKNOWN))
            continue
        if backoff and (model, name) in backoff:
            add(Fit(name, Verdict.BACKOFF))
            continue
        if max_usable < need and (n_gpus < 2 or sum_usable < span_need(need, n_gpus)):
            span = sum_usable if n_gpus > 1 else None
            add(Fit(name, Verdict.TOO_LARGE, (), (), None, need, max_usable, span))
            continue
        # A copy of this model already there (partly on CPU) gives its VRAM back on reload.
        returned = loaded.vram_bytes if loaded is not None else 0
        if frozen is not None and not returned:
            frees, singles, total = frozen[name]
            k = bisect_left(frees, need)  # the smallest free that holds it is the best fit
            if k < len(frees):
                f = new(Fit, (name, fits_v, singles[k], (), frees[k] - need, need, None, None, ""))
            elif len(frees) > 1 and total >= span_need(need, len(frees)):
                left = total - span_need(need, len(frees))
                f = new(Fit, (name, fits_v, tuple(range(len(frees))), (), left, need, None, None, ""))
            else:
                add(new(Fit, (name, no_room, (), (), None, need, total, None, "")))
                continue
        else:
            spot = room.place(name, need, returned)
            if spot is None:
                add(Fit(name, no_room, (), (), None, need, sum(room.free.get(name, ()))))
                continue
            f = Fit(name, fits_v, spot[0], (), spot[1], need)
        add(f)
        if best is None or (f.left_bytes or 0) < (best.left_bytes or 0):
            best = f
    return _Judged(out, resident, best)


def _best_fit(
    state: ClusterState, model: str, fits: list[Fit], chosen: list[str]
) -> tuple[str, tuple[int, ...], list[str], int] | None:
    """The FITS verdict leaving the least room, among nodes not chosen yet for this model.

    The verdicts were judged against the current room, and a placement changes only the node it
    goes to, which is then excluded: their figures stay true across this model's replicas.
    """
    best: Fit | None = None
    for f in fits:
        if (
            f.verdict is Verdict.FITS
            and f.node not in chosen
            and (best is None or (f.left_bytes or 0) < (best.left_bytes or 0))
        ):
            best = f
    if best is None:
        return None
    node = state.node(best.node)
    loaded = node.loaded_model(model) if node is not None else None
    # A copy on CPU or split with the CPU is unloaded first: loading again without a change of
    # options would just reuse that runner.
    victims = [model] if loaded is not None else []
    return best.node, best.gpus, victims, loaded.vram_bytes if loaded is not None else 0


def _make_room(
    state: ClusterState,
    model: str,
    need: int,
    fits: list[Fit],
    chosen: list[str],
    room: _Room,
    priority: Mapping[str, PriorityModel],
    config: Config,
    evicted: dict[str, set[str]],
) -> tuple[str, tuple[int, ...], list[str], int] | None:
    if config.evict == "never":
        return None
    best: tuple[tuple[int, int, int], str, tuple[int, ...], list[str], int] | None = None
    protected = set(priority) | {model}
    for i, f in enumerate(fits):  # fits are in node order: i breaks ties like config order
        if f.verdict is not Verdict.NO_ROOM or f.node in chosen:
            continue
        node = state.node(f.node)
        assert node is not None
        own = node.loaded_model(model)
        returned = own.vram_bytes if own is not None else 0
        victims = [model] if own is not None else []
        for v in _victims(node, protected | evicted.get(f.node, set()), config.evict, state.observed_at):
            if room.place(f.node, need, returned) is not None:
                break
            victims.append(v.name)
            returned += v.vram_bytes
        spot = room.place(f.node, need, returned)
        if spot is None:
            continue
        key = (returned, len(victims), i)
        if best is None or key < best[0]:
            best = (key, f.node, spot[0], victims, returned)
    if best is None:
        return None
    return best[1], best[2], best[3], best[4]


def _load_reason(state: ClusterState, node_name: str, model: str) -> str:
    node = state.node(node_name)
    loaded = node.loaded_model(model) if node else None
    if loaded is None:
        return "priority model not on GPU anywhere" if not _anywhere_on_gpu(state, model) else "add a replica"
    return f"reload fully on GPU (now {loaded.processor_label})"


def _anywhere_on_gpu(state: ClusterState, model: str) -> bool:
    return any(
        (m := n.loaded_model(model)) is not None and m.processor is Processor.GPU for n in state.nodes if n.up
    )


def _decide_other(state: ClusterState, model: str, judged: _Judged) -> Decision:
    if judged.resident:
        first = judged.resident[0]
        return Decision(Placement.GPU, first, f"already on GPU on {first}", tuple(judged.resident))
    if judged.best is not None:
        f = judged.best
        return Decision(Placement.GPU, f.node, f"best fit: {f.reason}", (f.node,))
    return _cpu_or_none(state, model, judged.fits)


def _cpu_or_none(state: ClusterState, model: str, fits: list[Fit]) -> Decision:
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
    return Decision(Placement.NONE, None, f"no node can hold it on GPU: {_summary(fits)}")


def _summary(fits: list[Fit]) -> str:
    counts: dict[Verdict, int] = {}
    for f in fits:
        counts[f.verdict] = counts.get(f.verdict, 0) + 1
    words = (v.value.replace("_", " ").replace("gpu", "GPU").replace("vram", "VRAM") for v in counts)
    return ", ".join(f"{w} on {c}" for w, c in zip(words, counts.values(), strict=True)) or "no nodes"


def _cpu_decision(
    state: ClusterState,
    model: str,
    fits: list[Fit],
    config: Config,
    embedding: bool,
    backoff: Collection[tuple[str, str]],
    actions: list[Action],
) -> Decision:
    current = _cpu_or_none(state, model, fits)
    if current.placement is not Placement.NONE or not config.cpu_fallback:
        return current
    reason = "cpu_fallback: no GPU room anywhere"
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
