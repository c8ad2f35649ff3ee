"""A model's shape as Ollama's estimators read it: per-layer heads and per-layer bytes. Pure.

Ollama reads the GGUF itself; gpu-router only has ``/api/show`` (arrays blanked, IQ types
unnamed, sometimes no ``tensors`` at all) and the ``/api/tags`` file size. This module turns what
there is into the numbers ``fs/ggml/ggml.go`` works with, and says what it had to approximate.
"""

from __future__ import annotations

from functools import lru_cache

from gpu_router.records import record
from gpu_router.state import ModelInfo

# A model whose tensors add up to more than this far from its file is another quantisation of the
# same weights (e.g. a show body of the q4_K_M tag next to the q4_0 file): scale, don't trust.
TENSOR_FILE_MISMATCH_RATIO = 0.03
# Bounds that no real GGUF reaches; metadata beyond them is treated as missing.
MAX_LAYERS = 4096
MAX_EMBEDDING = 1 << 20
MAX_HEADS = 1 << 14
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 26


def _bytes_per_param(file_type: int | None) -> float:
    """Bytes per weight of a whole-file type id (llama.cpp LLAMA_FTYPE), for projector files."""
    return {0: 4.0, 1: 2.0, 7: 34 / 32, 2: 18 / 32, 3: 20 / 32, 8: 22 / 32, 9: 24 / 32, 32: 2.0}.get(
        file_type if file_type is not None else 1, 2.0
    )


def projector_file_bytes(info: ModelInfo) -> int:
    """Weights of a separate projector file (llava-style), from its parameter count and type."""
    p = info.projector
    if p is None or p.parameter_count <= 0:
        return 0
    return int(p.parameter_count * _bytes_per_param(p.file_type))


@record
class Shape:
    """Everything the estimators read about a model, with per-layer tuples of length ``layers``."""

    arch: str
    layers: int
    embedding: int
    heads: tuple[int, ...]  # attention heads per layer (GraphSize HeadCount())
    heads_kv: tuple[int, ...]  # KV heads per layer; 0 = a recurrent layer
    heads_max: int
    heads_min: int
    heads_kv_max: int
    heads_kv_min: int
    key_length: int  # EmbeddingHeadCountK: attention.key_length, else E / min heads
    value_length: int
    embedding_heads: int  # EmbeddingHeadCountMax: E / min heads
    vocab: int
    feed_forward: int
    block_bytes: tuple[int, ...]
    token_embd_bytes: int
    output_bytes: int
    output_norm_bytes: int
    has_output: bool
    vision_bytes: int
    mm_bytes: int
    other_bytes: int
    rope_freqs_bytes: int
    engine_input_bytes: int
    engine_output_bytes: int
    projector_file_bytes: int  # a separate projector file (llava-style), estimated
    model_file_bytes: int  # the GGUF of the text model (tags size minus a separate projector)
    weights_source: str  # "tensors", "tensors scaled to the file" or "file size"
    notes: tuple[str, ...] = ()

    @property
    def output_layer_bytes(self) -> int:
        """``memoryLayerOutput``: output_norm plus output, or token_embd with tied embeddings."""
        head = self.output_bytes if self.has_output else self.token_embd_bytes
        return self.output_norm_bytes + head


def _positive(v: int | None, limit: int) -> int | None:
    return v if v is not None and 0 < v <= limit else None


def _per_layer(layers: int, given: tuple[int, ...], scalar: int | None) -> tuple[int, ...] | None:
    """A per-layer head count: the GGUF array (parse_show rebuilds a nulled one), else the scalar."""
    if given:
        vals = [max(0, min(v, MAX_HEADS)) for v in given[:layers]]
        # fs/ggml/ggml.go@v0.12.10 HeadCount(): a one-element array fills every layer; a longer
        # one that is still short leaves the missing layers at the default of 1
        fill = vals[0] if len(vals) == 1 else 1
        return tuple(vals + [fill] * (layers - len(vals)))
    if scalar is not None:
        return (scalar,) * layers
    return None


# The planner sizes the same model for many nodes; the shape depends on the model alone.
@lru_cache(maxsize=1024)
def model_shape(info: ModelInfo, file_bytes: int) -> Shape | None:
    """The shape of ``info`` with ``file_bytes`` on disk; None when the metadata is too thin."""
    layers = _positive(info.block_count, MAX_LAYERS)
    embedding = _positive(info.embedding_length, MAX_EMBEDDING)
    if layers is None or embedding is None or file_bytes <= 0:
        return None
    notes: list[str] = []
    t = info.tensors
    if t is not None and len(t.block_bytes) != layers:
        t = None  # summarised for another block count: unusable
    # HeadCount()/HeadCountKV() default to 1 when the key is missing (fs/ggml/ggml.go@v0.12.10);
    # HeadCountMin is the smallest per-layer value, zeros of recurrent layers included.
    head_scalar = _positive(info.head_count, MAX_HEADS)
    given_key = _positive(info.key_length, MAX_EMBEDDING)
    heads = _per_layer(layers, info.head_count_layers, head_scalar) or (1,) * layers
    heads_min = min(heads)
    heads_max = max(max(heads), 1)
    embedding_heads = embedding // heads_min if heads_min > 0 else 0
    key_length = given_key or embedding_heads
    value_length = _positive(info.value_length, MAX_EMBEDDING) or embedding_heads
    kv_scalar = _positive(info.head_count_kv, MAX_HEADS)
    heads_kv = _per_layer(layers, info.head_count_kv_layers, kv_scalar) or (1,) * layers
    heads_kv_max = max(heads_kv)
    heads_kv_min = min(heads_kv)

    vocab = _positive(info.vocab_size, MAX_VOCAB) or (
        _positive(t.vocab, MAX_VOCAB) if t is not None else None
    )
    if vocab is None:
        vocab = 32000
        notes.append("vocabulary size unknown: 32000 assumed")
    projector = projector_file_bytes(info)
    model_file = max(file_bytes - projector, file_bytes // 2)
    ff = _positive(info.feed_forward_length, MAX_EMBEDDING * 16) or 0

    if t is not None:
        blocks = list(t.block_bytes)
        token_embd, output, output_norm = t.token_embd_bytes, t.output_bytes, t.output_norm_bytes
        vision, mm, other, rope = t.vision_bytes, t.mm_bytes, t.other_bytes, t.rope_freqs_bytes
        engine_in, engine_out = t.engine_input_bytes, t.engine_output_bytes
        source = "tensors"
        unknown = t.unknown_elements
        if unknown:
            # /api/show names IQ* types "unknown": give those tensors what the file leaves
            left = max(model_file - t.known_bytes, 0)
            per_element = left / unknown
            for i, n in enumerate(t.unknown_block_elements):
                blocks[i] += int(n * per_element)
            other += int(t.unknown_other_elements * per_element)
            notes.append("some tensor types are not named by /api/show: sized from the file size")
        total = sum(blocks) + token_embd + output + output_norm + vision + mm + other
        if not unknown and total > 0 and abs(total - model_file) > TENSOR_FILE_MISMATCH_RATIO * model_file:
            ratio = model_file / total
            blocks = [int(b * ratio) for b in blocks]
            token_embd, output, output_norm = (int(x * ratio) for x in (token_embd, output, output_norm))
            vision, mm, other, rope = (int(x * ratio) for x in (vision, mm, other, rope))
            engine_in, engine_out = int(engine_in * ratio), int(engine_out * ratio)
            source = "tensors scaled to the file"
            notes.append(
                f"the tensors add up to {total:,} bytes but the file has {model_file:,}:"
                " another quantisation's layout, scaled to the file"
            )
        has_output = t.has_output
    else:
        # No tensors (Ollama before v0.6.1, some proxies): spread the file over the layers and take
        # the output layer as E x V at the file's average bytes per weight (ollama-api.md 3a).
        params = info.parameter_count or (layers * 12 * embedding * embedding + 2 * embedding * vocab)
        per_param = model_file / max(params, 1)
        token_embd = min(int(embedding * vocab * per_param), model_file // 2)
        per_block = (model_file - token_embd) // layers
        blocks = [per_block] * layers
        output = output_norm = vision = mm = other = rope = 0
        engine_in, engine_out = token_embd, token_embd
        has_output = False
        source = "file size"
        notes.append("no tensor list from /api/show: layer sizes spread from the file size")
    return Shape(
        arch=info.architecture,
        layers=layers,
        embedding=embedding,
        heads=heads,
        heads_kv=heads_kv,
        heads_max=heads_max,
        heads_min=heads_min,
        heads_kv_max=heads_kv_max,
        heads_kv_min=heads_kv_min,
        key_length=key_length,
        value_length=value_length,
        embedding_heads=embedding_heads,
        vocab=vocab,
        feed_forward=ff,
        block_bytes=tuple(blocks),
        token_embd_bytes=token_embd,
        output_bytes=output,
        output_norm_bytes=output_norm,
        has_output=has_output,
        vision_bytes=vision,
        mm_bytes=mm,
        other_bytes=other,
        rope_freqs_bytes=rope,
        engine_input_bytes=engine_in,
        engine_output_bytes=engine_out,
        projector_file_bytes=projector,
        model_file_bytes=model_file,
        weights_source=source,
        notes=tuple(notes),
    )
