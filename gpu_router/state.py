"""Frozen records of what was observed in the cluster.

Every size is in bytes and every duration in seconds; the field names say so. ``None`` always
means *unknown*, never zero: a GPU whose free memory could not be read is not a full GPU.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from types import MappingProxyType

MIB = 1024 * 1024
GIB = 1024 * MIB


class NodeStatus(str, enum.Enum):
    """What a node is, judged over its recent polls (see ``observe.NodeHealth``)."""

    UP = "up"
    # Answers, but badly (5xx, bodies it cannot read), or missed fewer polls in a row than down_after.
    DEGRADED = "degraded"
    DOWN = "down"  # no answer (refused, DNS, timeout) for down_after polls in a row
    ERROR = "degraded"  # an alias: what one failed call says about a node that answered badly


class VramSource(str, enum.Enum):
    """Where a node's GPU memory figures came from."""

    NVML = "nvml"
    AMD = "amd"  # this machine's AMD GPUs, read from the amdgpu driver's sysfs files
    EXPORTER = "exporter"
    STATIC = "static"
    NONE = "none"  # configured CPU-only
    UNKNOWN = "unknown"  # no source configured, or the source failed


class Processor(str, enum.Enum):
    """Where a loaded model sits, as ``ollama ps`` would say."""

    GPU = "gpu"
    CPU = "cpu"
    PARTIAL = "partial"


@dataclass(frozen=True)
class Gpu:
    """One GPU as its source saw it.

    ``used_bytes``/``free_bytes`` are None when the source gives only a total. ``utilization_ratio``
    (0..1) and ``temperature_c`` are None when unknown, never 0 for "not supported". An unhealthy GPU
    (``healthy=False``, the reason in ``health_reason``) keeps what is known of it, so the report can
    show it: its memory figures are the last ones read, or a 0 total when it was never read, and must
    not be planned on. An ``integrated`` GPU shares system memory, which its figures include.
    """

    index: int
    name: str
    total_bytes: int
    used_bytes: int | None = None
    free_bytes: int | None = None
    uuid: str = ""
    pci_bus_id: str = ""
    utilization_ratio: float | None = None
    temperature_c: float | None = None
    healthy: bool = True
    health_reason: str = ""
    integrated: bool = False

    @property
    def key(self) -> str:
        """A stable identity across reads: the UUID, else the index (what per-GPU state is keyed by)."""
        return self.uuid or f"index:{self.index}"


@dataclass(frozen=True)
class GpuReading:
    """The result of asking one GPU source about one node.

    ``detail`` names what answered when the source kind alone does not say (which exporter matched a
    scrape, e.g. ``dcgm-exporter``); empty otherwise.
    """

    source: VramSource
    gpus: tuple[Gpu, ...] = ()
    error: str | None = None  # why the source could not answer, for the report
    detail: str = ""

    @property
    def total_bytes(self) -> int:
        """Sum of the GPUs' total memory."""
        return sum(g.total_bytes for g in self.gpus)


@dataclass(frozen=True)
class LoadedModel:
    """One entry of ``/api/ps``."""

    name: str
    size_bytes: int
    vram_bytes: int
    digest: str = ""
    expires_at: datetime | None = None
    context_length: int | None = None

    @property
    def processor(self) -> Processor:
        """GPU only when every byte is in VRAM; ``size_vram == size`` is the rule."""
        if self.vram_bytes <= 0:
            return Processor.CPU
        if self.vram_bytes >= self.size_bytes:
            return Processor.GPU
        return Processor.PARTIAL

    @property
    def processor_label(self) -> str:
        """The PROCESSOR column exactly as ``ollama ps`` computes it."""
        if self.vram_bytes == 0:
            return "100% CPU"
        if self.vram_bytes == self.size_bytes:
            return "100% GPU"
        if self.vram_bytes > self.size_bytes or self.size_bytes == 0:
            return "Unknown"
        # Go's math.Round rounds halves away from zero; Python's round() would round them to even.
        cpu = int((self.size_bytes - self.vram_bytes) / self.size_bytes * 100 + 0.5)
        return f"{cpu}%/{100 - cpu}% CPU/GPU"


@dataclass(frozen=True)
class InstalledModel:
    """One entry of ``/api/tags``: a model on the node's disk."""

    name: str
    size_bytes: int  # bytes of the blobs on disk (weights, mostly)
    digest: str = ""
    family: str = ""
    parameter_size: str = ""
    quantization_level: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """What ``/api/show`` says about a model, reduced to what sizing and loading need."""

    name: str
    architecture: str = ""
    capabilities: tuple[str, ...] = ()
    block_count: int | None = None
    embedding_length: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None  # the largest per-layer value when the GGUF gives an array
    key_length: int | None = None
    value_length: int | None = None
    context_length: int | None = None  # trained context
    vocab_size: int | None = None
    num_ctx: int | None = None  # the model's own PARAMETER num_ctx, if set

    @property
    def embedding_only(self) -> bool:
        """True for models that must be loaded through ``/api/embed``."""
        return "embedding" in self.capabilities and "completion" not in self.capabilities


def _empty_info() -> Mapping[str, ModelInfo]:
    return MappingProxyType({})


@dataclass(frozen=True)
class NodeState:
    """Everything observed about one Ollama node in one poll."""

    name: str
    url: str
    status: NodeStatus
    error: str | None = None
    version: str | None = None
    gpu: GpuReading = GpuReading(VramSource.UNKNOWN)
    loaded: tuple[LoadedModel, ...] = ()
    installed: tuple[InstalledModel, ...] = ()
    info: Mapping[str, ModelInfo] = field(default_factory=_empty_info)
    poll_s: float = 0.0
    state_since: datetime | None = None  # when the node entered ``status``
    # True when loaded/installed/info are the last good poll's, kept through a short failure
    # (fewer than down_after failed polls) so that one lost answer does not look like lost models.
    stale: bool = False
    warnings: tuple[str, ...] = ()  # what was wrong in its answers (rejected or merged /api/ps entries)
    suspect: frozenset[str] = frozenset()  # models whose /api/ps entry could not be believed

    @property
    def up(self) -> bool:
        """The node answered with a valid ``/api/ps``."""
        return self.status is NodeStatus.UP

    # cached_property writes the instance __dict__ directly, so it works on a frozen dataclass;
    # the planner looks models up per node thousands of times in a large cluster.
    @cached_property
    def _loaded_by_name(self) -> dict[str, LoadedModel]:
        return {m.name: m for m in self.loaded}

    @cached_property
    def _installed_by_name(self) -> dict[str, InstalledModel]:
        return {m.name: m for m in self.installed}

    def model_digests(self) -> dict[str, str]:
        """Every model on the node, installed or loaded, with its digest."""
        out = {m.name: m.digest for m in self.installed}
        for m in self.loaded:
            out.setdefault(m.name, m.digest)
        return out

    def loaded_model(self, name: str) -> LoadedModel | None:
        """The ``/api/ps`` entry for ``name``, if loaded."""
        return self._loaded_by_name.get(name)

    def installed_model(self, name: str) -> InstalledModel | None:
        """The ``/api/tags`` entry for ``name``, if on disk."""
        return self._installed_by_name.get(name)


@dataclass(frozen=True)
class ClusterState:
    """One observation of the whole cluster."""

    nodes: tuple[NodeState, ...]
    observed_at: datetime | None = None

    @cached_property
    def _by_name(self) -> dict[str, NodeState]:
        return {n.name: n for n in self.nodes}

    def node(self, name: str) -> NodeState | None:
        """The node called ``name``."""
        return self._by_name.get(name)

    @cached_property
    def _info_by_name(self) -> dict[str, ModelInfo]:
        out: dict[str, ModelInfo] = {}
        for n in self.nodes:
            for name, info in n.info.items():
                out.setdefault(name, info)
        return out

    def model_info(self, name: str) -> ModelInfo | None:
        """A model's ``/api/show`` metadata, from the first node that reported it."""
        return self._info_by_name.get(name)
