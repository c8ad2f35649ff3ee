"""Frozen records of what was observed in the cluster.

Every size is in bytes and every duration in seconds; the field names say so. ``None`` always
means *unknown*, never zero: a GPU whose free memory could not be read is not a full GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any, Generic, TypeVar, overload

from gpu_router.enums import NodeStatus, Processor, VramSource
from gpu_router.records import field, record

__all__ = [
    "GIB",
    "MIB",
    "ClusterState",
    "Gpu",
    "GpuReading",
    "InstalledModel",
    "InstalledModels",
    "LoadedModel",
    "ModelInfo",
    "NodeState",
    "NodeStatus",
    "Processor",
    "ProjectorInfo",
    "SsmInfo",
    "TensorSummary",
    "VisionInfo",
    "VramSource",
]

MIB = 1024 * 1024
GIB = 1024 * MIB

T = TypeVar("T")


class _memo(Generic[T]):
    """``functools.cached_property`` without its lock.

    Python 3.11's cached_property takes a lock on every first access: at 10,000 nodes that was a
    visible part of a planning pass. The value goes into the instance ``__dict__`` (a frozen
    dataclass has one), so later reads never reach this descriptor; two threads racing on the first
    read both compute it, which is harmless for these pure indexes.
    """

    def __init__(self, fn: Any) -> None:
        self._fn = fn
        self._name: str = fn.__name__
        self.__doc__ = fn.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _memo[T]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T: ...

    def __get__(self, obj: object, owner: type | None = None) -> T | _memo[T]:
        if obj is None:
            return self
        value: T = self._fn(obj)
        obj.__dict__[self._name] = value
        return value


@record
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


@record
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


@record
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


@record
class InstalledModel:
    """One entry of ``/api/tags``: a model on the node's disk."""

    name: str
    size_bytes: int  # bytes of the blobs on disk (weights, mostly)
    digest: str = ""
    family: str = ""
    parameter_size: str = ""
    quantization_level: str = ""
    remote: bool = False  # a cloud model (remote_model / remote_host): runs elsewhere, never sized


class InstalledModels(tuple[InstalledModel, ...]):
    """A node's ``/api/tags`` entries, indexed by name on first use.

    The observer keeps one between polls (tags are asked again only now and then), so a large
    cluster's planner does not index 200 entries of 10,000 nodes again on every reconcile.
    """

    @_memo
    def by_name(self) -> dict[str, InstalledModel]:
        """The entries by model name (the last one wins if a name repeats). Do not change it."""
        return {m.name: m for m in self}

    @_memo
    def remote_names(self) -> frozenset[str]:
        """Names of the cloud models among them (usually none)."""
        return frozenset(m.name for m in self if m.remote)


@record
class TensorSummary:
    """A model's ``/api/show`` ``tensors`` reduced to byte sizes per layer group.

    Groups are Ollama's ``GroupLayers`` (``blk.N``, ``token_embd``, ``output``, ``output_norm``,
    ``v.*``, ``mm.*``...). Tensors whose type ``/api/show`` prints as ``unknown`` (every IQ*
    quantisation) cannot be sized from the body: their element counts are kept so the estimator
    can spread what the file size leaves over them.
    """

    block_bytes: tuple[int, ...]  # blk.0 .. blk.N-1, known types only
    token_embd_bytes: int = 0
    output_bytes: int = 0  # the "output" group; 0 with tied embeddings
    output_norm_bytes: int = 0
    vision_bytes: int = 0  # "v" and "v.*": VisionGraphSize's weights
    mm_bytes: int = 0  # "mm.*": the multimodal projector inside the model file
    other_bytes: int = 0  # every other group (rope_freqs, altup, per_layer_*, s.*, ...)
    rope_freqs_bytes: int = 0
    has_output: bool = False  # an "output" group exists; else the output layer is token_embd
    engine_input_bytes: int = 0  # what the Ollama engine keeps on the CPU (InputWeights)
    engine_output_bytes: int = 0  # what the Ollama engine puts in its output layer
    unknown_block_elements: tuple[int, ...] = ()  # per block, of tensors of unknown type; () = none
    unknown_other_elements: int = 0
    attn_q_widths: tuple[int, ...] = ()  # per block: attn_q.weight shape[1], 0 where absent
    attn_k_widths: tuple[int, ...] = ()
    attn_v_widths: tuple[int, ...] = ()
    vocab: int | None = None  # token_embd shape[1]
    ffn_gate_exps_bytes: int = 0  # blk.0.ffn_gate_exps.weight (GraphSize's mixtral 8x22b case)
    ffn_gate0_width: int = 0  # blk.0.ffn_gate.0.weight shape[1] (mixtral 8x7b case)
    attn_qkv_bias_len: int = 0  # blk.0.attn_qkv.bias shape[0] (chatglm case)
    rope_freqs_elements: int = 0
    class_embd: bool = False  # v.class_embd exists (one more vision patch)
    cross_attention_layers: tuple[int, ...] = ()  # blocks with cross_attn_* tensors (mllama)

    @property
    def known_bytes(self) -> int:
        """Sum of every tensor of a known type."""
        return (
            sum(self.block_bytes)
            + self.token_embd_bytes
            + self.output_bytes
            + self.output_norm_bytes
            + self.vision_bytes
            + self.mm_bytes
            + self.other_bytes
        )

    @property
    def unknown_elements(self) -> int:
        """Elements of tensors whose type could not be sized."""
        return sum(self.unknown_block_elements) + self.unknown_other_elements


@record
class VisionInfo:
    """The ``<arch>.vision.*`` keys ``VisionGraphSize`` reads, for models with the encoder inline."""

    block_count: int = 0
    image_size: int = 0
    patch_size: int = 0
    num_channels: int = 0
    head_count: int = 0
    embedding_length: int = 0
    max_pixels: int | None = None  # qwen25vl
    max_num_tiles: int = 0  # mllama


@record
class ProjectorInfo:
    """``/api/show`` ``projector_info``: a separate projector file (llava-style models)."""

    parameter_count: int = 0
    file_type: int | None = None
    architecture: str = ""


@record
class SsmInfo:
    """State-space (recurrent) layer sizes: ``<arch>.ssm.*``."""

    conv_kernel: int = 0
    inner_size: int = 0
    state_size: int = 0
    group_count: int = 0


@record
class ModelInfo:
    """What ``/api/show`` says about a model, reduced to what sizing and loading need.

    Scalars are as the GGUF gives them; where a key is a per-layer array, the scalar field holds
    its largest value (``head_count``, ``head_count_kv``) and the ``*_layers`` tuple the array.
    Without ``verbose`` Ollama sends every array as null, so per-layer values are rebuilt from the
    tensors' shapes where possible. Everything is tuples of ints: the daemon keeps hundreds of these.
    """

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
    head_count_min: int | None = None
    head_count_kv_min: int | None = None
    head_count_layers: tuple[int, ...] = ()  # per layer, when not uniform; 0 = no attention
    head_count_kv_layers: tuple[int, ...] = ()
    key_length_swa: int | None = None
    value_length_swa: int | None = None
    feed_forward_length: int | None = None
    sliding_window: int | None = None
    sliding_window_pattern: tuple[bool, ...] = ()  # True = sliding-window layer, when the GGUF says
    shared_kv_layers: int = 0  # trailing layers that reuse an earlier layer's cache (gemma3n/4)
    expert_count: int | None = None
    expert_used_count: int | None = None
    expert_feed_forward_length: int | None = None
    pooling: bool = False  # <arch>.pooling_type exists: Ollama's own "embedding model" test
    causal: bool | None = None  # <arch>.attention.causal
    parameter_count: int | None = None
    file_type: int | None = None
    ssm: SsmInfo | None = None
    vision: VisionInfo | None = None
    projector: ProjectorInfo | None = None
    tensors: TensorSummary | None = None
    remote: bool = False  # a cloud model: remote_model / remote_host

    @property
    def embedding_only(self) -> bool:
        """True for models that must be loaded through ``/api/embed``."""
        return "embedding" in self.capabilities and "completion" not in self.capabilities

    @property
    def vision_capable(self) -> bool:
        """True when Ollama will treat the model as multimodal (``vision`` capability)."""
        return "vision" in self.capabilities


def _empty_info() -> Mapping[str, ModelInfo]:
    return MappingProxyType({})


@record
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

    # Indexes built on first use and kept in the instance __dict__ (see _memo): the planner looks
    # models up per node thousands of times in a large cluster. Do not change what they return.
    @_memo
    def loaded_by_name(self) -> Mapping[str, LoadedModel]:
        """The ``/api/ps`` entries by model name."""
        return {m.name: m for m in self.loaded}

    @_memo
    def installed_by_name(self) -> Mapping[str, InstalledModel]:
        """The ``/api/tags`` entries by model name (kept with the tags between polls)."""
        found = self.installed
        return found.by_name if isinstance(found, InstalledModels) else {m.name: m for m in found}

    def model_digests(self) -> dict[str, str]:
        """Every model on the node, installed or loaded, with its digest."""
        out = {m.name: m.digest for m in self.installed}
        for m in self.loaded:
            out.setdefault(m.name, m.digest)
        return out

    def loaded_model(self, name: str) -> LoadedModel | None:
        """The ``/api/ps`` entry for ``name``, if loaded."""
        return self.loaded_by_name.get(name)

    def installed_model(self, name: str) -> InstalledModel | None:
        """The ``/api/tags`` entry for ``name``, if on disk."""
        return self.installed_by_name.get(name)


@record
class ClusterState:
    """One observation of the whole cluster."""

    nodes: tuple[NodeState, ...]
    observed_at: datetime | None = None

    @_memo
    def _by_name(self) -> dict[str, NodeState]:
        return {n.name: n for n in self.nodes}

    def node(self, name: str) -> NodeState | None:
        """The node called ``name``."""
        return self._by_name.get(name)

    @_memo
    def _info_by_name(self) -> dict[str, ModelInfo]:
        out: dict[str, ModelInfo] = {}
        for n in self.nodes:
            for name, info in n.info.items():
                out.setdefault(name, info)
        return out

    def model_info(self, name: str) -> ModelInfo | None:
        """A model's ``/api/show`` metadata, from the first node that reported it."""
        return self._info_by_name.get(name)
