"""GGUF tensor arithmetic: bytes per tensor type, tensor sizes and Ollama's layer grouping.

Pure: no I/O. The block sizes are ggml's (``ggml/src/ggml.c`` type_traits, as vendored in Ollama's
``ml/backend/ggml/ggml``); the grouping is ``Tensors.GroupLayers`` in ``fs/ggml/ggml.go@v0.12.10``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# type name -> (elements per block, bytes per block)
GGML_BLOCKS: Mapping[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
    "Q8_K": (256, 292),
    "IQ4_XS": (256, 136),
    "MXFP4": (32, 17),
}

_BLK = re.compile(r"^blk\.(\d+)$")


@dataclass(frozen=True)
class Tensor:
    """One tensor as ``/api/show`` lists it: name, ggml type name and shape (elements per dimension)."""

    name: str
    type: str
    shape: tuple[int, ...]

    @property
    def elements(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def size_bytes(self) -> int:
        """Bytes on disk and in memory (whole blocks)."""
        per_block, block_bytes = GGML_BLOCKS[self.type]
        return -(-self.elements // per_block) * block_bytes

    def as_json(self) -> dict[str, object]:
        """The ``/api/show`` ``tensors`` entry."""
        return {"name": self.name, "type": self.type, "shape": list(self.shape)}


def tensors_from_json(items: Iterable[Mapping[str, object]]) -> tuple[Tensor, ...]:
    """Tensors from ``/api/show`` entries (unknown types raise KeyError when sized, not here)."""
    out: list[Tensor] = []
    for item in items:
        shape = item.get("shape") or []
        assert isinstance(shape, list)
        out.append(Tensor(str(item["name"]), str(item["type"]), tuple(int(x) for x in shape)))
    return tuple(out)


def group_layers(tensors: Iterable[Tensor]) -> dict[str, int]:
    """Bytes per layer group, grouped as Ollama's ``GroupLayers`` does.

    ``blk.N.*`` -> ``blk.N``; ``mm.N.*`` -> ``mm.N``; ``v.blk.N.*`` -> ``v.blk.N``; anything else by its
    first dotted part (``token_embd``, ``output``, ``output_norm``, ``v``, ...).
    """
    groups: dict[str, int] = {}
    for t in tensors:
        parts = t.name.split(".")
        for i, part in enumerate(parts):
            if part in ("blk", "mm") and len(parts) > i + 2:
                parts = [".".join(parts[: i + 2]), *parts[i + 2 :]]
                break
        groups[parts[0]] = groups.get(parts[0], 0) + t.size_bytes
    return groups


@dataclass(frozen=True)
class LayerSizes:
    """A model's weights split the way the memory estimators see them."""

    blocks_bytes: tuple[int, ...]  # blk.0 .. blk.N-1
    output_bytes: int  # output_norm + (output, else token_embd): the "+1" layer
    token_embd_bytes: int  # input embeddings (kept on CPU by the newer engines)
    vision_bytes: int  # a vision tower inside the GGUF (v.*, mm.*)
    other_bytes: int  # everything else (rope_freqs, per-layer embeddings, ...)
    output_tied: bool  # no output tensor: the output layer reuses token_embd

    @property
    def total_bytes(self) -> int:
        """All tensors: close to the GGUF file size (the rest is metadata)."""
        embd = 0 if self.output_tied else self.token_embd_bytes
        return sum(self.blocks_bytes) + self.output_bytes + embd + self.vision_bytes + self.other_bytes


def layer_sizes(tensors: Sequence[Tensor], block_count: int) -> LayerSizes:
    """Split ``tensors`` into per-block sizes, the output layer, input embeddings and the rest."""
    groups = group_layers(tensors)
    blocks = [0] * block_count
    vision = other = 0
    for name, size in groups.items():
        m = _BLK.match(name)
        if m and int(m.group(1)) < block_count:
            blocks[int(m.group(1))] = size
        elif name in ("output", "output_norm", "token_embd"):
            continue
        elif name == "v" or name.startswith(("v.", "mm")):
            vision += size
        else:
            other += size
    has_output = "output" in groups
    output = groups.get("output_norm", 0) + (groups["output"] if has_output else groups.get("token_embd", 0))
    return LayerSizes(
        blocks_bytes=tuple(blocks),
        output_bytes=output,
        token_embd_bytes=groups.get("token_embd", 0),
        vision_bytes=vision,
        other_bytes=other,
        output_tied=not has_output,
    )
