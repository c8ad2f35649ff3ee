"""An Ollama emulator for tests, benchmarks and ``gpu-router demo``.

Each :class:`EmulatedNode` is a real HTTP server on 127.0.0.1 that answers like the ``ollama serve``
of its ``version`` (default 0.12.6) with its ``OLLAMA_*`` environment: ``/api/tags``, ``/api/ps``,
``/api/show`` (real model_info and tensors), ``/api/version``, ``/api/pull`` (streamed), loads and
unloads through ``/api/generate``, ``/api/chat``, ``/api/embed`` and ``/api/embeddings``.

What follows the version (each rule cites Ollama's source at the tag it comes from):

- the default context (2048, 4096 from v0.6.7, a VRAM tier from v0.15.5), parallel slots (auto
  before v0.10.0, then 1; forced to 1 for embedding models and some architectures), the trained-
  context clamp (v0.9.3), flash attention and the KV cache type, ``/api/ps`` ``context_length``;
- what ``/api/ps`` ``size``/``size_vram`` mean (:mod:`gpu_router.emulator.memory`): the classic
  estimate (before v0.11.11, and for llama-engine models until v0.12.10), measured allocations
  (to v0.2x), llama-server buffer sizes (v0.30 on);
- the scheduler: eviction by keep_alive, ``OLLAMA_MAX_LOADED_MODELS``, partial offload only for a
  first model, and from v0.30 the pre-load check (80% of free VRAM) and evict-all-and-retry (with a
  smaller automatic context) after an out-of-memory load.

Faults (:class:`Fault`) cover broken and hostile servers and exporters: refused, hanging, slow and
dripping connections, huge, gzip-bomb, deeply nested, non-UTF-8 and HTML bodies, redirects, bent
``/api/ps`` figures, failed, busy and out-of-memory loads, pull failures, and GPU health (XID errors,
a lost GPU). Nothing here reads files outside the package or talks to anything but loopback.
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
from gpu_router.emulator.cluster import DEMO_PRIORITY_MODELS, EmulatedCluster, demo_cluster
from gpu_router.emulator.memory import Allocation
from gpu_router.emulator.node import (
    LOAD_PATHS,
    MUTATING_PATHS,
    SERVER_BUSY,
    EmulatedNode,
    Fault,
    RecordedRequest,
    SchedulerEvent,
)
from gpu_router.emulator.versions import Behaviour, OllamaEnv, Version
from gpu_router.emulator.wire import format_rfc3339nano, parse_go_duration, parse_keep_alive

__all__ = [
    "CATALOGUE",
    "DEMO_PRIORITY_MODELS",
    "GPU_MINIMUM_BYTES",
    "LOAD_PATHS",
    "MUTATING_PATHS",
    "SERVER_BUSY",
    "Allocation",
    "Behaviour",
    "EmulatedCluster",
    "EmulatedNode",
    "EmulatorError",
    "Fault",
    "MemoryEstimate",
    "ModelSpec",
    "OllamaEnv",
    "RecordedRequest",
    "SchedulerEvent",
    "Version",
    "demo_cluster",
    "estimate_memory",
    "format_rfc3339nano",
    "normalize_name",
    "parse_go_duration",
    "parse_keep_alive",
    "resolve_model",
]
