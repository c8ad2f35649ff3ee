"""An Ollama emulator for tests, benchmarks and ``gpu-router demo``.

Each :class:`EmulatedNode` is a real HTTP server on 127.0.0.1 that answers like ``ollama serve``
(v0.12 era): ``/api/tags``, ``/api/ps``, ``/api/show``, ``/api/version``, loads and unloads through
``/api/generate``, ``/api/chat``, ``/api/embed`` and ``/api/embeddings``, with simulated GPUs, Ollama's
memory estimate, keep_alive expiry and eviction rules, an optional dcgm-exporter ``/metrics``, faults
on demand and a record of every request. Nothing here reads files or talks to anything but loopback.
"""

from __future__ import annotations

from gpu_router.emulator.catalogue import (
    CATALOGUE,
    GPU_MINIMUM_BYTES,
    EmulatorError,
    MemoryEstimate,
    ModelSpec,
    estimate_memory,
    normalize_name,
    resolve_model,
)
from gpu_router.emulator.node import (
    DEMO_PRIORITY_MODELS,
    MUTATING_PATHS,
    SERVER_BUSY,
    EmulatedCluster,
    EmulatedNode,
    Fault,
    RecordedRequest,
    SchedulerEvent,
    demo_cluster,
    format_rfc3339nano,
    parse_go_duration,
    parse_keep_alive,
)

__all__ = [
    "CATALOGUE",
    "DEMO_PRIORITY_MODELS",
    "GPU_MINIMUM_BYTES",
    "MUTATING_PATHS",
    "SERVER_BUSY",
    "EmulatedCluster",
    "EmulatedNode",
    "EmulatorError",
    "Fault",
    "MemoryEstimate",
    "ModelSpec",
    "RecordedRequest",
    "SchedulerEvent",
    "demo_cluster",
    "estimate_memory",
    "format_rfc3339nano",
    "normalize_name",
    "parse_go_duration",
    "parse_keep_alive",
    "resolve_model",
]
