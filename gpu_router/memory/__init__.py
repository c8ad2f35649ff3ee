"""How much VRAM a node's own Ollama will need for a model: per version, per setting, per GPU.

Pure: no I/O and no logging. The lead-facing API:

- ``NodeProfile`` (version, GPU sizes, ``OllamaEnv``) and ``estimate_memory(info, file_bytes,
  node, num_ctx=...)`` -> ``MemoryEstimate`` (or None when the metadata is too thin);
- ``need_from_observed`` turns a real ``/api/ps`` size into the fit need of the same era;
- ``preload_check_passes`` predicts Ollama's own pre-load eviction (v0.30+);
- ``max_loaded_models`` is how many models a node keeps;
- ``parse_ollama_env`` / ``OllamaEnv`` / ``EnvValueError`` / ``SIZING_KEYS`` for ``ollama_env``;
- ``Era`` / ``era_of`` / ``parse_version`` for the node's engine era;
- ``estimate_gpu_layers`` / ``ClassicInputs`` / ``classic_inputs``: the classic layer placement
  for partial offloads (what ``/api/ps`` showed as ``size``/``size_vram`` before v0.12.11).
"""

from __future__ import annotations

from gpu_router.memory.classic import ClassicInputs, GpuLayers, estimate_gpu_layers
from gpu_router.memory.engine import (
    MemoryEstimate,
    NodeProfile,
    classic_inputs,
    estimate_memory,
    max_loaded_models,
    need_from_observed,
    preload_check_passes,
)
from gpu_router.memory.env import SIZING_KEYS, EnvValueError, OllamaEnv, parse_ollama_env
from gpu_router.memory.version import Era, era_of, parse_version

__all__ = [
    "SIZING_KEYS",
    "ClassicInputs",
    "EnvValueError",
    "Era",
    "GpuLayers",
    "MemoryEstimate",
    "NodeProfile",
    "OllamaEnv",
    "classic_inputs",
    "era_of",
    "estimate_gpu_layers",
    "estimate_memory",
    "max_loaded_models",
    "need_from_observed",
    "parse_ollama_env",
    "parse_version",
    "preload_check_passes",
]
