"""How much VRAM a model needs on one node, from the best source there is. Pure.

A need belongs to a (model, node) pair: the node's Ollama version, its GPUs and its ``OLLAMA_*``
settings decide the context, the parallel slots, the KV cache type and the engine that sizes the
model (see :mod:`gpu_router.memory`). Sources, best first:

1. **given**: fixed by the caller (tests, benchmarks, what-if questions);
2. **observed**: ``/api/ps`` shows the model fully on GPU somewhere right now *with the same key*
   (digest, context, parallel slots, KV type, engine era), turned into that era's fit need;
3. **learned**: such a size seen earlier, kept in the state directory under the same key;
4. **estimated**: the engine's estimate from ``/api/show`` metadata and the file size;
5. **file**: the file size with a stated overhead, when there is no metadata;
6. **unknown**: nothing is placed on a guess. A cloud model is never sized (``cloud``).

A size is only ever reused for exactly its key: one seen at 128k context on a 48 GB node says
nothing about the same model at 4k on a 24 GB node.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from gpu_router.config import Config, NodeConfig
from gpu_router.memory import (
    MemoryEstimate,
    NodeProfile,
    OllamaEnv,
    estimate_memory,
    need_from_observed,
    parse_ollama_env,
)
from gpu_router.memory.version import Era
from gpu_router.records import record
from gpu_router.state import (
    MIB,
    ClusterState,
    InstalledModel,
    InstalledModels,
    LoadedModel,
    ModelInfo,
    NodeState,
    Processor,
    VramSource,
)
from gpu_router.store import SizeKey

# Ollama reserves this much per GPU before placing any layer (ml/device.go MinimumMemory, CUDA/ROCm).
GPU_MINIMUM_BYTES = 457 * MIB
# Without metadata, weights are the file; KV cache, graph and buffers are taken as 20% more.
FILE_OVERHEAD_RATIO = 1.2


class SizeSource(str, enum.Enum):
    """How a size figure was obtained, most trustworthy first."""

    GIVEN = "given"
    OBSERVED = "observed"
    LEARNED = "learned"
    ESTIMATED = "estimated"
    FILE = "file"
    CLOUD = "cloud"
    UNKNOWN = "unknown"


@record
class SizeEstimate:
    """VRAM a model needs on one node, where that figure came from, and the estimate behind it."""

    need_bytes: int | None
    source: SizeSource
    detail: str = ""
    context_length: int | None = None
    era: str | None = None
    memory: MemoryEstimate | None = None  # the engine's breakdown, for explain and the pre-load check
    key: SizeKey | None = None  # what an observed size must match to be this model here

    def span_need(self, gpu_count: int) -> int | None:
        """The need when split over ``gpu_count`` GPUs: each extra GPU pays the era's per-GPU cost."""
        if self.need_bytes is None:
            return None
        if gpu_count <= 1:
            return self.need_bytes
        if self.memory is not None:
            return self.need_bytes + self.memory.span_need_bytes(gpu_count) - self.memory.need_bytes
        return self.need_bytes + (gpu_count - 1) * GPU_MINIMUM_BYTES

    @property
    def preload_bytes(self) -> int | None:
        """llama-server era: what Ollama's own pre-load check weighs against 80% of free VRAM."""
        return self.memory.preload_bytes if self.memory is not None else None


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB"


def file_estimate(file_size_bytes: int | None) -> SizeEstimate:
    """The fallback without metadata: the file plus a stated overhead, else unknown."""
    if file_size_bytes:
        need = int(file_size_bytes * FILE_OVERHEAD_RATIO) + GPU_MINIMUM_BYTES
        detail = f"file {_mib(file_size_bytes)} x {FILE_OVERHEAD_RATIO} + minimum {_mib(GPU_MINIMUM_BYTES)}"
        return SizeEstimate(need, SizeSource.FILE, detail)
    return SizeEstimate(None, SizeSource.UNKNOWN, "no size on any node")


def describe(m: MemoryEstimate) -> str:
    """One line: the parts of an estimate, the context and the era."""
    parts = [f"weights {_mib(m.weights_bytes)}", f"KV {_mib(m.kv_bytes)}", f"graph {_mib(m.graph_bytes)}"]
    if m.projector_bytes:
        parts.append(f"projector {_mib(m.projector_bytes)}")
    parts.append(f"reserve {_mib(m.reserve_bytes)}")
    if m.buffer_bytes:
        parts.append(f"buffer {_mib(m.buffer_bytes)}")
    slots = f" x {m.num_parallel}" if m.num_parallel > 1 else ""
    return f"{' + '.join(parts)} at ctx {m.context_length}{slots}, {m.era.value} (Ollama {m.version or '?'})"


def node_env(config: Config, node: NodeConfig | None) -> OllamaEnv:
    """A node's parsed OLLAMA_* settings (top level, overridden key by key by the node's own).

    The config was validated when loaded, so a value that does not parse here cannot happen; the
    defaults are the safe answer if it somehow does.
    """
    merged = config.node_env(node) if node is not None else config.ollama_env
    try:
        return parse_ollama_env(merged)
    except ValueError:
        return OllamaEnv()


def _library(source: VramSource, detail: str) -> str:
    return "rocm" if source is VramSource.AMD or detail.startswith(("amd", "omnistat")) else "cuda"


def node_profile(node: NodeState, env: OllamaEnv) -> NodeProfile:
    """What decides a model's memory on ``node``: its version, its GPUs, its settings."""
    totals = tuple(g.total_bytes for g in node.gpu.gpus if g.total_bytes > 0)
    return NodeProfile(node.version, totals, env, _library(node.gpu.source, node.gpu.detail))


def size_key(digest: str, m: MemoryEstimate, context_length: int | None = None) -> SizeKey:
    """The key a size of this model under this estimate's settings is filed under."""
    ctx = context_length or m.ps_context_length or m.context_length
    return SizeKey(digest, ctx, m.num_parallel, m.kv_cache_type, m.era.value)


class Sizer:
    """Needs per (model, node) for one observation, each from the best source; cached per profile.

    Many nodes share a profile (same version, GPUs and settings), so the engine runs once per
    (model, profile, num_ctx), not once per node. What the sizing of one model needs from the whole
    cluster (its file size, digest, the sizes /api/ps shows for it) is gathered when that model is
    first sized: the daemon sizes only its priority models, and a pass over 10,000 nodes x 200
    installed models must not look at every installed model of every node to do that.
    """

    def __init__(
        self,
        state: ClusterState,
        config: Config,
        learned: Mapping[SizeKey, int] | None = None,
        needs: Mapping[str, int] | None = None,
    ) -> None:
        self._state = state
        self._needs = needs or {}
        self._learned = learned or {}
        self._up = [n for n in state.nodes if n.up]
        configs = {n.name: n for n in config.nodes}
        top = node_env(config, None)
        envs: dict[tuple[tuple[str, object], ...], OllamaEnv] = {}
        # Equal profiles are one object, numbered in node order: the planner groups nodes by number.
        interned: dict[tuple[object, ...], int] = {}
        self.distinct_profiles: list[NodeProfile] = []
        self.profile_ids: dict[str, int] = {}
        self.profiles: dict[str, NodeProfile] = {}
        for n in state.nodes:
            cfg = configs.get(n.name)
            env = top
            if cfg is not None and cfg.ollama_env:
                key = tuple(sorted(cfg.ollama_env.items()))
                env = envs.get(key) or envs.setdefault(key, node_env(config, cfg))
            reading = n.gpu
            totals = tuple(g.total_bytes for g in reading.gpus if g.total_bytes > 0)
            library = _library(reading.source, reading.detail)
            ident = (n.version, totals, id(env), library)
            pid = interned.get(ident)
            if pid is None:
                pid = interned[ident] = len(self.distinct_profiles)
                self.distinct_profiles.append(NodeProfile(n.version, totals, env, library))
            self.profile_ids[n.name] = pid
            self.profiles[n.name] = self.distinct_profiles[pid]
        self._sizes: dict[str, int | None] = {}
        self._cloud: frozenset[str] | None = None
        self._digests: dict[str, str] = {}
        self._maps: list[tuple[Mapping[str, InstalledModel], Mapping[str, LoadedModel]]] | None = None
        self._estimates: dict[tuple[str, NodeProfile, int | None], MemoryEstimate | None] = {}
        self._needs_cache: dict[tuple[str, int, int | None], SizeEstimate] = {}
        self._observed: dict[str, dict[SizeKey, tuple[int, str]]] = {}

    def _cloud_names(self) -> frozenset[str]:
        """Every model some node that is up lists as a cloud model."""
        if self._cloud is None:
            names: set[str] = set()
            for n in self._up:
                listed = n.installed
                if isinstance(listed, InstalledModels):
                    names.update(listed.remote_names)  # cached with the tags between polls
                else:
                    names.update(m.name for m in listed if m.remote)
            self._cloud = frozenset(names)
        return self._cloud

    def _indexes(self) -> list[tuple[Mapping[str, InstalledModel], Mapping[str, LoadedModel]]]:
        if self._maps is None:
            self._maps = [(n.installed_by_name, n.loaded_by_name) for n in self._up]
        return self._maps

    def file_size(self, model: str) -> int | None:
        """The model's size on disk (the largest any node that is up reports), None if none has it."""
        if model not in self._sizes:
            sizes = [
                i.size_bytes for installed, _ in self._indexes() if (i := installed.get(model)) is not None
            ]
            self._sizes[model] = max(sizes, default=0) or None
        return self._sizes[model]

    def digest(self, model: str) -> str:
        """The model's digest, from the first node (in config order) that lists it; "" if none."""
        found = self._digests.get(model)
        if found is None:
            found = ""
            for installed, loaded in self._indexes():
                # The node's tags first, else what it has loaded.
                on_disk, running = installed.get(model), loaded.get(model)
                found = (on_disk.digest if on_disk is not None else "") or (
                    running.digest if running is not None else ""
                )
                if found:
                    break
            self._digests[model] = found
        return found

    def info(self, model: str) -> ModelInfo | None:
        """The model's ``/api/show`` metadata, from the first node that reported it."""
        return self._state.model_info(model)

    def is_cloud(self, model: str) -> bool:
        """A cloud model (``remote_model``/``remote_host``): it runs elsewhere, never placed here."""
        info = self.info(model)
        return model in self._cloud_names() or (info is not None and info.remote)

    def estimate(self, model: str, profile: NodeProfile, num_ctx: int | None = None) -> MemoryEstimate | None:
        """The engine's estimate for ``model`` under ``profile`` (cached)."""
        key = (model, profile, num_ctx)
        if key not in self._estimates:
            info = self.info(model)
            file_bytes = self.file_size(model)
            est = None
            if info is not None and file_bytes and not self.is_cloud(model):
                est = estimate_memory(info, file_bytes, profile, num_ctx=num_ctx)
            self._estimates[key] = est
        return self._estimates[key]

    def need(self, model: str, node: str, num_ctx: int | None = None) -> SizeEstimate:
        """What ``model`` needs on ``node`` (at ``num_ctx`` when gpu-router asks for one)."""
        return self.profile_need(model, self.profile_ids[node], num_ctx)

    def profile_need(self, model: str, pid: int, num_ctx: int | None = None) -> SizeEstimate:
        """What ``model`` needs on the nodes of profile number ``pid`` (see ``profile_ids``)."""
        key = (model, pid, num_ctx)
        found = self._needs_cache.get(key)
        if found is None:
            found = self._needs_cache[key] = self._need(model, self.distinct_profiles[pid], num_ctx)
        return found

    def _need(self, model: str, profile: NodeProfile, num_ctx: int | None) -> SizeEstimate:
        given = self._needs.get(model)
        if given is not None:
            return SizeEstimate(given, SizeSource.GIVEN, "given by the caller")
        if self.is_cloud(model):
            return SizeEstimate(None, SizeSource.CLOUD, "a cloud model: it runs on Ollama's servers")
        est = self.estimate(model, profile, num_ctx)
        if est is None:
            return file_estimate(self.file_size(model))
        ctx = est.ps_context_length or est.context_length
        era = est.era.value
        digest = self.digest(model)
        key = size_key(digest, est) if digest else None
        if key is not None:
            seen = self._observed_sizes(model).get(key)
            if seen is not None:
                need = need_from_observed(seen[0], est)
                detail = f"/api/ps on {seen[1]} ({_mib(seen[0])}) + what {era} keeps beside it"
                return SizeEstimate(need, SizeSource.OBSERVED, detail, ctx, era, est, key)
            learned = self._learned.get(key)
            if learned is not None:
                need = need_from_observed(learned, est)
                detail = f"learned from an earlier /api/ps ({_mib(learned)}) + what {era} keeps beside it"
                return SizeEstimate(need, SizeSource.LEARNED, detail, ctx, era, est, key)
        return SizeEstimate(est.need_bytes, SizeSource.ESTIMATED, describe(est), ctx, era, est, key)

    def _observed_sizes(self, model: str) -> dict[SizeKey, tuple[int, str]]:
        """Sizes /api/ps shows now for ``model`` fully on GPU, by key (the largest, and where)."""
        found = self._observed.get(model)
        if found is None:
            found = self._observed[model] = {}
            for n in self._up:
                m = n.loaded_model(model)
                if m is None or m.processor is not Processor.GPU or model in n.suspect:
                    continue
                key = self.key_for(n.name, m)
                if key is not None and m.size_bytes > found.get(key, (0, ""))[0]:
                    found[key] = (m.size_bytes, n.name)
        return found

    def key_for(self, node: str, m: LoadedModel) -> SizeKey | None:
        """The key a loaded model's /api/ps size is filed under on ``node``, None if it cannot be told.

        The context is the one /api/ps shows (a client may have loaded it at another than gpu-router
        would); the slots, KV type and era are the node's.
        """
        found = self._keyed(node, m)
        return found[0] if found is not None else None

    def _keyed(self, node: str, m: LoadedModel) -> tuple[SizeKey, MemoryEstimate] | None:
        digest = m.digest or self.digest(m.name)
        est = self.estimate(m.name, self.profiles[node]) if node in self.profiles else None
        if not digest or est is None:
            return None
        return size_key(digest, est, m.context_length), est

    def learnable(self, node: NodeState, m: LoadedModel) -> SizeKey | None:
        """The key to learn ``m``'s size under, when its /api/ps size can be learned at all.

        Fully on GPU always; partly on CPU only where /api/ps ``size`` is the whole allocation. The
        classic estimate (every model before v0.11.11, llama-engine models to v0.12.10) sizes a
        partial load with the partial graph and without the full offload's buffers, so not there.
        """
        if m.name in node.suspect or m.processor is Processor.CPU:
            return None
        found = self._keyed(node.name, m)
        if found is None:
            return None
        key, est = found
        classic = est.era is Era.CLASSIC or (est.era is Era.MIXED and est.engine == "llama")
        if m.processor is not Processor.GPU and classic:
            return None
        return key
