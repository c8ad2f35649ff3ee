"""Well-known Ollama models with their real metadata, and Ollama's classic memory estimate.

Pure apart from reading this package's own data files. Two kinds of entries:

- **real**: the ``/api/show`` body a real Ollama returned for the model (``data/*.json.gz``: model_info,
  tensors, projector_info, template, parameters, license, capabilities), collected from public GitHub
  issues and repositories; the ``modelfile`` is rebuilt (the originals carry the reporter's home path);
- **generated**: the model's public architecture (layers, widths, heads, experts; ``archs.py``) with
  llama.cpp's quantisation recipe, so its tensor list sums to within about 1% of the real file.

File sizes are ``/api/tags`` figures (every blob of the model): reported ones for the real entries,
the tensor sum plus tokenizer metadata for the generated ones (each within the size the library lists).
Digests are the sha256 of the name, which is plausible but not the registry's. A cloud entry
(``remote_host``) is a stub of a few hundred bytes whose ``/api/show`` has only the keys
``GetModelInfo`` (``server/routes.go@v0.30.0``) fills for remote models.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import math
import re
from collections.abc import Mapping
from importlib import resources
from typing import Any

from gpu_router.emulator.archs import Arch, Vision, build_tensors, uniform
from gpu_router.emulator.ggml import LayerSizes, Tensor, layer_sizes, tensors_from_json
from gpu_router.records import record
from gpu_router.state import MIB

# ml/device.go MinimumMemory for CUDA/ROCm: reserved per GPU before any layer is placed.
GPU_MINIMUM_BYTES = 457 * MIB
MAX_DURATION_NS = 2**63 - 1  # Go's math.MaxInt64: keep_alive "forever"
CLOUD_HOST = "https://ollama.com:443"

# Architectures whose GGUF carries <arch>.vocab_size; others only have the tokenizer array.
_VOCAB_ARCHS = frozenset({"llama"})
# Encoder (BERT-like) GGUFs are multi-head attention without an attention.head_count_kv key.
_NO_HKV_ARCHS = frozenset({"bert", "nomic-bert"})

# (tokenizer model, vocab size) -> (bos, eos) ids of the well-known tokenizers.
_SPECIAL_TOKENS = {
    ("bert", 30522): (101, 102),
    ("gpt2", 128256): (128000, 128009),
    ("gpt2", 152064): (151643, 151645),
    ("gpt2", 151936): (151643, 151645),
    ("llama", 256000): (2, 1),
    ("llama", 262208): (2, 1),
}
_FILE_TYPES = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K_M": 17,
    "MXFP4": 38,
}


class EmulatorError(Exception):
    """A problem with how the emulator was asked to do something (bad name, bad value, no port)."""


def normalize_name(name: str) -> str:
    """Ollama's display name: a tag is always present (``all-minilm`` -> ``all-minilm:latest``)."""
    name = name.strip()
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


@functools.cache
def packaged_show(name: str) -> Mapping[str, Any]:
    """A real ``/api/show`` body shipped with the emulator (``data/NAME.json.gz``), parsed once."""
    blob = resources.files("gpu_router.emulator").joinpath("data").joinpath(f"{name}.json.gz").read_bytes()
    body = json.loads(gzip.decompress(blob))
    assert isinstance(body, dict)
    return body


@record
class ModelSpec:
    """One installed model: what ``/api/tags`` and ``/api/show`` say about it."""

    name: str
    family: str
    parameter_size: str
    quantization_level: str
    file_size_bytes: int  # /api/tags size: every blob of the model (weights, projector, template...)
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
    # -- newer metadata (all optional) --
    arch: Arch | None = None  # the shape its tensors are generated from (else a plain decoder)
    show_data: str = ""  # a real /api/show body in data/ that is this model's source of truth
    sliding_window: int = 0  # attention.sliding_window (tokens) of the local layers
    sliding_pattern: str = ""  # which layers are local: "gemma3" (5 of every 6), "even" (gpt-oss)
    head_count_kv_layers: tuple[int, ...] = ()  # per-layer KV heads; 0 = recurrent layer
    expert_count: int = 0
    expert_used_count: int = 0
    ssm_conv_kernel: int = 0
    ssm_state_size: int = 0
    ssm_inner_size: int = 0
    ssm_group_count: int = 0
    projector_bytes: int = 0  # a separate projector blob (llava/minicpm-v style), loaded on GPU 0
    remote_host: str = ""  # a cloud model: a stub on disk, inference upstream
    remote_model: str = ""
    extra_info: tuple[tuple[str, Any], ...] = ()  # further model_info keys of a generated entry

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
        if self.head_count_kv_layers and len(self.head_count_kv_layers) != self.block_count:
            raise EmulatorError(f"model {self.name}: head_count_kv_layers needs one value per block")

    @property
    def embedding_only(self) -> bool:
        """True when the model cannot generate (``/api/generate`` answers 400)."""
        return "embedding" in self.capabilities and "completion" not in self.capabilities

    @property
    def is_cloud(self) -> bool:
        """True for a cloud stub (``remote_host`` set): never loaded locally."""
        return bool(self.remote_host)

    @property
    def head_dim_k(self) -> int:
        """Key length per head (GGUF key_length, else E / H)."""
        return self.key_length or self.embedding_length // self.head_count

    @property
    def head_dim_v(self) -> int:
        """Value length per head (GGUF value_length, else E / H)."""
        return self.value_length or self.embedding_length // self.head_count

    @property
    def kv_heads_per_layer(self) -> tuple[int, ...]:
        """KV heads of every block as ``HeadCountKV`` reads the GGUF: 0 marks a recurrent layer, and a
        GGUF without ``attention.head_count_kv`` (BERT) counts 1 (fs/ggml/ggml.go@v0.12.10).
        """
        if self.head_count_kv_layers:
            return self.head_count_kv_layers
        heads = 1 if self.architecture in _NO_HKV_ARCHS else self.head_count_kv
        return (heads,) * self.block_count

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per block, True for a sliding-window (local) attention layer."""
        n = self.block_count
        if not self.sliding_window or not self.sliding_pattern:
            return (False,) * n
        if self.sliding_pattern == "gemma3":
            # model/models/gemma3: every 6th layer is global, the rest use the sliding window.
            return tuple((i + 1) % 6 != 0 for i in range(n))
        if self.sliding_pattern == "gemma3n":
            # gemma-3n layer_types: every 5th layer is global.
            return tuple((i + 1) % 5 != 0 for i in range(n))
        if self.sliding_pattern == "even":
            # gpt-oss alternates: even layers sliding, odd layers full (model/models/gptoss).
            return tuple(i % 2 == 0 for i in range(n))
        raise EmulatorError(f"model {self.name}: unknown sliding_pattern {self.sliding_pattern!r}")

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        """The GGUF's tensors as ``/api/show`` lists them (real, or generated from the architecture)."""
        return _tensors(self)

    @property
    def layers(self) -> LayerSizes:
        """Weights split into blocks, output layer, input embeddings, vision tower and the rest."""
        return _layers(self)

    @property
    def weights_bytes(self) -> int:
        """Bytes of all tensors in the model GGUF (without a separate projector)."""
        return self.layers.total_bytes

    def model_info(self, verbose: bool = False) -> dict[str, object]:
        """``/api/show`` ``model_info``: the GGUF key/values.

        Without ``verbose`` every array is null: ``getModelData`` decodes with maxArraySize 0
        (``server/routes.go``, ``fs/ggml/gguf.go`` newArray), which the real bodies in data/ show.
        """
        if self.show_data:
            info = dict(packaged_show(self.show_data)["model_info"])
            if verbose:
                info["tokenizer.ggml.tokens"] = _token_list(self.vocab_size)
            return info
        return self._generated_info(verbose)

    def _generated_info(self, verbose: bool) -> dict[str, object]:
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
        if self.head_count_kv_layers:
            info[f"{a}.attention.head_count_kv"] = list(self.head_count_kv_layers) if verbose else None
        elif a not in _NO_HKV_ARCHS:
            info[f"{a}.attention.head_count_kv"] = self.head_count_kv
        if self.key_length:
            info[f"{a}.attention.key_length"] = self.key_length
        if self.value_length:
            info[f"{a}.attention.value_length"] = self.value_length
        if self.sliding_window:
            info[f"{a}.attention.sliding_window"] = self.sliding_window
        if self.expert_count:
            info[f"{a}.expert_count"] = self.expert_count
            info[f"{a}.expert_used_count"] = self.expert_used_count
        if self.ssm_inner_size:
            info[f"{a}.ssm.conv_kernel"] = self.ssm_conv_kernel
            info[f"{a}.ssm.state_size"] = self.ssm_state_size
            info[f"{a}.ssm.inner_size"] = self.ssm_inner_size
            info[f"{a}.ssm.group_count"] = self.ssm_group_count
        if a in _VOCAB_ARCHS:
            info[f"{a}.vocab_size"] = self.vocab_size
        if self.pooling_type is not None:
            info[f"{a}.pooling_type"] = self.pooling_type
            info[f"{a}.attention.causal"] = False
            info[f"{a}.attention.layer_norm_epsilon"] = 1e-12
        else:
            info[f"{a}.attention.layer_norm_rms_epsilon"] = 1e-05 if a not in ("gemma2", "gemma3") else 1e-06
            info[f"{a}.rope.freq_base"] = 500000 if a == "llama" else 1000000
        for key, value in self.extra_info:
            info[key] = value
        tokenizer_model = (
            "bert"
            if self.pooling_type is not None
            else ("llama" if a in ("gemma2", "gemma3", "phi3") else "gpt2")
        )
        info["tokenizer.ggml.model"] = tokenizer_model
        bos, eos = _SPECIAL_TOKENS.get((tokenizer_model, self.vocab_size), (1, 2))
        info["tokenizer.ggml.bos_token_id"] = bos
        info["tokenizer.ggml.eos_token_id"] = eos
        info["tokenizer.ggml.tokens"] = _token_list(self.vocab_size) if verbose else None
        info["tokenizer.ggml.token_type"] = None
        if tokenizer_model == "gpt2":
            info["tokenizer.ggml.merges"] = None
        return dict(sorted(info.items()))

    def projector_info(self) -> dict[str, object] | None:
        """``/api/show`` ``projector_info`` of a model with a separate projector, else None."""
        if self.show_data:
            value = packaged_show(self.show_data).get("projector_info")
            return dict(value) if isinstance(value, dict) else None
        return None


@functools.lru_cache(maxsize=16)
def _token_list(vocab: int) -> list[str]:
    # verbose=true returns the whole vocabulary; only its length matters to a client.
    return [f"<t{i}>" for i in range(vocab)]


@functools.lru_cache(maxsize=256)
def _tensors(spec: ModelSpec) -> tuple[Tensor, ...]:
    if spec.remote_host:
        return ()
    if spec.show_data:
        items = packaged_show(spec.show_data).get("tensors") or []
        return tensors_from_json(items)
    return build_tensors(spec.arch or _plain_arch(spec))


@functools.lru_cache(maxsize=256)
def _layers(spec: ModelSpec) -> LayerSizes:
    if spec.remote_host:
        return LayerSizes((0,) * spec.block_count, 0, 0, 0, 0, True)
    return layer_sizes(spec.tensors, spec.block_count)


def _plain_arch(spec: ModelSpec) -> Arch:
    # A spec built by hand (tests): a plain decoder whose tensors roughly match its file size.
    encoder = spec.architecture in _NO_HKV_ARCHS
    known = ("Q4_K_M", "Q4_0", "Q8_0", "F16")
    quant = spec.quantization_level if spec.quantization_level in known else "Q8_0"
    ffn = spec.feed_forward_length or 4 * spec.embedding_length
    return Arch(
        block_count=spec.block_count,
        embedding=spec.embedding_length,
        heads=spec.head_count,
        heads_kv=uniform(spec.block_count, spec.head_count) if encoder else spec.kv_heads_per_layer,
        head_dim_k=spec.head_dim_k,
        head_dim_v=spec.head_dim_v,
        ffn=ffn,
        vocab=spec.vocab_size,
        quant=quant,
        encoder=encoder,
    )


def _parse_parameter_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMBT]?)\s*", text.upper())
    if not m:
        raise EmulatorError(f"parameter_size {text!r} is not like '8.0B' or '137M'")
    scale = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}[m.group(2)]
    return int(float(m.group(1)) * scale)


def _from_show(
    name: str,
    data: str,
    file_size_bytes: int,
    *,
    projector_bytes: int = 0,
    sliding_pattern: str = "",
) -> ModelSpec:
    """A catalogue entry whose metadata is a real /api/show body shipped in data/."""
    body = packaged_show(data)
    info = body["model_info"]
    details = body["details"]
    a = str(info["general.architecture"])

    def num(key: str, default: int = 0) -> int:
        value = info.get(f"{a}.{key}")
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    tensors = tensors_from_json(body.get("tensors") or [])
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    vocab = num("vocab_size") or (embd.shape[1] if embd is not None and len(embd.shape) > 1 else 32000)
    params = str(body.get("parameters") or "")
    m = re.search(r"^num_ctx\s+(\d+)\s*$", params, re.MULTILINE)
    head_count = num("attention.head_count", 1)
    return ModelSpec(
        name=name,
        family=str(details["family"]),
        families=tuple(details.get("families") or (details["family"],)),
        parameter_size=str(details["parameter_size"]),
        quantization_level=str(details["quantization_level"]),
        file_size_bytes=file_size_bytes,
        architecture=a,
        block_count=num("block_count"),
        embedding_length=num("embedding_length"),
        head_count=head_count,
        head_count_kv=num("attention.head_count_kv", head_count),
        key_length=num("attention.key_length") or None,
        value_length=num("attention.value_length") or None,
        context_length=num("context_length"),
        vocab_size=vocab,
        feed_forward_length=num("feed_forward_length"),
        parameter_count=int(info.get("general.parameter_count") or 0),
        capabilities=tuple(body.get("capabilities") or ("completion",)),
        num_ctx_param=int(m.group(1)) if m else None,
        template=str(body.get("template") or ""),
        license=str(body.get("license") or ""),
        show_data=data,
        sliding_window=num("attention.sliding_window"),
        sliding_pattern=sliding_pattern,
        projector_bytes=projector_bytes,
    )


def show_parameters(spec: ModelSpec) -> str:
    """``/api/show`` ``parameters``: ``%-30s %#v`` lines (routes.go GetModelInfo)."""
    if spec.show_data:
        return str(packaged_show(spec.show_data).get("parameters") or "")
    params: list[tuple[str, str]] = []
    if spec.num_ctx_param:
        params.append(("num_ctx", str(spec.num_ctx_param)))
    params.extend(("stop", json.dumps(s)) for s in spec.stop)
    return "\n".join(f"{k:<30} {v}" for k, v in params)


def show_system(spec: ModelSpec) -> str:
    """The model's SYSTEM prompt, if its Modelfile has one."""
    if spec.show_data:
        return str(packaged_show(spec.show_data).get("system") or "")
    return ""


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


def _a(
    n: int,
    e: int,
    heads: int,
    heads_kv: int | tuple[int, ...],
    head_dim: int,
    ffn: int,
    vocab: int,
    quant: str,
    **kw: Any,
) -> Arch:
    hkv = uniform(n, heads_kv) if isinstance(heads_kv, int) else heads_kv
    return Arch(n, e, heads, hkv, head_dim, kw.pop("head_dim_v", head_dim), ffn, vocab, quant, **kw)


# granite-4.0-h-tiny (ibm-granite config.json): 40 blocks, attention only in blocks 5, 15, 25, 35.
_GRANITE4_TINY_KV = tuple(4 if i in (5, 15, 25, 35) else 0 for i in range(40))


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
            arch=_a(6, 384, 12, 12, 32, 1536, 30522, "F16", encoder=True),
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
            arch=_a(12, 768, 12, 12, 64, 3072, 30522, "F16", encoder=True, fused_qkv=True, gated_ffn=True),
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
            arch=_a(24, 1024, 16, 16, 64, 4096, 30522, "F16", encoder=True),
        ),
        _from_show("llama3.2:latest", "llama3.2_3b", 2_019_393_189),
        _from_show("llama3.2:1b", "llama3.2_1b", 1_321_098_329),
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
            arch=_a(32, 4096, 32, 8, 128, 14336, 128256, "Q4_K_M"),
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
            arch=_a(28, 3584, 28, 4, 128, 18944, 152064, "Q4_K_M", qkv_bias=True),
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
            arch=_a(48, 5120, 40, 8, 128, 13824, 152064, "Q4_K_M", qkv_bias=True),
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
            arch=_a(32, 4096, 32, 8, 128, 14336, 32768, "Q4_0"),
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
            # Gemma 2 has local layers too, but only Ollama's own engine discounts them (GraphSize
            # at v0.12.10), and gemma2 runs on the llama engine: no sliding_pattern here.
            sliding_window=4096,
            arch=_a(26, 2304, 8, 4, 256, 9216, 256000, "Q4_0", tied_output=True, post_norms=True),
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
            arch=_a(32, 3072, 32, 32, 96, 8192, 32064, "Q4_0", fused_qkv=True),
        ),
        # -- real /api/show bodies (data/): tags sizes from the same reports where known --
        _from_show("mistral:7b", "mistral_7b", 4_372_824_384),
        _from_show("qwen3:8b", "qwen3_8b", 5_225_388_164),
        _from_show("deepseek-r1:8b", "deepseek-r1_8b", 5_225_376_047),
        _from_show("granite3.3:2b", "granite3.3_2b", 1_545_321_637),
        _from_show("deepcoder:1.5b", "deepcoder_1.5b", 1_117_322_712),
        _from_show("gemma:2b", "gemma_2b", 1_678_447_520),
        # Sliding window: 5 of every 6 layers see only the last 512 tokens.
        _from_show("gemma3:1b", "gemma3_1b", 815_319_791, sliding_pattern="gemma3"),
        _from_show("gemma3n:e4b", "gemma3n_e4b", 7_547_589_116, sliding_pattern="gemma3n"),
        # Vision inside the GGUF (v.* tensors) and a separate-projector vision model.
        _from_show("qwen2.5vl:7b", "qwen2.5vl_7b", 5_969_245_856),
        _from_show("minicpm-v:8b", "minicpm-v_8b", 5_474_823_130, projector_bytes=1_044_187_520),
        # -- generated from the public architectures --
        ModelSpec(
            # google/gemma-3-4b-it: 34 blocks, local window 1024 on 5 of every 6, SigLIP tower in the GGUF.
            name="gemma3:4b",
            family="gemma3",
            parameter_size="4.3B",
            quantization_level="Q4_K_M",
            file_size_bytes=3_338_801_804,
            architecture="gemma3",
            block_count=34,
            embedding_length=2560,
            head_count=8,
            head_count_kv=4,
            key_length=256,
            value_length=256,
            context_length=131072,
            vocab_size=262208,
            capabilities=("completion", "vision"),
            feed_forward_length=10240,
            parameter_count=4_300_079_472,
            stop=("<end_of_turn>",),
            template=(
                "{{- range .Messages }}<start_of_turn>{{ .Role }}\n{{ .Content }}<end_of_turn>\n{{ end }}"
            ),
            license="Gemma Terms of Use",
            sliding_window=1024,
            sliding_pattern="gemma3",
            extra_info=(
                ("gemma3.vision.block_count", 27),
                ("gemma3.vision.embedding_length", 1152),
                ("gemma3.vision.feed_forward_length", 4304),
                ("gemma3.vision.image_size", 896),
                ("gemma3.vision.patch_size", 14),
                ("gemma3.vision.attention.head_count", 16),
                ("gemma3.mm.tokens_per_image", 256),
            ),
            arch=_a(
                34,
                2560,
                8,
                4,
                256,
                10240,
                262208,
                "Q4_K_M",
                tied_output=True,
                post_norms=True,
                qk_norm=True,
                vision=Vision(27, 1152, 4304, 14, 896),
            ),
        ),
        ModelSpec(
            # Qwen/Qwen3-30B-A3B: 48 blocks, 128 experts of which 8 run per token.
            name="qwen3:30b-a3b",
            family="qwen3moe",
            parameter_size="30.5B",
            quantization_level="Q4_K_M",
            file_size_bytes=18_556_685_312,
            architecture="qwen3moe",
            block_count=48,
            embedding_length=2048,
            head_count=32,
            head_count_kv=4,
            key_length=128,
            value_length=128,
            context_length=40960,
            vocab_size=151936,
            capabilities=("completion", "tools", "thinking"),
            feed_forward_length=6144,
            parameter_count=30_532_122_624,
            stop=_QWEN_STOP,
            template=_QWEN_TEMPLATE,
            license="Apache License Version 2.0",
            expert_count=128,
            expert_used_count=8,
            extra_info=(("qwen3moe.expert_feed_forward_length", 768),),
            arch=_a(48, 2048, 32, 4, 128, 6144, 151936, "Q4_K_M", qk_norm=True, experts=128, expert_ffn=768),
        ),
        ModelSpec(
            # openai/gpt-oss-20b: 24 blocks alternating 128-token windows and full attention, 32 MXFP4
            # experts (4 active), everything else BF16.
            name="gpt-oss:20b",
            family="gptoss",
            parameter_size="20.9B",
            quantization_level="MXFP4",
            file_size_bytes=13_780_173_724,
            architecture="gptoss",
            block_count=24,
            embedding_length=2880,
            head_count=64,
            head_count_kv=8,
            key_length=64,
            value_length=64,
            context_length=131072,
            vocab_size=201088,
            capabilities=("completion", "tools", "thinking"),
            feed_forward_length=2880,
            parameter_count=20_914_757_184,
            license="Apache License Version 2.0",
            sliding_window=128,
            sliding_pattern="even",
            expert_count=32,
            expert_used_count=4,
            extra_info=(("gptoss.expert_feed_forward_length", 2880),),
            arch=_a(
                24,
                2880,
                64,
                8,
                64,
                2880,
                201088,
                "Q4_K_M",
                qkv_bias=True,
                attn_sinks=True,
                experts=32,
                expert_ffn=2880,
                moe_bias=True,
                dense_type="BF16",
                expert_type="MXFP4",
            ),
        ),
        ModelSpec(
            # ibm-granite/granite-4.0-h-tiny: mamba2 + attention hybrid MoE (64 experts, 6 active);
            # the per-layer head_count_kv is 0 on the 36 recurrent blocks.
            name="granite4:tiny-h",
            family="granitehybrid",
            parameter_size="6.9B",
            quantization_level="Q4_K_M",
            file_size_bytes=4_229_683_149,
            architecture="granitehybrid",
            block_count=40,
            embedding_length=1536,
            head_count=12,
            head_count_kv=4,
            head_count_kv_layers=_GRANITE4_TINY_KV,
            key_length=128,
            value_length=128,
            context_length=1_048_576,
            vocab_size=100352,
            capabilities=tools,
            feed_forward_length=512,
            parameter_count=6_939_835_968,
            license="Apache License Version 2.0",
            expert_count=64,
            expert_used_count=6,
            ssm_conv_kernel=4,
            ssm_state_size=128,
            ssm_inner_size=3072,
            ssm_group_count=1,
            extra_info=(
                ("granitehybrid.expert_feed_forward_length", 512),
                ("granitehybrid.expert_shared_feed_forward_length", 1024),
                ("granitehybrid.ssm.time_step_rank", 48),
            ),
            arch=_a(
                40,
                1536,
                12,
                _GRANITE4_TINY_KV,
                128,
                512,
                100352,
                "Q4_K_M",
                experts=64,
                expert_ffn=512,
                shared_expert_ffn=1024,
                ssm_inner=3072,
                ssm_state=128,
                ssm_heads=48,
                tied_output=True,
            ),
        ),
        # -- a cloud model: a tiny stub on disk; /api/show body from a real cloud stub (data/) --
        ModelSpec(
            name="gpt-oss:20b-cloud",
            family="gptoss",
            families=(),
            parameter_size="20914757184",
            quantization_level="MXFP4",
            file_size_bytes=384,
            architecture="gptoss",
            block_count=24,
            embedding_length=2880,
            head_count=64,
            head_count_kv=8,
            context_length=131072,
            vocab_size=201088,
            capabilities=("completion", "tools", "thinking"),
            parameter_count=20_914_757_184,
            template="",
            remote_host=CLOUD_HOST,
            remote_model="gpt-oss:20b",
            show_data="gpt-oss_20b",
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


@record
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
