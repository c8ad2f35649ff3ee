"""How each Ollama version behaves: defaults, eras and per-model rules, read from Ollama's source.

Pure: no I/O. A :class:`Behaviour` is one ``ollama serve`` (version + ``OLLAMA_*`` environment +
its GPUs) and answers the questions the emulated scheduler asks. Every rule cites the file and the
first tag that has it; between the cited tags the behaviour is taken as unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from gpu_router.emulator.catalogue import EmulatorError, ModelSpec
from gpu_router.emulator.memory import CLASSIC, LLAMA_SERVER, MEASURED
from gpu_router.memory.env import SIZING_KEYS
from gpu_router.records import record
from gpu_router.state import GIB

KNOWN_ENV = (*SIZING_KEYS, "OLLAMA_KEEP_ALIVE", "OLLAMA_MAX_QUEUE", "OLLAMA_NEW_ENGINE")


@record(order=True)
class Version:
    """An Ollama release number; a pre-release (``0.30.0-rc21``) counts as its release."""

    major: int
    minor: int
    patch: int

    @classmethod
    def parse(cls, text: str) -> Version:
        """``0.12.6``, ``v0.12.6`` or ``0.30.0-rc21``; raises EmulatorError otherwise."""
        m = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)(?:[-+].*)?", text.strip())
        if not m:
            raise EmulatorError(f"version {text!r} is not like 0.12.6")
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def v(text: str) -> Version:
    """Shorthand for :meth:`Version.parse`."""
    return Version.parse(text)


_TRUE = ("1", "t", "true", "y", "yes", "on")  # envconfig.Bool uses strconv.ParseBool
_FALSE = ("0", "f", "false", "n", "no", "off")


def _bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise EmulatorError(f"{name}={raw!r} is not a boolean")


def _uint(name: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise EmulatorError(f"{name}={raw!r} is not a whole number") from None
    if value < 0:
        raise EmulatorError(f"{name}={raw!r} must not be negative")
    return value


@record
class OllamaEnv:
    """The ``OLLAMA_*`` settings the emulator honours (``envconfig/config.go``); 0/None = unset."""

    context_length: int = 0
    num_parallel: int = 0
    kv_cache_type: str = ""
    flash_attention: bool | None = None
    gpu_overhead_bytes: int = 0
    max_loaded_models: int = 0
    sched_spread: bool = False
    keep_alive: str | None = None
    max_queue: int = 512
    new_engine: bool = False

    @classmethod
    def from_mapping(cls, env: Mapping[str, object] | None) -> OllamaEnv:
        """Parse ``{"OLLAMA_NUM_PARALLEL": "2", ...}``; values may be str, int or bool."""
        if not env:
            return cls()
        unknown = sorted(k for k in env if k not in KNOWN_ENV)
        if unknown:
            known = ", ".join(KNOWN_ENV)
            raise EmulatorError(f"unsupported environment: {', '.join(unknown)}; known: {known}")
        raw = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in env.items()}
        kv = raw.get("OLLAMA_KV_CACHE_TYPE", "").strip().lower()
        if kv not in ("", "f16", "q8_0", "q4_0"):
            raise EmulatorError(f"OLLAMA_KV_CACHE_TYPE={kv!r}: use f16, q8_0 or q4_0")
        fa = raw.get("OLLAMA_FLASH_ATTENTION")
        return cls(
            context_length=_uint("OLLAMA_CONTEXT_LENGTH", raw.get("OLLAMA_CONTEXT_LENGTH", "0")),
            num_parallel=_uint("OLLAMA_NUM_PARALLEL", raw.get("OLLAMA_NUM_PARALLEL", "0")),
            kv_cache_type=kv,
            flash_attention=None if fa is None or fa == "" else _bool("OLLAMA_FLASH_ATTENTION", fa),
            gpu_overhead_bytes=_uint("OLLAMA_GPU_OVERHEAD", raw.get("OLLAMA_GPU_OVERHEAD", "0")),
            max_loaded_models=_uint("OLLAMA_MAX_LOADED_MODELS", raw.get("OLLAMA_MAX_LOADED_MODELS", "0")),
            sched_spread=_bool("OLLAMA_SCHED_SPREAD", raw.get("OLLAMA_SCHED_SPREAD", "false") or "false"),
            keep_alive=raw.get("OLLAMA_KEEP_ALIVE"),
            max_queue=_uint("OLLAMA_MAX_QUEUE", raw.get("OLLAMA_MAX_QUEUE", "512")) or 512,
            new_engine=_bool("OLLAMA_NEW_ENGINE", raw.get("OLLAMA_NEW_ENGINE", "false") or "false"),
        )


# Lists that grew release by release: (first tag, names added). Removals never happened in these.
_Growth = tuple[tuple[Version, frozenset[str]], ...]

# fs/ggml/ggml.go OllamaEngineRequired.
_OLLAMA_ENGINE: _Growth = (
    (v("0.6.0"), frozenset({"gemma3"})),
    (v("0.6.5"), frozenset({"mistral3"})),
    (v("0.7.0"), frozenset({"llama4", "mllama", "qwen25vl"})),
    (v("0.10.0"), frozenset({"gemma3n"})),
    (v("0.11.0"), frozenset({"gptoss"})),
    (v("0.12.0"), frozenset({"qwen3"})),
    (v("0.12.3"), frozenset({"qwen3moe"})),
    (v("0.12.7"), frozenset({"qwen3vl", "qwen3vlmoe"})),
)
# server/sched.go load: architectures forced to one parallel slot.
_SINGLE_SLOT: _Growth = (
    (v("0.0.0"), frozenset({"mllama"})),
    (v("0.12.7"), frozenset({"qwen3vl", "qwen3vlmoe"})),
    (v("0.15.5"), frozenset({"qwen3next", "lfm2", "lfm2moe"})),
    (v("0.20.0"), frozenset({"qwen35", "qwen35moe", "nemotron_h", "nemotron_h_moe"})),
    (v("0.24.0"), frozenset({"nemotron_h_omni"})),
)
# fs/ggml/ggml.go FlashAttention(): the models that want flash attention. llm/server.go forces it on
# for them from v0.11.8; from v0.12.4 OLLAMA_FLASH_ATTENTION (BoolWithDefault) can turn it off.
_FA_DEFAULT: _Growth = (
    (v("0.11.8"), frozenset({"gptoss"})),
    (v("0.12.4"), frozenset({"gemma3", "qwen3", "qwen3moe"})),
    (v("0.12.7"), frozenset({"qwen3vl", "qwen3vlmoe"})),
    (v("0.15.5"), frozenset({"bert", "glm4moelite", "glmocr", "lfm2", "mistral3", "olmo3", "qwen3next"})),
)
# fs/ggml/ggml.go SupportsFlashAttention: embedding models and gemma2 never, else K and V dims equal.
_NO_FA = frozenset({"gemma2"})


def _by_version(table: _Growth, version: Version) -> frozenset[str]:
    current: set[str] = set()
    for since, names in table:
        if version >= since:
            current |= names
    return frozenset(current)


@record
class Behaviour:
    """One emulated ``ollama serve``: its version, environment and GPUs (total bytes each)."""

    version: Version
    env: OllamaEnv
    gpu_totals_bytes: tuple[int, ...] = ()

    # -- eras ------------------------------------------------------------------------------

    def ollama_engine(self, spec: ModelSpec) -> bool:
        """True when the model runs on Ollama's own engine (``OllamaEngineRequired`` or NEW_ENGINE)."""
        if self.version >= v("0.30.0"):
            return False
        return self.env.new_engine or spec.architecture in _by_version(_OLLAMA_ENGINE, self.version)

    def era(self, spec: ModelSpec) -> str:
        """classic (estimate), measured (allocations) or llama-server (buffer sizes)."""
        if self.version >= v("0.30.0"):
            # server/sched.go@v0.30.0: every GGUF runs in llama.cpp's llama-server (commit 9db4bdb).
            return LLAMA_SERVER
        if self.version >= v("0.12.11"):
            # llm/server.go@v0.12.11 (commit f560bd0): both engines build layouts from allocations.
            return MEASURED
        if self.version >= v("0.11.11") and self.ollama_engine(spec):
            # v0.11.11 ("new memory management"): ollama-engine models measure their allocations.
            return MEASURED
        return CLASSIC

    # -- context ---------------------------------------------------------------------------

    def default_num_ctx(self) -> int:
        """The context of a request without num_ctx whose Modelfile sets none."""
        if self.env.context_length > 0 and self.version >= v("0.5.13"):
            return self.env.context_length  # envconfig.ContextLength, read by api.DefaultOptions
        if self.version < v("0.6.7"):
            return 2048  # api/types.go DefaultOptions until v0.6.6 (envconfig default 2048 from v0.5.13)
        if self.version < v("0.15.5"):
            return 4096  # envconfig.ContextLength default 4096 from v0.6.7
        # server/routes.go@v0.15.5 Serve: the VRAM tier from the sum of (total - overhead) of the GPUs.
        total = sum(max(0, t - self.env.gpu_overhead_bytes) for t in self.gpu_totals_bytes)
        if total >= 47 * GIB:
            return 262144
        if total >= 23 * GIB:
            return 32768
        return 4096

    def num_ctx_auto(self, spec: ModelSpec, requested: int | None) -> bool:
        """usesAutomaticNumCtx (server/routes.go@v0.30.0): no request, Modelfile or env num_ctx."""
        return (
            self.version >= v("0.15.5")
            and requested is None
            and not spec.num_ctx_param
            and self.env.context_length == 0
        )

    def request_num_ctx(self, spec: ModelSpec, requested: int | None) -> int:
        """The num_ctx the scheduler works with: request, else Modelfile, else default; then minimums.

        GetRunner (server/sched.go): at least 4; vision models at least 2048 since v0.11.5.
        """
        if requested is not None and requested > 0:
            num_ctx = int(requested)
        elif spec.num_ctx_param:
            num_ctx = spec.num_ctx_param
        else:
            num_ctx = self.default_num_ctx()
        num_ctx = max(num_ctx, 4)
        if "vision" in spec.capabilities and self.version >= v("0.11.5"):
            num_ctx = max(num_ctx, 2048)
        return num_ctx

    @property
    def clamps_num_ctx(self) -> bool:
        """NewLlamaServer clamps num_ctx to the trained context from v0.9.3 (commit 10a8e04)."""
        return self.version >= v("0.9.3")

    def ps_context_length(self, requested_ctx: int, effective_ctx: int) -> int | None:
        """``/api/ps`` ``context_length``: absent before v0.10.0 (first in v0.9.7-rc0), the requested
        (unclamped) num_ctx until v0.15.4, the runner's clamped context from v0.15.5 (commit d11fbd2).
        """
        if self.version < v("0.10.0"):
            return None
        if self.version < v("0.15.5"):
            return requested_ctx
        return effective_ctx

    # -- parallel slots --------------------------------------------------------------------

    def parallel_candidates(self, spec: ModelSpec, cpu_only: bool) -> tuple[int, ...]:
        """Slots to try, best first. Before v0.10.0 OLLAMA_NUM_PARALLEL=0 meant auto: 4 then 1
        (``defaultParallel`` 4 until v0.6.6, 2 from v0.6.7), and the CPU path took the default;
        from v0.10.0 the default is 1 (envconfig). Embedding models and some architectures get 1.
        """
        if spec.embedding_only or spec.architecture in _by_version(_SINGLE_SLOT, self.version):
            return (1,)
        if self.env.num_parallel > 0:
            return (self.env.num_parallel,)
        if self.version >= v("0.10.0"):
            return (1,)
        auto = 4 if self.version < v("0.6.7") else 2
        return (auto,) if cpu_only else (auto, 1)

    # -- attention and cache ---------------------------------------------------------------

    def flash_attention(self, spec: ModelSpec) -> bool:
        """Whether the runner uses flash attention (llm/server.go NewLlamaServer)."""
        if self.version >= v("0.30.0"):
            # LlamaServerFlashAttention@v0.30.0: on (auto) unless the user turned it off.
            return self.env.flash_attention is not False
        if spec.pooling_type is not None or spec.architecture in _NO_FA or spec.head_dim_k != spec.head_dim_v:
            return False
        wanted = spec.architecture in _by_version(_FA_DEFAULT, self.version)
        if self.version < v("0.12.4"):
            return self.env.flash_attention is True or wanted  # "model wants flash attention": forced
        return wanted if self.env.flash_attention is None else self.env.flash_attention

    def kv_cache_type(self, spec: ModelSpec) -> str:
        """The KV cache type in effect: only with flash attention before v0.30; passed through after."""
        kv = self.env.kv_cache_type
        if self.version >= v("0.30.0"):
            return kv  # llm/server.go@v0.30.0 hands OLLAMA_KV_CACHE_TYPE to llama-server as is
        return kv if kv and self.flash_attention(spec) else ""

    # -- scheduler limits ------------------------------------------------------------------

    def max_loaded_models(self) -> int:
        """OLLAMA_MAX_LOADED_MODELS, else 3 per GPU (3 on a CPU-only host): defaultModelsPerGPU."""
        if self.env.max_loaded_models > 0:
            return self.env.max_loaded_models
        return 3 * max(1, len(self.gpu_totals_bytes))

    @property
    def preload_check(self) -> bool:
        """>= v0.30: predicted VRAM is checked against 80% of free before loading beside others."""
        return self.version >= v("0.30.0")

    @property
    def remote_models(self) -> bool:
        """Cloud stubs carry remote_model/remote_host in /api/tags and /api/show (api/types.go@v0.12.0)."""
        return self.version >= v("0.12.0")

    @property
    def runner_name(self) -> str:
        """What the load error messages call the runner."""
        return "llama-server" if self.version >= v("0.30.0") else "llama runner"
