"""The classic estimator: ``llm/memory.go`` ``estimateGPULayers``, faithfully. Pure.

Ported from ``llm/memory.go@v0.12.10`` (identical in what it computes to v0.11.6, the version the
era-A observations were taken with; ``git diff v0.11.6 v0.12.10 -- llm/memory.go`` only changes the
types and the flash-attention inputs). Every Ollama model before v0.11.11, and llama-engine models
until v0.12.10, were placed with it, and ``/api/ps`` ``size``/``size_vram`` were its TotalSize and
VRAMSize: reproducing it reproduces what those nodes reported.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpu_router.records import record
from gpu_router.state import MIB

# The per-GPU minimum (ml/device.go@v0.12.10 MinimumMemory; discover/gpu.go@v0.11.6
# cudaMinimumMemory/rocmMinimumMemory, discover/gpu_darwin.go metalMinimumMemory).
CUDA_MINIMUM_BYTES = 457 * MIB
ROCM_MINIMUM_BYTES = 457 * MIB
METAL_MINIMUM_BYTES = 512 * MIB


def minimum_memory(library: str) -> int:
    """The memory Ollama sets aside on every GPU of ``library`` before placing a layer."""
    return METAL_MINIMUM_BYTES if library.lower() == "metal" else CUDA_MINIMUM_BYTES


@record
class ClassicInputs:
    """What ``estimateGPULayers`` works with, already computed from the model."""

    block_bytes: tuple[int, ...]  # weights of blk.0 .. blk.N-1
    kv: tuple[int, ...]  # KV per layer (GraphSize)
    graph_partial: int
    graph_full: int
    output_bytes: int  # memoryLayerOutput: output_norm + output (or token_embd)
    gpu_zero_bytes: int = 0  # llama-engine projector weights, on the first GPU only
    last_layer_extra_bytes: int = 0  # Ollama-engine projector weights + graph, with the output layer
    minimum_bytes: int = CUDA_MINIMUM_BYTES
    overhead_bytes: int = 0  # OLLAMA_GPU_OVERHEAD
    metal: bool = False


@record
class GpuLayers:
    """``MemoryEstimate``: how many layers go to GPUs, and the sizes ``/api/ps`` then shows."""

    layers: int  # layers offloaded, the output layer counting as one
    vram_bytes: int  # VRAMSize: /api/ps size_vram
    total_bytes: int  # TotalSize: /api/ps size
    gpu_bytes: tuple[int, ...]  # allocation per GPU (0 for an unused one)
    tensor_split: tuple[int, ...]
    graph_bytes: int  # the graph applied: full when everything is offloaded, else partial
    fully_loaded: bool


def estimate_gpu_layers(
    free_per_gpu_bytes: Sequence[int], inputs: ClassicInputs, num_gpu: int = -1
) -> GpuLayers:
    """``estimateGPULayers(gpus, f, projectors, opts, numParallel)`` for GPUs of one library.

    ``free_per_gpu_bytes`` in the order Ollama tried them (it sorts by free memory, largest first);
    ``num_gpu`` is ``options.num_gpu`` (-1 = as many layers as fit). An empty list is a CPU load.
    """
    gpus = list(free_per_gpu_bytes)
    layers = len(inputs.block_bytes)
    overhead = inputs.overhead_bytes
    graph_partial, graph_full = inputs.graph_partial, inputs.graph_full
    # on metal there's no partial offload overhead; multi-GPU always uses the partial graph
    if inputs.metal:
        graph_partial = graph_full
    elif len(gpus) > 1:
        graph_full = graph_partial
    graph_max = max(graph_partial, graph_full)

    layer_size = 0
    if layers:
        layer_size = inputs.block_bytes[0] + (inputs.kv[0] if inputs.kv else 0)
    overflow = 0
    layer_count = 0
    tensor_split = [0] * len(gpus)
    allocations = [0] * len(gpus)
    with_space: list[int] = []
    for i, free in enumerate(gpus):
        gzo = inputs.gpu_zero_bytes if not with_space else 0
        # only GPUs that fit the graph, the minimum, the layer buffer and at least one more layer
        if free < overhead + gzo + graph_max + inputs.minimum_bytes + 2 * layer_size:
            continue
        with_space.append(i)
        allocations[i] += inputs.minimum_bytes + layer_size
    if with_space:
        allocations[with_space[0]] += inputs.gpu_zero_bytes
    else:
        overflow += inputs.gpu_zero_bytes

    for i in range(layers - 1, -1, -1):
        layer_size = inputs.block_bytes[i] + inputs.kv[i]
        if num_gpu >= 0 and layer_count >= num_gpu:
            overflow += layer_size
            continue
        j = len(with_space)
        while j > 0:
            g = with_space[i % j]
            used = allocations[g] + graph_max
            if gpus[g] > overhead + used + layer_size:
                allocations[g] += layer_size
                tensor_split[g] += 1
                layer_count += 1
                break
            del with_space[i % j]
            j -= 1
        if not with_space:
            overflow += layer_size
    fully_loaded = layer_count >= layers

    last = inputs.output_bytes + inputs.last_layer_extra_bytes
    if last > 0:
        if num_gpu < 0 or layer_count < num_gpu:
            for j in range(len(with_space), 0, -1):
                g = with_space[layer_count % j]
                used = allocations[g] + graph_max
                if gpus[g] > overhead + used + last:
                    allocations[g] += last
                    tensor_split[g] += 1
                    layer_count += 1
                    break
        if layer_count < layers + 1:
            fully_loaded = False
            overflow += last

    graph = graph_full if fully_loaded else graph_partial
    for i in range(len(gpus)):
        if tensor_split[i] > 0:
            allocations[i] += graph
    partial_total = sum(allocations)
    total = partial_total + overflow
    if not gpus or layer_count == 0:
        return GpuLayers(0, 0, total, tuple([0] * len(gpus)), tuple([0] * len(gpus)), 0, False)
    return GpuLayers(
        layers=layer_count,
        vram_bytes=partial_total,
        total_bytes=total,
        gpu_bytes=tuple(allocations),
        tensor_split=tuple(tensor_split),
        graph_bytes=graph,
        fully_loaded=fully_loaded,
    )


def full_offload_need(inputs: ClassicInputs, gpu_count: int = 1) -> int:
    """Free VRAM (summed over ``gpu_count`` GPUs) that lets ``estimateGPULayers`` place every layer.

    One GPU: minimum + buffer layer + every layer with its KV + output layer + projector, plus the
    larger graph and OLLAMA_GPU_OVERHEAD, which the fit test keeps free. More GPUs: each pays the
    minimum, the buffer layer, the overhead and (partial, as multi-GPU uses it) graph again, and
    each further GPU one layer of slack: layers are whole, and the output layer lands on one GPU.
    """
    layers = len(inputs.block_bytes)
    buffer = inputs.block_bytes[0] + inputs.kv[0] if layers else 0
    body = sum(inputs.block_bytes) + sum(inputs.kv) + inputs.output_bytes + inputs.last_layer_extra_bytes
    if gpu_count <= 1:
        graph = max(inputs.graph_partial, inputs.graph_full)
        return inputs.overhead_bytes + inputs.minimum_bytes + buffer + inputs.gpu_zero_bytes + body + graph
    graph = inputs.graph_full if inputs.metal else inputs.graph_partial
    per_gpu = inputs.overhead_bytes + inputs.minimum_bytes + buffer + graph
    largest = max(
        max((b + k for b, k in zip(inputs.block_bytes, inputs.kv, strict=False)), default=0),
        inputs.output_bytes + inputs.last_layer_extra_bytes,
    )
    return gpu_count * per_gpu + inputs.gpu_zero_bytes + body + (gpu_count - 1) * largest


def full_offload_size(inputs: ClassicInputs) -> int:
    """``/api/ps`` ``size`` (= ``size_vram``) of the model fully on one GPU: TotalSize."""
    layers = len(inputs.block_bytes)
    buffer = inputs.block_bytes[0] + inputs.kv[0] if layers else 0
    graph = inputs.graph_full
    return (
        inputs.minimum_bytes
        + buffer
        + inputs.gpu_zero_bytes
        + sum(inputs.block_bytes)
        + sum(inputs.kv)
        + inputs.output_bytes
        + inputs.last_layer_extra_bytes
        + graph
    )
