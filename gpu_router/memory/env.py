"""A node's ``OLLAMA_*`` settings, parsed as Ollama parses them. Pure.

Ollama reads its environment in ``envconfig/config.go`` (the same rules from v0.5.0 to
v0.33.0-rc2): ``Var`` trims spaces, then quotes; an empty value means "unset"; numbers go through
``strconv.ParseUint`` (base 10, no sign, no units); booleans through ``strconv.ParseBool``.
Where Ollama silently falls back on a bad value (a number it cannot parse keeps the default, a
boolean it cannot parse counts as *true*), this module refuses the value instead: the operator
typed it for us, and sizing with a value Ollama ignores would size the wrong model.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpu_router.records import record

# The settings that change how much memory a model takes, or how many models a node keeps.
SIZING_KEYS: tuple[str, ...] = (
    "OLLAMA_CONTEXT_LENGTH",
    "OLLAMA_NUM_PARALLEL",
    "OLLAMA_KV_CACHE_TYPE",
    "OLLAMA_FLASH_ATTENTION",
    "OLLAMA_GPU_OVERHEAD",
    "OLLAMA_MAX_LOADED_MODELS",
    "OLLAMA_SCHED_SPREAD",
)

# Cache types Ollama's Go engines accept (fs/ggml/ggml.go@v0.20.0 SupportsKVCacheType), and the
# further ones llama-server takes from v0.30.0 (passed through as --cache-type-k/-v).
KV_CACHE_TYPES_GO: tuple[str, ...] = ("f16", "q8_0", "q4_0")
KV_CACHE_TYPES_LLAMA_SERVER: tuple[str, ...] = ("f32", "bf16", "q4_1", "q5_0", "q5_1", "iq4_nl")
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_UINT64_MAX = 2**64 - 1


class EnvValueError(ValueError):
    """An ``ollama_env`` entry Ollama would reject or silently ignore."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


@record
class OllamaEnv:
    """The sizing-relevant ``OLLAMA_*`` settings of one node; None = unset = Ollama's default."""

    context_length: int | None = None
    num_parallel: int | None = None
    kv_cache_type: str | None = None  # lower case, as Ollama compares it
    flash_attention: bool | None = None
    gpu_overhead_bytes: int | None = None
    max_loaded_models: int | None = None
    sched_spread: bool | None = None
    unused: tuple[str, ...] = ()  # other OLLAMA_* names given: accepted, not used for sizing


def _text(name: str, value: object) -> str:
    """The value as the environment would carry it, trimmed as envconfig.Var trims it."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = str(int(value)) if value.is_integer() else repr(value)
    elif isinstance(value, str):
        text = value
    elif value is None:
        text = ""
    else:
        raise EnvValueError(name, f"expected a string or a number, got {type(value).__name__}")
    return text.strip().strip("\"'")


def _uint(name: str, value: object, what: str, limit: int = _UINT64_MAX) -> int | None:
    if isinstance(value, bool):
        raise EnvValueError(name, f"expected {what}, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise EnvValueError(name, f"expected {what}, got {value!r}")
    text = _text(name, value)
    if not text:
        return None
    # strconv.ParseUint(s, 10, 64): ASCII digits only, underscores only with base 0
    if not text.isascii() or not text.isdigit():
        raise EnvValueError(
            name, f"{text!r} is not a whole number; Ollama reads digits only ({what}) and ignores the rest"
        )
    n = int(text)
    if n > limit:
        raise EnvValueError(name, f"{text} is out of range for Ollama")
    return n


def _bool(name: str, value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = _text(name, value)
    if not text:
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise EnvValueError(
        name,
        f"{text!r} is not a boolean Ollama reads (1, t, true, TRUE, True / 0, f, false, FALSE, False);"
        " Ollama would treat it as true",
    )


def _kv_type(name: str, value: object) -> str | None:
    text = _text(name, value).lower()
    if not text:
        return None
    if text in KV_CACHE_TYPES_GO or text in KV_CACHE_TYPES_LLAMA_SERVER:
        return text
    raise EnvValueError(
        name,
        f"{text!r} is not a cache type Ollama knows: {', '.join(KV_CACHE_TYPES_GO)}"
        f" (and from v0.30 also {', '.join(KV_CACHE_TYPES_LLAMA_SERVER)})",
    )


def parse_ollama_env(values: Mapping[str, object]) -> OllamaEnv:
    """Parse ``ollama_env`` (top-level and per-node keys already merged) into an ``OllamaEnv``.

    Raises EnvValueError for a name that is not ``OLLAMA_*`` or a value Ollama would not honour.
    """
    parsed: dict[str, object] = {}
    unused: list[str] = []
    for raw_name, value in values.items():
        if not isinstance(raw_name, str):
            raise EnvValueError(str(raw_name), "setting names are strings")
        name = raw_name.strip()
        if not name.startswith("OLLAMA_"):
            raise EnvValueError(name, "only Ollama's own OLLAMA_* settings belong in ollama_env")
        if name == "OLLAMA_CONTEXT_LENGTH":
            parsed["context_length"] = _uint(name, value, "a number of tokens, e.g. 8192", 2**31 - 1)
        elif name == "OLLAMA_NUM_PARALLEL":
            parsed["num_parallel"] = _uint(name, value, "a number of parallel requests, e.g. 2", 2**31 - 1)
        elif name == "OLLAMA_MAX_LOADED_MODELS":
            parsed["max_loaded_models"] = _uint(name, value, "a number of models, e.g. 3", 2**31 - 1)
        elif name == "OLLAMA_GPU_OVERHEAD":
            parsed["gpu_overhead_bytes"] = _uint(name, value, "bytes per GPU, e.g. 536870912")
        elif name == "OLLAMA_KV_CACHE_TYPE":
            parsed["kv_cache_type"] = _kv_type(name, value)
        elif name == "OLLAMA_FLASH_ATTENTION":
            parsed["flash_attention"] = _bool(name, value)
        elif name == "OLLAMA_SCHED_SPREAD":
            parsed["sched_spread"] = _bool(name, value)
        else:
            unused.append(name)
    return OllamaEnv(
        context_length=_opt_int(parsed.get("context_length")),
        num_parallel=_opt_int(parsed.get("num_parallel")),
        kv_cache_type=_opt_str(parsed.get("kv_cache_type")),
        flash_attention=_opt_bool(parsed.get("flash_attention")),
        gpu_overhead_bytes=_opt_int(parsed.get("gpu_overhead_bytes")),
        max_loaded_models=_opt_int(parsed.get("max_loaded_models")),
        sched_spread=_opt_bool(parsed.get("sched_spread")),
        unused=tuple(sorted(set(unused))),
    )


def _opt_int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _opt_str(v: object) -> str | None:
    return v if isinstance(v, str) else None


def _opt_bool(v: object) -> bool | None:
    return v if isinstance(v, bool) else None
