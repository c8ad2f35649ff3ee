"""The emulator's tensors: what its catalogue lists in ``/api/show``, and their layer sizes.

Pure: no I/O. Bytes per tensor type and Ollama's layer grouping come from the sizing engine
(:mod:`gpu_router.memory.ggml`, the port of ``fs/ggml/ggml.go``), so the emulator and the daemon
count a tensor the same way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

from gpu_router.memory.ggml import layer_group, tensor_bytes
from gpu_router.records import record

_BLK = re.compile(r"^blk\.(\d+)$")


@record
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
        """Bytes on disk and in memory, as the sizing engine counts them (the same ggml type table)."""
        size = tensor_bytes(self.type, self.shape)
        if size is None:
            raise KeyError(f"unknown tensor type {self.type!r}")
        return size

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
    """Bytes per layer group, grouped as Ollama's ``GroupLayers`` does (the engine's ``layer_group``)."""
    groups: dict[str, int] = {}
    for t in tensors:
        key = layer_group(t.name)
        groups[key] = groups.get(key, 0) + t.size_bytes
    return groups


@record
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
