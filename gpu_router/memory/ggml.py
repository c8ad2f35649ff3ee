"""GGML tensor types and the layer grouping Ollama sizes models with. Pure: no I/O.

Ported from ``fs/ggml/ggml.go@v0.12.10`` (``TensorType.BlockSize``/``TypeSize``, ``Tensor.Size``,
``Tensors.GroupLayers``) and ``fs/ggml/type.go@v0.20.0`` (the type ids and the names
``/api/show`` prints). ``/api/show`` names every IQ* type ``unknown`` (``TensorType.String``
has no case for them), so a tensor can arrive with a type this module cannot size: callers
get ``None`` for it and spread what the file size leaves over such tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from gpu_router.records import record
from gpu_router.state import TensorSummary

# GGML type id -> (name, elements per block, bytes per block). fs/ggml/type.go@v0.20.0 numbers the
# types; the sizes are fs/ggml/ggml.go@v0.12.10 TypeSize with BlockSize 1, 32 or 256.
_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 2 + 16),
    3: ("Q4_1", 32, 2 + 2 + 16),
    6: ("Q5_0", 32, 2 + 4 + 16),
    7: ("Q5_1", 32, 2 + 2 + 4 + 16),
    8: ("Q8_0", 32, 2 + 32),
    9: ("Q8_1", 32, 2 + 2 + 32),
    10: ("Q2_K", 256, 256 // 16 + 256 // 4 + 2 + 2),
    11: ("Q3_K", 256, 256 // 8 + 256 // 4 + 12 + 2),
    12: ("Q4_K", 256, 2 + 2 + 12 + 256 // 2),
    13: ("Q5_K", 256, 2 + 2 + 12 + 256 // 8 + 256 // 2),
    14: ("Q6_K", 256, 256 // 2 + 256 // 4 + 256 // 16 + 2),
    15: ("Q8_K", 256, 4 + 256 + 2 * 256 // 16),
    16: ("IQ2_XXS", 256, 2 + 2 * 256 // 8),
    17: ("IQ2_XS", 256, 2 + 2 * 256 // 8 + 256 // 32),
    18: ("IQ3_XXS", 256, 2 + 256 // 4 + 256 // 8),
    19: ("IQ1_S", 256, 2 + 256 // 8 + 256 // 16),
    20: ("IQ4_NL", 32, 2 + 16),
    21: ("IQ3_S", 256, 2 + 256 // 4 + 256 // 8 + 256 // 32 + 4),
    22: ("IQ2_S", 256, 2 + 256 // 4 + 256 // 16),
    23: ("IQ4_XS", 256, 2 + 2 + 256 // 2 + 256 // 64),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 256 // 8 + 256 // 16 + 256 // 32),
    30: ("BF16", 1, 2),
    # Ollama kept MXFP4 at id 4 (its own, older numbering) and at 39 (upstream ggml's).
    4: ("MXFP4", 32, 1 + 16),
    39: ("MXFP4", 32, 1 + 16),
}
_BY_NAME: dict[str, tuple[int, int]] = {name: (block, size) for name, block, size in _TYPES.values()}

# KV cache element sizes as ggml stores them (bytes per element); the classic estimator rounds
# the quantised ones to 1 and 0.5 (fs/ggml/ggml.go@v0.12.10 kvCacheBytesPerElement).
KV_TYPE_BYTES: dict[str, float] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
    "iq4_nl": 18 / 32,
}


def type_block(type_name: str | int) -> tuple[int, int] | None:
    """(elements per block, bytes per block) of a tensor type given by name or id; None if unknown."""
    if isinstance(type_name, bool):
        return None
    if isinstance(type_name, int):
        entry = _TYPES.get(type_name)
        return (entry[1], entry[2]) if entry else None
    return _BY_NAME.get(type_name.strip().upper())


def tensor_bytes(type_name: str | int, shape: Sequence[int]) -> int | None:
    """Bytes of one tensor as ``Tensor.Size`` computes them: elements x type size / block size."""
    block = type_block(type_name)
    if block is None:
        return None
    elements = 1
    for n in shape:
        elements *= n
    return elements * block[1] // block[0]


_BLOCK = re.compile(r"^blk\.(\d+)\.")


def layer_group(name: str) -> str:
    """The ``GroupLayers`` key of a tensor name: ``blk.N``, ``v.blk.N``, ``mm.N``, ``token_embd``...

    ``fs/ggml/ggml.go@v0.12.10`` GroupLayers: split on dots; where a part is ``blk`` or ``mm`` and two
    more parts follow, everything up to the number is the group; otherwise the first part is.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in ("blk", "mm"):
            if len(parts) > i + 2:
                return ".".join(parts[: i + 2])
            break
    return parts[0]


def block_index(name: str) -> int | None:
    """N for a text-model tensor ``blk.N.*``; None for everything else."""
    m = _BLOCK.match(name)
    return int(m.group(1)) if m else None


@record
class Tensor:
    """One entry of ``/api/show`` ``tensors``, reduced to what sizing needs."""

    name: str
    type_name: str
    shape: tuple[int, ...]

    @property
    def elements(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n


def group_bytes(tensors: Iterable[Tensor], sizes: Mapping[str, int]) -> dict[str, int]:
    """Bytes per ``GroupLayers`` group, given each tensor's size by name."""
    out: dict[str, int] = {}
    for t in tensors:
        key = layer_group(t.name)
        out[key] = out.get(key, 0) + sizes.get(t.name, 0)
    return out


_INPUT_PARTS = frozenset({"position_embd", "token_embd", "token_norm_embd", "token_types"})
_OUTPUT_PARTS = frozenset(
    {
        "cls",
        "output",
        "output_norm",
        "altup_proj",
        "altup_unembd_proj",
        "per_layer_token_embd",
        "per_layer_model_proj",
        "per_layer_proj_norm",
    }
)
_PER_LAYER_PARTS = frozenset({"rope_freqs", "rope_factors_long", "rope_factors_short"})
_FIRST_NUMBER = re.compile(r"\d+")


def _engine_place(name: str) -> str:
    """Where the Ollama engine's backend puts a tensor: "input", "output", "per_layer" or "layer".

    ``ml/backend/ggml/ggml.go@v0.20.0`` New: embeddings stay on the CPU (InputWeights); the output
    head, norms, per-layer embeddings and the whole vision/audio tower go with the output layer;
    rope frequency tables are copied into every layer; anything numbered goes to that layer.
    """
    parts = name.split(".")
    if _INPUT_PARTS.intersection(parts):
        return "input"
    if _OUTPUT_PARTS.intersection(parts) or name.startswith(("v.", "mm.", "s.")):
        return "output"
    if _PER_LAYER_PARTS.intersection(parts):
        return "per_layer"
    return "layer" if _FIRST_NUMBER.search(name) else "input"


def summarize_tensors(tensors: Sequence[Tensor], block_count: int) -> TensorSummary:
    """Reduce a tensor list to the per-group byte sizes the estimators need."""
    blocks = [0] * block_count
    unknown_blocks = [0] * block_count
    q_w = [0] * block_count
    k_w = [0] * block_count
    v_w = [0] * block_count
    cross: set[int] = set()
    token_embd = output = output_norm = vision = mm = other = rope = 0
    engine_input = engine_output = 0
    unknown_other = 0
    has_output = False
    vocab: int | None = None
    gate_exps = gate0 = qkv_bias = rope_elements = 0
    class_embd = False
    for t in tensors:
        size = tensor_bytes(t.type_name, t.shape)
        group = layer_group(t.name)
        index = block_index(t.name)
        if group == "output":
            has_output = True
        if index is not None and index < block_count:
            if size is None:
                unknown_blocks[index] += t.elements
            else:
                blocks[index] += size
            suffix = t.name.split(".", 2)[2] if t.name.count(".") >= 2 else ""
            width = t.shape[1] if len(t.shape) > 1 else 0
            if suffix == "attn_q.weight":
                q_w[index] = width
            elif suffix == "attn_k.weight":
                k_w[index] = width
            elif suffix == "attn_v.weight":
                v_w[index] = width
            elif suffix.startswith("cross_attn_"):
                cross.add(index)
            if index == 0 and suffix == "ffn_gate_exps.weight":
                gate_exps = size or 0
            elif index == 0 and suffix == "ffn_gate.0.weight":
                gate0 = width
            elif index == 0 and suffix == "attn_qkv.bias" and t.shape:
                qkv_bias = t.shape[0]
        elif size is None:
            unknown_other += t.elements
        elif group == "token_embd":
            token_embd += size
            if t.name == "token_embd.weight" and len(t.shape) > 1:
                vocab = t.shape[1]
        elif group == "output":
            output += size
        elif group == "output_norm":
            output_norm += size
        elif group == "v" or group.startswith("v."):
            vision += size
            class_embd = class_embd or t.name == "v.class_embd"
        elif group.startswith("mm"):
            mm += size
        else:
            other += size
            if group == "rope_freqs":
                rope += size
                rope_elements += t.elements
        place = _engine_place(t.name)
        if size is not None and place == "input":
            engine_input += size
        elif size is not None and place == "output":
            engine_output += size
    return TensorSummary(
        block_bytes=tuple(blocks),
        token_embd_bytes=token_embd,
        output_bytes=output,
        output_norm_bytes=output_norm,
        vision_bytes=vision,
        mm_bytes=mm,
        other_bytes=other,
        rope_freqs_bytes=rope,
        has_output=has_output,
        engine_input_bytes=engine_input,
        engine_output_bytes=engine_output,
        unknown_block_elements=tuple(unknown_blocks) if any(unknown_blocks) else (),
        unknown_other_elements=unknown_other,
        attn_q_widths=tuple(q_w) if any(q_w) else (),
        attn_k_widths=tuple(k_w) if any(k_w) else (),
        attn_v_widths=tuple(v_w) if any(v_w) else (),
        vocab=vocab,
        ffn_gate_exps_bytes=gate_exps,
        ffn_gate0_width=gate0,
        attn_qkv_bias_len=qkv_bias,
        rope_freqs_elements=rope_elements,
        class_embd=class_embd,
        cross_attention_layers=tuple(sorted(cross)),
    )
