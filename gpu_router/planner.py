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
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from gpu_router.config import Config, PriorityModel
from gpu_router.sizing import SizeEstimate, model_need, span_need
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


@dataclass(frozen=True)
class Fit:
    """One node's verdict on one model."""

    node: str
    verdict: Verdict
    reason: str
    gpus: tuple[int, ...] = ()
    evict: tuple[str, ...] = ()
    left_bytes: int | None = None  # free VRAM the placement would leave

    @property
    def fits(self) -> bool:
        """True when the model is, or can now be, fully on this node's GPU."""
        return self.verdict in (Verdict.RESIDENT, Verdict.FITS, Verdict.FITS_AFTER_EVICTION)


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
        self.usable = {c.node: [g.usable_bytes for g in c.gpus] for c in caps if c.known}

    def place(self, node: str, need: int, extra_free: int = 0) -> tuple[tuple[int, ...], int] | None:
        """GPUs that can take ``need`` (best fit) and the bytes left after it, or None.

        ``extra_free`` is room that planned unloads would give back; /api/ps does not say on
        which GPU, so it is only counted when the node has one GPU or the model spans all of them.
        """
        free = self.free.get(node, [])
        if not free:
            return None
        single = [
            (f + (extra_free if len(free) == 1 else 0) - need, i)
            for i, f in enumerate(free)
            if f + (extra_free if len(free) == 1 else 0) >= need
        ]
        if single:
            left, i = min(single)
            return (i,), left
        if len(free) > 1:
            total = sum(free) + extra_free
            need_all = span_need(need, len(free))
            if total >= need_all:
                return tuple(range(len(free))), total - need_all
        return None

    def could_ever_fit(self, node: str, need: int) -> bool:
        """True when ``need`` fits in the node's usable VRAM with nothing else loaded."""
        usable = self.usable.get(node, [])
        if not usable:
            return False
        return max(usable) >= need or (len(usable) > 1 and sum(usable) >= span_need(need, len(usable)))

    def take(self, node: str, gpus: tuple[int, ...], need: int, returned: int = 0) -> None:
        """Use up room for a placement (after giving back ``returned`` bytes of unloads)."""
        free = self.free[node]
        if returned:
            free[gpus[0]] += returned
        if len(gpus) == 1:
            free[gpus[0]] = max(0, free[gpus[0]] - need)
            return
        remaining = span_need(need, len(gpus))
        for i in gpus:
            used = min(free[i], remaining)
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
    caps = tuple(capacity(n, config) for n in state.nodes)
    cap_by_node = {c.node: c for c in caps}
    room = _Room(caps)
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

    for name in [*models, *others]:
        pm = priority.get(name)
        need = model_need(state, name, config.num_ctx, learned)
        fits = [
            _verdict(node, name, need, pm, cap_by_node[node.name], room, backoff, evicted)
            for node in state.nodes
        ]
        if pm is None:
            decision = _decide_other(state, name, fits)
            plans.append(ModelPlan(name, False, need, tuple(fits), decision))
            continue
        wanted = _replicas(pm, len(gpu_nodes))
        resident = [f.node for f in fits if f.verdict is Verdict.RESIDENT]
        chosen = list(resident)
        reasons = [f"already on GPU on {n}" for n in resident]
        info = next((n.info[name] for n in state.nodes if name in n.info), None)
        embedding = info.embedding_only if info else False
        if need.need_bytes is not None:
            # New copies: fit now first, best fit; then room made by policy.
            while len(chosen) < wanted:
                pick = _best_fit(state, name, need.need_bytes, fits, chosen, room)
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
                    replace(f, verdict=Verdict.FITS_AFTER_EVICTION, evict=tuple(victims), reason=reasons[-1])
                    if f.node == node_name and victims
                    else f
                    for f in fits
                ]
        if chosen:
            note = "" if len(chosen) >= wanted else f"; only {len(chosen)} of {wanted} replicas fit on GPU"
            decision = Decision(Placement.GPU, chosen[0], "; ".join(reasons) + note, tuple(chosen))
        else:
            decision = _cpu_decision(state, name, fits, pm, config, need, embedding, actions)
        plans.append(ModelPlan(name, True, need, tuple(fits), decision, wanted, len(resident)))
    return Plan(caps, tuple(plans), tuple(_order(actions)))


def _verdict(
    node: NodeState,
    model: str,
    need: SizeEstimate,
    pm: PriorityModel | None,
    cap: NodeCapacity,
    room: _Room,
    backoff: Collection[tuple[str, str]],
    evicted: Mapping[str, set[str]],
) -> Fit:
    name = node.name
    if not node.up:
        return Fit(name, Verdict.NODE_DOWN, f"node {node.status.value}: {node.error or 'no answer'}")
    if pm is not None and pm.nodes and name not in pm.nodes:
        return Fit(name, Verdict.NOT_ALLOWED, "not in this model's nodes list")
    loaded = node.loaded_model(model)
    if loaded is not None and loaded.processor is Processor.GPU and model not in evicted.get(name, ()):
        return Fit(name, Verdict.RESIDENT, f"already fully on GPU ({_gib(loaded.vram_bytes)})")
    if node.installed_model(model) is None and loaded is None:
        return Fit(name, Verdict.NOT_INSTALLED, "not installed (ollama pull it there)")
    if cap.vram_source is VramSource.NONE:
        return Fit(name, Verdict.NO_GPU, "CPU-only node")
    if not cap.known:
        why = node.gpu.error or "no GPU figures"
        return Fit(name, Verdict.VRAM_UNKNOWN, f"GPU memory unknown: {why}")
    if not cap.gpus:
        return Fit(name, Verdict.NO_GPU, "no GPU found")
    if need.need_bytes is None:
        return Fit(name, Verdict.SIZE_UNKNOWN, "size unknown")
    if (model, name) in backoff:
        return Fit(name, Verdict.BACKOFF, "a recent load here failed; backing off")
    n = need.need_bytes
    if not room.could_ever_fit(name, n):
        return Fit(
            name,
            Verdict.TOO_LARGE,
            f"needs {_gib(n)}, usable VRAM is {_gib(max(g.usable_bytes for g in cap.gpus))}"
            + (f" per GPU, {_gib(cap.usable_bytes)} in all" if len(cap.gpus) > 1 else ""),
        )
    # A partial copy of this model gives its VRAM back when it is reloaded.
    returned = loaded.vram_bytes if loaded is not None else 0
    spot = room.place(name, n, returned)
    if spot is None:
        free = sum(room.free.get(name, []))
        return Fit(name, Verdict.NO_ROOM, f"needs {_gib(n)}, free now {_gib(free)}")
    gpus, left = spot
    where = f"GPU {gpus[0]}" if len(gpus) == 1 else "GPUs " + ",".join(str(g) for g in gpus)
    return Fit(name, Verdict.FITS, f"fits on {where}, {_gib(left)} left", gpus, left_bytes=left)


def _best_fit(
    state: ClusterState,
    model: str,
    need: int,
    fits: list[Fit],
    chosen: list[str],
    room: _Room,
) -> tuple[str, tuple[int, ...], list[str], int] | None:
    best: tuple[tuple[int, int], str, tuple[int, ...], list[str], int] | None = None
    order = {n.name: i for i, n in enumerate(state.nodes)}
    for f in fits:
        if f.verdict is not Verdict.FITS or f.node in chosen:
            continue
        node = state.node(f.node)
        assert node is not None
        loaded = node.loaded_model(model)
        returned = loaded.vram_bytes if loaded is not None else 0
        spot = room.place(f.node, need, returned)
        if spot is None:
            continue
        # A copy on CPU or split with the CPU is unloaded first: loading again without a change
        # of options would just reuse that runner.
        victims = [model] if loaded is not None else []
        key = (spot[1], order[f.node])
        if best is None or key < best[0]:
            best = (key, f.node, spot[0], victims, returned)
    if best is None:
        return None
    return best[1], best[2], best[3], best[4]


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
    order = {n.name: i for i, n in enumerate(state.nodes)}
    for f in fits:
        if f.verdict is not Verdict.NO_ROOM or f.node in chosen:
            continue
        node = state.node(f.node)
        assert node is not None
        own = node.loaded_model(model)
        returned = own.vram_bytes if own is not None else 0
        victims = [model] if own is not None else []
        already = evicted.get(f.node, set())
        for v in _victims(node, set(priority) | already | {model}, config.evict, state.observed_at):
            if room.place(f.node, need, returned) is not None:
                break
            victims.append(v.name)
            returned += v.vram_bytes
        spot = room.place(f.node, need, returned)
        if spot is None:
            continue
        key = (returned, len(victims), order[f.node])
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


def _decide_other(state: ClusterState, model: str, fits: list[Fit]) -> Decision:
    resident = [f.node for f in fits if f.verdict is Verdict.RESIDENT]
    if resident:
        return Decision(Placement.GPU, resident[0], f"already on GPU on {resident[0]}", tuple(resident))
    candidates = [(f.left_bytes or 0, i, f) for i, f in enumerate(fits) if f.verdict is Verdict.FITS]
    if candidates:
        f = min(candidates, key=lambda c: (c[0], c[1]))[2]
        return Decision(Placement.GPU, f.node, f"best fit: {f.reason}", (f.node,))
    return _cpu_or_none(state, model, fits)


def _cpu_or_none(state: ClusterState, model: str, fits: list[Fit]) -> Decision:
    for n in state.nodes:
        loaded = n.loaded_model(model) if n.up else None
        if loaded is not None:
            return Decision(
                Placement.CPU if loaded.processor is Processor.CPU else Placement.GPU,
                n.name,
                f"loaded on {n.name} as {loaded.processor_label}; no node can hold it fully on GPU now",
                (n.name,),
            )
    why = _summary(fits)
    return Decision(Placement.NONE, None, f"no node can hold it on GPU: {why}")


def _summary(fits: list[Fit]) -> str:
    counts: dict[Verdict, int] = {}
    for f in fits:
        counts[f.verdict] = counts.get(f.verdict, 0) + 1
    return ", ".join(f"{v.value.replace('_', ' ')} on {c}" for v, c in counts.items()) or "no nodes"


def _cpu_decision(
    state: ClusterState,
    model: str,
    fits: list[Fit],
    pm: PriorityModel,
    config: Config,
    need: SizeEstimate,
    embedding: bool,
    actions: list[Action],
) -> Decision:
    current = _cpu_or_none(state, model, fits)
    if current.placement is not Placement.NONE or not config.cpu_fallback:
        return current
    for f in fits:
        node = state.node(f.node)
        if f.verdict is Verdict.NO_GPU and node is not None and node.installed_model(model) is not None:
            actions.append(
                Action(ActionKind.LOAD, f.node, model, "cpu_fallback: no GPU room anywhere", embedding)
            )
            return Decision(
                Placement.CPU, f.node, f"cpu_fallback: no GPU room anywhere ({_summary(fits)})", (f.node,)
            )
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
