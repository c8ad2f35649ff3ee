"""Ollama versions, engine eras and the per-version facts the estimators depend on. Pure.

Boundaries, each read from the Ollama source (bare repository, ``git tag --contains``):

- v0.11.11 (eb10390de "llm: Enable new memory estimates by default"): models the Ollama engine
  runs (``OllamaEngineRequired``) are placed from measured allocations (``ollamaServer.Load``);
  llama-engine models keep the classic ``llm/memory.go`` estimate.
- v0.12.11 (f560bd0 "llm: Use Ollama engine memory layouts for both old and new engines"):
  ``llm/memory.go`` is gone; the llama engine synthesises a layout from ``GraphSize``.
- v0.30.0 (9db4bdb "runner: Remove CGO engines, use llama-server exclusively"): every GGUF runs
  in llama.cpp's ``llama-server``, which places layers itself (``--fit``).

A release candidate is taken as its release (``0.30.0-rc2`` is 0.30.0): the features that define
the eras landed before the first candidate of each release.
"""

from __future__ import annotations

import enum
import re

from gpu_router.records import record

Version = tuple[int, int, int]

_VERSION = re.compile(r"^\s*v?(\d{1,4})\.(\d{1,4})(?:\.(\d{1,6}))?(?:[-+._~ ].*)?\s*$")


def parse_version(text: str | None) -> Version | None:
    """``"0.12.6"``, ``"v0.15.5"``, ``"0.30.0-rc2"`` -> (major, minor, patch); None if unusable.

    ``0.0.0`` is what a source build without a version stamp reports; it says nothing about the
    code, so it is unknown too.
    """
    if not isinstance(text, str):
        return None
    m = _VERSION.match(text)
    if not m:
        return None
    v = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    return None if v == (0, 0, 0) else v


class Era(str, enum.Enum):
    """How a node's Ollama decides where a model's memory goes."""

    CLASSIC = "classic"  # < v0.11.11: llm/memory.go estimateGPULayers for every model
    MIXED = "mixed"  # v0.11.11 - v0.12.10: Ollama-engine models measured, llama-engine ones classic
    LAYOUT = "layout"  # v0.12.11 - v0.29: memory layouts for both engines (llm/server.go)
    LLAMA_SERVER = "llama-server"  # >= v0.30.0: llama.cpp llama-server, placed by --fit

    @property
    def observation_label(self) -> str:
        """The era letter ``ollama-observations/README.md`` uses: A, B or C."""
        return {"classic": "A", "mixed": "B", "layout": "B", "llama-server": "C"}[self.value]


MIXED_SINCE: Version = (0, 11, 11)
LAYOUT_SINCE: Version = (0, 12, 11)
LLAMA_SERVER_SINCE: Version = (0, 30, 0)
# The newest version these rules were read from; an unknown version is taken to be this one.
NEWEST_KNOWN: Version = (0, 33, 0)


def era_of(version: str | Version | None) -> Era:
    """The engine era of an Ollama version; an unknown version is taken as the newest era."""
    v = version if isinstance(version, tuple) else parse_version(version)
    if v is None:
        return Era.LLAMA_SERVER
    if v >= LLAMA_SERVER_SINCE:
        return Era.LLAMA_SERVER
    if v >= LAYOUT_SINCE:
        return Era.LAYOUT
    if v >= MIXED_SINCE:
        return Era.MIXED
    return Era.CLASSIC


def _since(table: dict[str, Version], arch: str, v: Version) -> bool:
    first = table.get(arch)
    return first is not None and v >= first


# fs/ggml/ggml.go OllamaEngineRequired: the first release whose list names each architecture,
# read tag by tag from v0.6.0 to v0.29 (the list is gone with the Go engines at v0.30.0).
_OLLAMA_ENGINE_SINCE: dict[str, Version] = {
    "gemma3": (0, 6, 0),
    "mistral3": (0, 6, 5),
    "llama4": (0, 6, 7),
    "mllama": (0, 7, 0),
    "qwen25vl": (0, 7, 0),
    "gemma3n": (0, 9, 3),
    "gptoss": (0, 11, 0),
    "gpt-oss": (0, 11, 5),
    "qwen3": (0, 12, 0),
    "qwen3moe": (0, 12, 2),
    "qwen3vl": (0, 12, 7),
    "qwen3vlmoe": (0, 12, 7),
    "deepseek2": (0, 13, 0),
    "deepseekocr": (0, 13, 0),
    "nomic-bert": (0, 13, 1),
    "olmo3": (0, 13, 4),
    "bert": (0, 13, 5),
    "glm4moelite": (0, 14, 3),
    "lfm2": (0, 14, 3),
    "glmocr": (0, 15, 5),
    "qwen3next": (0, 15, 5),
    "lfm2moe": (0, 17, 1),
    "nemotron_h": (0, 17, 1),
    "nemotron_h_moe": (0, 17, 1),
    "qwen35": (0, 17, 1),
    "qwen35moe": (0, 17, 1),
    "gemma4": (0, 20, 0),
    "laguna": (0, 22, 0),
    "nemotron_h_omni": (0, 22, 0),
}

# fs/ggml/ggml.go FlashAttention(): architectures with flash attention on by default, from the
# release that added each (the list exists from v0.11.8; the default is honoured from v0.12.4,
# fdb109469 "llm: Allow overriding flash attention setting").
_FLASH_DEFAULT_SINCE: dict[str, Version] = {
    "gptoss": (0, 11, 8),
    "gpt-oss": (0, 11, 8),
    "qwen3": (0, 12, 4),
    "qwen3moe": (0, 12, 4),
    "gemma3": (0, 12, 6),
    "qwen3vl": (0, 12, 8),
    "qwen3vlmoe": (0, 12, 8),
    "mistral3": (0, 13, 2),
    "olmo3": (0, 13, 4),
    "bert": (0, 13, 5),
    "glm4moelite": (0, 14, 3),
    "lfm2": (0, 14, 3),
    "glmocr": (0, 15, 5),
    "qwen3next": (0, 15, 5),
    "lfm2moe": (0, 17, 1),
    "nemotron_h": (0, 17, 1),
    "nemotron_h_moe": (0, 17, 1),
    "qwen35": (0, 17, 1),
    "qwen35moe": (0, 17, 1),
    "gemma4": (0, 20, 4),
    "nemotron_h_omni": (0, 22, 0),
}
FLASH_DEFAULT_HONOURED_SINCE: Version = (0, 12, 4)

# server/sched.go load: families Ollama forces to one parallel slot. The union over releases: a
# family only runs on releases that know it (v0.12.10 lists mllama, qwen3vl, qwen3vlmoe; v0.30.0
# adds qwen35, qwen35moe, qwen3next, lfm2, lfm2moe, nemotron_h, nemotron_h_moe, nemotron_h_omni).
SINGLE_SLOT_FAMILIES = frozenset(
    {
        "mllama",
        "qwen3vl",
        "qwen3vlmoe",
        "qwen35",
        "qwen35moe",
        "qwen3next",
        "lfm2",
        "lfm2moe",
        "nemotron_h",
        "nemotron_h_moe",
        "nemotron_h_omni",
    }
)


def ollama_engine_runs(arch: str, v: Version, *, separate_projector: bool) -> bool:
    """Whether the Ollama (Go) engine runs ``arch`` on version ``v`` (before v0.30.0).

    ``llm/server.go@v0.20.0`` NewLlamaServer: OllamaEngineRequired, unless the model has a separate
    projector file ("split vision models aren't supported"), which falls back to the llama engine.
    v0.12.5 briefly sent qwen3 back to the llama runner (3d32249c7, reverted in v0.12.6).
    """
    if separate_projector or v >= LLAMA_SERVER_SINCE:
        return False
    if arch == "qwen3" and v[:3] == (0, 12, 5):
        return False
    return _since(_OLLAMA_ENGINE_SINCE, arch, v)


def flash_attention_default(arch: str, v: Version) -> bool:
    """Ollama's own flash-attention default for ``arch`` when OLLAMA_FLASH_ATTENTION is unset."""
    return v >= FLASH_DEFAULT_HONOURED_SINCE and _since(_FLASH_DEFAULT_SINCE, arch, v)


@record
class VersionFacts:
    """What one Ollama version does, as far as sizing goes."""

    version: Version
    known: bool  # False: the node's version was unknown and the newest rules are assumed

    @property
    def era(self) -> Era:
        """The engine era."""
        return era_of(self.version)


def facts(version: str | None) -> VersionFacts:
    """Parse a node's version; unknown or garbage means the newest rules."""
    v = parse_version(version)
    return VersionFacts(v or NEWEST_KNOWN, v is not None)


def format_version(v: Version) -> str:
    """``(0, 12, 6)`` -> ``"v0.12.6"``."""
    return "v{}.{}.{}".format(*v)
