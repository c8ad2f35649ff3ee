"""Well-known Ollama models with their real metadata, and Ollama's classic memory estimate.

Everything here is pure: no I/O, no clocks. The figures (file sizes, layer counts, head counts,
context lengths) are those the public Ollama library reports for these tags; digests are the
sha256 of the name, which is plausible but not the registry's.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

from gpu_router.state import MIB

# ml/device.go MinimumMemory for CUDA/ROCm: reserved per GPU before any layer is placed.
GPU_MINIMUM_BYTES = 457 * MIB
MAX_DURATION_NS = 2**63 - 1  # Go's math.MaxInt64: keep_alive "forever"

# Architectures whose GGUF carries <arch>.vocab_size; others only have the tokenizer array.
_VOCAB_ARCHS = frozenset({"llama"})
# Encoder (BERT-like) GGUFs are multi-head attention without an attention.head_count_kv key.
_NO_HKV_ARCHS = frozenset({"bert", "nomic-bert"})

# (tokenizer model, vocab size) -> (bos, eos) ids of the well-known tokenizers.
_SPECIAL_TOKENS = {
    ("bert", 30522): (101, 102),
    ("gpt2", 128256): (128000, 128009),
    ("gpt2", 152064): (151643, 151645),
    ("llama", 256000): (2, 1),
}
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_M": 17}


class EmulatorError(Exception):
    """A problem with how the emulator was asked to do something (bad name, bad value, no port)."""


def normalize_name(name: str) -> str:
    """Ollama's display name: a tag is always present (``all-minilm`` -> ``all-minilm:latest``)."""
    name = name.strip()
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


@dataclass(frozen=True)
class ModelSpec:
    """One installed model: what ``/api/tags`` and ``/api/show`` say about it."""

    name: str
    family: str
    parameter_size: str
    quantization_level: str
    file_size_bytes: int
    architecture: str
    block_count: int
    embedding_length: int
    head_count: int
    head_count_kv: int
    context_length: int
    vocab_size: int
    capabilities: tuple[str, ...] = ("completion",)
    num_ctx_param: int | None = None
    pooling_type: int | None = None  # 1 mean, 2 cls: present only for embedding models
    digest: str = ""  # 64 hex; default sha256(name)
    key_length: int | None = None  # attention.key_length when the GGUF sets it (else E/H)
    value_length: int | None = None
    feed_forward_length: int = 0
    parameter_count: int = 0  # general.parameter_count; default derived from parameter_size
    families: tuple[str, ...] = ()  # default (family,)
    stop: tuple[str, ...] = ()  # PARAMETER stop lines
    template: str = "{{ .Prompt }}"
    license: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", normalize_name(self.name))
        if not self.digest:
            object.__setattr__(self, "digest", hashlib.sha256(self.name.encode()).hexdigest())
        if not re.fullmatch(r"[0-9a-f]{64}", self.digest):
            raise EmulatorError(f"model {self.name}: digest must be 64 lower-case hex digits")
        if not self.families:
            object.__setattr__(self, "families", (self.family,))
        if self.parameter_count <= 0:
            object.__setattr__(self, "parameter_count", _parse_parameter_size(self.parameter_size))
        for label, value in (
            ("file_size_bytes", self.file_size_bytes),
            ("block_count", self.block_count),
            ("embedding_length", self.embedding_length),
            ("head_count", self.head_count),
            ("head_count_kv", self.head_count_kv),
            ("context_length", self.context_length),
        ):
            if value <= 0:
                raise EmulatorError(f"model {self.name}: {label} must be positive, got {value}")

    @property
    def embedding_only(self) -> bool:
        """True when the model cannot generate (``/api/generate`` answers 400)."""
        return "embedding" in self.capabilities and "completion" not in self.capabilities

    @property
    def head_dim_k(self) -> int:
        """Key length per head (GGUF key_length, else E / H)."""
        return self.key_length or self.embedding_length // self.head_count

    @property
    def head_dim_v(self) -> int:
        """Value length per head (GGUF value_length, else E / H)."""
        return self.value_length or self.embedding_length // self.head_count

    def model_info(self) -> dict[str, object]:
        """``/api/show`` ``model_info``: the GGUF key/values Ollama returns without ``verbose``."""
        a = self.architecture
        info: dict[str, object] = {
            "general.architecture": a,
            "general.file_type": _FILE_TYPES.get(self.quantization_level, 15),
            "general.parameter_count": self.parameter_count,
            f"{a}.block_count": self.block_count,
            f"{a}.context_length": self.context_length,
            f"{a}.embedding_length": self.embedding_length,
            f"{a}.attention.head_count": self.head_count,
        }
        if self.quantization_level not in ("F16", "F32"):
            info["general.quantization_version"] = 2
        if self.feed_forward_length:
            info[f"{a}.feed_forward_length"] = self.feed_forward_length
        if a not in _NO_HKV_ARCHS:
            info[f"{a}.attention.head_count_kv"] = self.head_count_kv
        if self.key_length:
            info[f"{a}.attention.key_length"] = self.key_length
        if self.value_length:
            info[f"{a}.attention.value_length"] = self.value_length
        if a in _VOCAB_ARCHS:
            info[f"{a}.vocab_size"] = self.vocab_size
        if self.pooling_type is not None:
            info[f"{a}.pooling_type"] = self.pooling_type
            info[f"{a}.attention.causal"] = False
            info[f"{a}.attention.layer_norm_epsilon"] = 1e-12
        else:
            info[f"{a}.attention.layer_norm_rms_epsilon"] = 1e-05 if a != "gemma2" else 1e-06
            info[f"{a}.rope.freq_base"] = 500000 if a == "llama" else 1000000
        tokenizer_model = (
            "bert" if self.pooling_type is not None else ("llama" if a in ("gemma2", "phi3") else "gpt2")
        )
        info["tokenizer.ggml.model"] = tokenizer_model
        bos, eos = _SPECIAL_TOKENS.get((tokenizer_model, self.vocab_size), (1, 2))
        info["tokenizer.ggml.bos_token_id"] = bos
        info["tokenizer.ggml.eos_token_id"] = eos
        # Arrays longer than 5 are blanked without verbose (getModelData), so only their keys remain.
        info["tokenizer.ggml.tokens"] = []
        info["tokenizer.ggml.token_type"] = []
        if tokenizer_model == "gpt2":
            info["tokenizer.ggml.merges"] = []
        return dict(sorted(info.items()))


def _parse_parameter_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMBT]?)\s*", text.upper())
    if not m:
        raise EmulatorError(f"parameter_size {text!r} is not like '8.0B' or '137M'")
    scale = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}[m.group(2)]
    return int(float(m.group(1)) * scale)


_LLAMA3_TEMPLATE = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
)
_LLAMA3_STOP = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_QWEN_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n{{ .Response }}<|im_end|>"
)
_QWEN_STOP = ("<|im_start|>", "<|im_end|>")


def _catalogue() -> dict[str, ModelSpec]:
    emb = ("embedding",)
    tools = ("completion", "tools")
    specs = [
        ModelSpec(
            name="all-minilm:latest",
            family="bert",
            parameter_size="23M",
            quantization_level="F16",
            file_size_bytes=45_960_996,
            architecture="bert",
            block_count=6,
            embedding_length=384,
            head_count=12,
            head_count_kv=12,
            context_length=512,
            vocab_size=30522,
            capabilities=emb,
            pooling_type=1,
            feed_forward_length=1536,
            parameter_count=22_565_376,
            license="Apache License 2.0",
        ),
        ModelSpec(
            name="nomic-embed-text:latest",
            family="nomic-bert",
            parameter_size="137M",
            quantization_level="F16",
            file_size_bytes=274_302_450,
            architecture="nomic-bert",
            block_count=12,
            embedding_length=768,
            head_count=12,
            head_count_kv=12,
            context_length=2048,
            vocab_size=30522,
            capabilities=emb,
            num_ctx_param=8192,
            pooling_type=1,
            feed_forward_length=3072,
            parameter_count=136_727_040,
            license="Apache License 2.0",
        ),
        ModelSpec(
            name="mxbai-embed-large:latest",
            family="bert",
            parameter_size="334M",
            quantization_level="F16",
            file_size_bytes=669_615_493,
            architecture="bert",
            block_count=24,
            embedding_length=1024,
            head_count=16,
            head_count_kv=16,
            context_length=512,
            vocab_size=30522,
            capabilities=emb,
            pooling_type=2,
            feed_forward_length=4096,
            parameter_count=334_094_336,
            license="Apache License 2.0",
        ),
        ModelSpec(
            name="llama3.2:latest",
            family="llama",
            parameter_size="3.2B",
            quantization_level="Q4_K_M",
            file_size_bytes=2_019_393_189,
            architecture="llama",
            block_count=28,
            embedding_length=3072,
            head_count=24,
            head_count_kv=8,
            context_length=131072,
            vocab_size=128256,
            capabilities=tools,
            feed_forward_length=8192,
            parameter_count=3_212_749_888,
            stop=_LLAMA3_STOP,
            template=_LLAMA3_TEMPLATE,
            license="LLAMA 3.2 COMMUNITY LICENSE AGREEMENT",
        ),
        ModelSpec(
            name="llama3.2:1b",
            family="llama",
            parameter_size="1.2B",
            quantization_level="Q8_0",
            file_size_bytes=1_321_082_688,
            architecture="llama",
            block_count=16,
            embedding_length=2048,
            head_count=32,
            head_count_kv=8,
            context_length=131072,
            vocab_size=128256,
            capabilities=tools,
            feed_forward_length=8192,
            parameter_count=1_235_814_432,
            stop=_LLAMA3_STOP,
            template=_LLAMA3_TEMPLATE,
            license="LLAMA 3.2 COMMUNITY LICENSE AGREEMENT",
        ),
        ModelSpec(
            name="llama3.1:8b",
            family="llama",
            parameter_size="8.0B",
            quantization_level="Q4_K_M",
            file_size_bytes=4_920_753_328,
            architecture="llama",
            block_count=32,
            embedding_length=4096,
            head_count=32,
            head_count_kv=8,
            context_length=131072,
            vocab_size=128256,
            capabilities=tools,
            feed_forward_length=14336,
            parameter_count=8_030_261_248,
            stop=_LLAMA3_STOP,
            template=_LLAMA3_TEMPLATE,
            license="LLAMA 3.1 COMMUNITY LICENSE AGREEMENT",
        ),
        ModelSpec(
            name="qwen2.5:7b",
            family="qwen2",
            parameter_size="7.6B",
            quantization_level="Q4_K_M",
            file_size_bytes=4_683_087_332,
            architecture="qwen2",
            block_count=28,
            embedding_length=3584,
            head_count=28,
            head_count_kv=4,
            context_length=32768,
            vocab_size=152064,
            capabilities=tools,
            feed_forward_length=18944,
            parameter_count=7_615_616_512,
            stop=_QWEN_STOP,
            template=_QWEN_TEMPLATE,
            license="Apache License Version 2.0",
        ),
        ModelSpec(
            name="qwen2.5:14b",
            family="qwen2",
            parameter_size="14.8B",
            quantization_level="Q4_K_M",
            file_size_bytes=8_988_110_976,
            architecture="qwen2",
            block_count=48,
            embedding_length=5120,
            head_count=40,
            head_count_kv=8,
            context_length=32768,
            vocab_size=152064,
            capabilities=tools,
            feed_forward_length=13824,
            parameter_count=14_770_033_664,
            stop=_QWEN_STOP,
            template=_QWEN_TEMPLATE,
            license="Apache License Version 2.0",
        ),
        ModelSpec(
            name="mistral:latest",
            family="llama",
            parameter_size="7.2B",
            quantization_level="Q4_0",
            file_size_bytes=4_113_301_824,
            architecture="llama",
            block_count=32,
            embedding_length=4096,
            head_count=32,
            head_count_kv=8,
            context_length=32768,
            vocab_size=32768,
            capabilities=tools,
            feed_forward_length=14336,
            parameter_count=7_248_023_552,
            stop=("[INST]", "[/INST]"),
            template="[INST] {{ if .System }}{{ .System }} {{ end }}{{ .Prompt }} [/INST]",
            license="Apache License Version 2.0",
        ),
        ModelSpec(
            name="gemma2:2b",
            family="gemma2",
            parameter_size="2.6B",
            quantization_level="Q4_0",
            file_size_bytes=1_629_518_495,
            architecture="gemma2",
            block_count=26,
            embedding_length=2304,
            head_count=8,
            head_count_kv=4,
            key_length=256,
            value_length=256,
            context_length=8192,
            vocab_size=256000,
            capabilities=("completion",),
            feed_forward_length=9216,
            parameter_count=2_614_341_888,
            stop=("<start_of_turn>", "<end_of_turn>"),
            template=(
                "<start_of_turn>user\n{{ if .System }}{{ .System }} {{ end }}{{ .Prompt }}<end_of_turn>\n"
                "<start_of_turn>model\n{{ .Response }}<end_of_turn>"
            ),
            license="Gemma Terms of Use",
        ),
        ModelSpec(
            name="phi3:mini",
            family="phi3",
            parameter_size="3.8B",
            quantization_level="Q4_0",
            file_size_bytes=2_176_177_120,
            architecture="phi3",
            block_count=32,
            embedding_length=3072,
            head_count=32,
            head_count_kv=32,
            context_length=4096,
            vocab_size=32064,
            capabilities=("completion",),
            feed_forward_length=8192,
            parameter_count=3_821_079_552,
            stop=("<|end|>", "<|user|>", "<|assistant|>"),
            template=(
                "{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}{{ if .Prompt }}<|user|>\n"
                "{{ .Prompt }}<|end|>\n{{ end }}<|assistant|>\n{{ .Response }}<|end|>"
            ),
            license="Microsoft. MIT License",
        ),
    ]
    return {s.name: s for s in specs}


CATALOGUE: dict[str, ModelSpec] = _catalogue()


def resolve_model(model: str | ModelSpec) -> ModelSpec:
    """A :class:`ModelSpec` itself, or the catalogue entry for a name (a missing tag means ``:latest``)."""
    if isinstance(model, ModelSpec):
        return model
    spec = CATALOGUE.get(normalize_name(model))
    if spec is None:
        known = ", ".join(sorted(CATALOGUE))
        raise EmulatorError(f"unknown model {model!r}; the catalogue has: {known}")
    return spec


@dataclass(frozen=True)
class MemoryEstimate:
    """Ollama's classic (<= v0.12.10) estimate of what a model takes when loaded at ``num_ctx``."""

    num_ctx: int  # the requested context, as /api/ps context_length shows it
    kv_context_tokens: int = 0  # C = min(num_ctx, trained context): rows of the KV cache
    weights_bytes: int = 0
    kv_bytes: int = 0
    graph_bytes: int = 0
    minimum_bytes: int = GPU_MINIMUM_BYTES
    buffer_bytes: int = 0  # one layer kept as buffer: W/L + KV/L
    layers: int = 1  # block_count + 1 (the output layer)

    @property
    def full_bytes(self) -> int:
        """VRAM for a full offload on one GPU; also ``/api/ps size`` when fully on GPU."""
        return self.weights_bytes + self.kv_bytes + self.graph_bytes + self.minimum_bytes + self.buffer_bytes

    @property
    def cpu_bytes(self) -> int:
        """System memory for a CPU-only load (no per-GPU minimum, no buffer layer)."""
        return self.weights_bytes + self.kv_bytes + self.graph_bytes

    @property
    def body_bytes(self) -> int:
        """Weights and KV cache: the part that is split into layers."""
        return self.weights_bytes + self.kv_bytes

    @property
    def per_layer_bytes(self) -> int:
        """One of the ``layers`` layers (weights and KV), rounded up."""
        return -(-self.body_bytes // self.layers)

    @property
    def gpu_overhead_bytes(self) -> int:
        """What every GPU holding at least one layer pays: minimum memory plus the compute graph."""
        return self.minimum_bytes + self.graph_bytes


def estimate_memory(spec: ModelSpec, num_ctx: int, num_batch: int = 512) -> MemoryEstimate:
    """Classic estimate (reference 3a): weights + KV + graph + 457 MiB + one layer buffer, f16 KV, 1 slot."""
    n_layers = spec.block_count
    ctx = max(1, min(num_ctx, spec.context_length))
    hkv = spec.head_count_kv if spec.architecture not in _NO_HKV_ARCHS else spec.head_count
    kv_per_layer = ctx * (spec.head_dim_k + spec.head_dim_v) * hkv * 2
    kv = kv_per_layer * n_layers
    e, h, v = spec.embedding_length, spec.head_count, spec.vocab_size
    b = min(num_batch, max(1, num_ctx))
    if spec.architecture == "llama":
        graph = max(4 * b * (1 + 4 * e + ctx * (1 + h)), 4 * b * (e + v))
    else:
        # GraphSize's fallback for architectures without their own case.
        graph = math.floor(h / max(1, hkv) * kv / 6)
    w = spec.file_size_bytes
    return MemoryEstimate(
        num_ctx=num_ctx,
        kv_context_tokens=ctx,
        weights_bytes=w,
        kv_bytes=kv,
        graph_bytes=graph,
        buffer_bytes=w // n_layers + kv // n_layers,
        layers=n_layers + 1,
    )
