"""Real model metadata for the memory tests: real /api/show bodies, and public configs.

Where a real ``/api/show`` body is in ``fixtures/observations/show`` it is used as is. For the
other architectures the tests need (gemma3 with vision, gemma2, qwen3moe, gpt-oss, nomic-bert,
llama3.1), the shapes are the models' public configurations (Hugging Face ``config.json`` of the
original weights, as the Ollama library ships them) and the tensor list is built the way
llama.cpp's converter names and shapes the tensors, with the quantisation types of the Ollama
library's default tags. ``tensor_bytes`` below is the tests' own copy of ``Tensor.Size``
(fs/ggml/ggml.go@v0.12.10), so expected values never come from the code under test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"
SHOW_DIR = FIXTURES / "observations" / "show"

# fs/ggml/ggml.go@v0.12.10 BlockSize / TypeSize: (elements per block, bytes per block)
TYPE_SIZES = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 18),
    "Q5_0": (32, 22),
    "Q8_0": (32, 34),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
    "MXFP4": (32, 17),
}


def tensor_bytes(type_name: str, shape: list[int]) -> int:
    """Tensor.Size: elements x TypeSize / BlockSize."""
    block, size = TYPE_SIZES[type_name]
    n = 1
    for d in shape:
        n *= d
    return n * size // block


def group_sums(body: dict[str, Any]) -> dict[str, int]:
    """Bytes per GroupLayers group (fs/ggml/ggml.go@v0.12.10): blk.N / v.blk.N / mm.N, else the
    first dotted part of the name."""
    out: dict[str, int] = {}
    for t in body["tensors"]:
        parts = t["name"].split(".")
        key = parts[0]
        for i, part in enumerate(parts):
            if part in ("blk", "mm"):
                if len(parts) > i + 2:
                    key = ".".join(parts[: i + 2])
                break
        out[key] = out.get(key, 0) + tensor_bytes(t["type"], t["shape"])
    return out


def load_show(name: str) -> dict[str, Any]:
    """A real /api/show body from fixtures/observations/show."""
    body: dict[str, Any] = json.loads((SHOW_DIR / f"{name}.json").read_text())
    return body


@dataclass
class Built:
    """An /api/show body built from a public config, with the byte sums the tests need."""

    body: dict[str, Any]
    blocks: list[int] = field(default_factory=list)  # bytes of blk.i
    token_embd: int = 0
    output: int = 0  # 0 when tied
    output_norm: int = 0
    vision: int = 0  # v.* tensors
    other: int = 0  # groups none of the above (token_types...)

    @property
    def file_bytes(self) -> int:
        """What /api/tags would report: the tensors plus a little GGUF header and metadata."""
        parts = self.token_embd + self.output + self.output_norm + self.vision + self.other
        return sum(self.blocks) + parts + 4 * 2**20


def _add(built: Built, name: str, type_name: str, shape: list[int]) -> int:
    built.body["tensors"].append({"name": name, "type": type_name, "shape": shape})
    return tensor_bytes(type_name, shape)


def build(
    arch: str,
    *,
    layers: int,
    embedding: int,
    heads: int,
    heads_kv: int,
    ff: int,
    vocab: int,
    context: int,
    head_dim: int | None = None,
    tied: bool = False,
    weight_type: str = "Q4_K",
    embed_type: str = "Q6_K",
    experts: int = 0,
    experts_used: int = 0,
    expert_ff: int = 0,
    expert_type: str | None = None,
    extra_info: dict[str, Any] | None = None,
    capabilities: tuple[str, ...] = ("completion",),
    vision: dict[str, int] | None = None,
    norm_type: str = "F32",
) -> Built:
    """An /api/show body with llama.cpp-converter tensor names for a decoder-only model."""
    d = head_dim or embedding // heads
    info: dict[str, Any] = {
        "general.architecture": arch,
        f"{arch}.block_count": layers,
        f"{arch}.embedding_length": embedding,
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": heads_kv,
        f"{arch}.feed_forward_length": ff,
        f"{arch}.context_length": context,
        "tokenizer.ggml.tokens": None,
    }
    if head_dim:
        info[f"{arch}.attention.key_length"] = head_dim
        info[f"{arch}.attention.value_length"] = head_dim
    if experts:
        info[f"{arch}.expert_count"] = experts
        info[f"{arch}.expert_used_count"] = experts_used
        info[f"{arch}.expert_feed_forward_length"] = expert_ff
    info.update(extra_info or {})
    built = Built({"model_info": info, "capabilities": list(capabilities), "tensors": []})
    built.token_embd = _add(built, "token_embd.weight", embed_type, [embedding, vocab])
    built.output_norm = _add(built, "output_norm.weight", norm_type, [embedding])
    if not tied:
        built.output = _add(built, "output.weight", embed_type, [embedding, vocab])
    for i in range(layers):
        b = 0
        b += _add(built, f"blk.{i}.attn_norm.weight", norm_type, [embedding])
        b += _add(built, f"blk.{i}.attn_q.weight", weight_type, [embedding, heads * d])
        b += _add(built, f"blk.{i}.attn_k.weight", weight_type, [embedding, heads_kv * d])
        b += _add(
            built,
            f"blk.{i}.attn_v.weight",
            "Q6_K" if weight_type == "Q4_K" else weight_type,
            [embedding, heads_kv * d],
        )
        b += _add(built, f"blk.{i}.attn_output.weight", weight_type, [heads * d, embedding])
        b += _add(built, f"blk.{i}.ffn_norm.weight", norm_type, [embedding])
        if experts:
            et = expert_type or weight_type
            b += _add(built, f"blk.{i}.ffn_gate_inp.weight", "F32", [embedding, experts])
            b += _add(built, f"blk.{i}.ffn_gate_exps.weight", et, [embedding, expert_ff, experts])
            b += _add(built, f"blk.{i}.ffn_up_exps.weight", et, [embedding, expert_ff, experts])
            b += _add(built, f"blk.{i}.ffn_down_exps.weight", et, [expert_ff, embedding, experts])
        else:
            b += _add(built, f"blk.{i}.ffn_gate.weight", weight_type, [embedding, ff])
            b += _add(built, f"blk.{i}.ffn_up.weight", weight_type, [embedding, ff])
            b += _add(
                built,
                f"blk.{i}.ffn_down.weight",
                "Q6_K" if weight_type == "Q4_K" else weight_type,
                [ff, embedding],
            )
        built.blocks.append(b)
    if vision:
        width, depth = vision["embedding_length"], vision["block_count"]
        patch, channels = vision["patch_size"], vision["num_channels"]
        for key, value in vision.items():
            info[f"{arch}.vision.{key}"] = value
        built.vision += _add(built, "v.patch_embd.weight", "F16", [patch, patch, channels, width])
        built.vision += _add(
            built, "v.position_embd.weight", "F32", [width, (vision["image_size"] // patch) ** 2]
        )
        for i in range(depth):
            for part, shape in (
                ("attn_q", [width, width]),
                ("attn_k", [width, width]),
                ("attn_v", [width, width]),
                ("attn_out", [width, width]),
                ("ffn_up", [width, 4 * width]),
                ("ffn_down", [4 * width, width]),
            ):
                built.vision += _add(built, f"v.blk.{i}.{part}.weight", "F16", shape)
    return built


# Gemma 3's SigLIP vision tower (google/gemma-3-*-it vision_config): 896 px, patch 14, 27 blocks.
_SIGLIP = {
    "block_count": 27,
    "embedding_length": 1152,
    "attention.head_count": 16,
    "image_size": 896,
    "patch_size": 14,
    "num_channels": 3,
}


def llama31_8b() -> Built:
    """llama3.1:8b (Meta-Llama-3.1-8B-Instruct config; Ollama's default tag is Q4_K_M)."""
    return build(
        "llama",
        layers=32,
        embedding=4096,
        heads=32,
        heads_kv=8,
        ff=14336,
        vocab=128256,
        context=131072,
        extra_info={"llama.vocab_size": 128256, "llama.rope.dimension_count": 128},
    )


def gemma3_4b() -> Built:
    """gemma3:4b with its vision tower (google/gemma-3-4b-it config; SigLIP 896 px, patch 14)."""
    return build(
        "gemma3",
        layers=34,
        embedding=2560,
        heads=8,
        heads_kv=4,
        head_dim=256,
        ff=10240,
        vocab=262144,
        context=131072,
        tied=True,
        extra_info={"gemma3.attention.sliding_window": 1024},
        capabilities=("completion", "vision"),
        vision={
            "block_count": 27,
            "embedding_length": 1152,
            "attention.head_count": 16,
            "image_size": 896,
            "patch_size": 14,
            "num_channels": 3,
        },
    )


def gemma3_27b(vision: bool = False) -> Built:
    """gemma3:27b (google/gemma-3-27b-it config); with ``vision``, its SigLIP tower too."""
    return build(
        "gemma3",
        layers=62,
        embedding=5376,
        heads=32,
        heads_kv=16,
        head_dim=128,
        ff=21504,
        vocab=262144,
        context=131072,
        tied=True,
        extra_info={"gemma3.attention.sliding_window": 1024},
        capabilities=("completion", "vision") if vision else ("completion",),
        vision=_SIGLIP if vision else None,
    )


def gemma2_9b() -> Built:
    """gemma2:9b (google/gemma-2-9b-it config: sliding window 4096 on every other layer)."""
    return build(
        "gemma2",
        layers=42,
        embedding=3584,
        heads=16,
        heads_kv=8,
        head_dim=256,
        ff=14336,
        vocab=256000,
        context=8192,
        tied=True,
        extra_info={"gemma2.attention.sliding_window": 4096},
    )


def qwen3_30b_a3b() -> Built:
    """qwen3:30b (Qwen/Qwen3-30B-A3B config: 128 experts, 8 used, expert FFN 768)."""
    return build(
        "qwen3moe",
        layers=48,
        embedding=2048,
        heads=32,
        heads_kv=4,
        head_dim=128,
        ff=6144,
        vocab=151936,
        context=40960,
        experts=128,
        experts_used=8,
        expert_ff=768,
    )


def gpt_oss_20b() -> Built:
    """gpt-oss:20b (openai/gpt-oss-20b config: 24 layers, sliding window 128 on even layers)."""
    return build(
        "gptoss",
        layers=24,
        embedding=2880,
        heads=64,
        heads_kv=8,
        head_dim=64,
        ff=2880,
        vocab=201088,
        context=131072,
        experts=32,
        experts_used=4,
        expert_ff=2880,
        expert_type="MXFP4",
        weight_type="Q8_0",
        embed_type="Q8_0",
        extra_info={"gptoss.attention.sliding_window": 128},
    )


def nomic_embed_text() -> Built:
    """nomic-embed-text (nomic-bert, 12 layers, F16), with the real show body's keys.

    Like the real GGUF it has no ``attention.head_count_kv`` key: Ollama's GraphSize then takes
    one KV head (its default), which is why the classic KV of this model is so small.
    """
    real = json.loads((FIXTURES / "ollama" / "show-nomic-embed.json").read_text())
    info = dict(real["model_info"])
    built = Built(
        {
            "model_info": info,
            "capabilities": real["capabilities"],
            "tensors": [],
            "parameters": real.get("parameters"),
        }
    )
    e, ff, vocab = 768, 3072, 30522
    built.token_embd = _add(built, "token_embd.weight", "F16", [e, vocab])
    built.other = _add(built, "token_types.weight", "F32", [e, 2])
    built.output_norm = 0
    for i in range(12):
        b = 0
        b += _add(built, f"blk.{i}.attn_qkv.weight", "F16", [e, 3 * e])
        b += _add(built, f"blk.{i}.attn_output.weight", "F16", [e, e])
        b += _add(built, f"blk.{i}.attn_output_norm.weight", "F32", [e])
        b += _add(built, f"blk.{i}.ffn_gate.weight", "F16", [e, ff])
        b += _add(built, f"blk.{i}.ffn_up.weight", "F16", [e, ff])
        b += _add(built, f"blk.{i}.ffn_down.weight", "F16", [ff, e])
        b += _add(built, f"blk.{i}.layer_output_norm.weight", "F32", [e])
        built.blocks.append(b)
    return built


def gpt_oss_120b() -> Built:
    """gpt-oss:120b (openai/gpt-oss-120b config: 36 layers, 128 experts, sliding window 128)."""
    return build(
        "gptoss",
        layers=36,
        embedding=2880,
        heads=64,
        heads_kv=8,
        head_dim=64,
        ff=2880,
        vocab=201088,
        context=131072,
        experts=128,
        experts_used=4,
        expert_ff=2880,
        expert_type="MXFP4",
        weight_type="Q8_0",
        embed_type="Q8_0",
        extra_info={"gptoss.attention.sliding_window": 128},
    )


def gemma3_12b() -> Built:
    """gemma3:12b with its vision tower (google/gemma-3-12b-it config)."""
    return build(
        "gemma3",
        layers=48,
        embedding=3840,
        heads=16,
        heads_kv=8,
        head_dim=256,
        ff=15360,
        vocab=262144,
        context=131072,
        tied=True,
        extra_info={"gemma3.attention.sliding_window": 1024},
        capabilities=("completion", "vision"),
        vision={
            "block_count": 27,
            "embedding_length": 1152,
            "attention.head_count": 16,
            "image_size": 896,
            "patch_size": 14,
            "num_channels": 3,
        },
    )


def bge_m3() -> Built:
    """bge-m3 (BAAI/bge-m3, XLM-RoBERTa large: 24 layers, 1024 wide, F16), a bert GGUF."""
    b = build(
        "bert",
        layers=24,
        embedding=1024,
        heads=16,
        heads_kv=16,
        ff=4096,
        vocab=250002,
        context=8192,
        tied=True,
        weight_type="F16",
        embed_type="F16",
        capabilities=("embedding",),
        extra_info={"bert.pooling_type": 2, "bert.attention.causal": False},
    )
    del b.body["model_info"]["bert.attention.head_count_kv"]  # BERT GGUFs have no such key
    return b


def qwen25_32b() -> Built:
    """A qwen2-architecture 32B (Qwen/Qwen2.5-32B config)."""
    return build(
        "qwen2", layers=64, embedding=5120, heads=40, heads_kv=8, ff=27648, vocab=152064, context=131072
    )


def qwen3_32b() -> Built:
    """qwen3:32b (Qwen/Qwen3-32B config)."""
    return build(
        "qwen3",
        layers=64,
        embedding=5120,
        heads=64,
        heads_kv=8,
        head_dim=128,
        ff=25600,
        vocab=151936,
        context=40960,
    )
