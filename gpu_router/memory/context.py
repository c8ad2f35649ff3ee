"""Which context and how many parallel slots a node's Ollama gives a model, and why. Pure.

Precedence (``server/routes.go@v0.15.5`` modelOptions): the request's ``options.num_ctx``, then the
Modelfile's ``PARAMETER num_ctx``, then ``OLLAMA_CONTEXT_LENGTH``, then the version's default:
2048 before v0.6.7, 4096 from v0.6.7 (44b466eeb), and from v0.15.5 (0334ffa62) a tier from the
summed VRAM less OLLAMA_GPU_OVERHEAD per GPU: >= 47 GiB -> 262144, >= 23 GiB -> 32768, else 4096.
``server/sched.go`` then raises anything under 4 to 4 and, from v0.11.5, a vision model to at least
2048; the runner clamps to the trained context (``llm/server.go`` NewLlamaServer).
"""

from __future__ import annotations

from collections.abc import Sequence

from gpu_router.memory.env import OllamaEnv
from gpu_router.memory.version import SINGLE_SLOT_FAMILIES, Version, VersionFacts, format_version
from gpu_router.records import record
from gpu_router.state import GIB, ModelInfo

CONTEXT_ENV_SINCE: Version = (0, 5, 13)  # 314573bfe: OLLAMA_CONTEXT_LENGTH is read
DEFAULT_4096_SINCE: Version = (0, 6, 7)
VRAM_TIERS_SINCE: Version = (0, 15, 5)
VISION_MINIMUM_SINCE: Version = (0, 11, 5)
CLAMP_SINCE: Version = (0, 9, 3)  # 10a8e04a8 "avoid context overflow": the runner clamps to training
FIT_AFTER_CLAMP_SINCE: Version = (0, 11, 5)  # d5a0d8d90: the fit test moved after that clamp
PS_CONTEXT_SINCE: Version = (0, 9, 7)  # /api/ps context_length appears
PS_ACTUAL_CONTEXT_SINCE: Version = (0, 15, 5)  # d11fbd2c6: ps shows the runner's (clamped) context
PS_SLOT_CONTEXT_SINCE: Version = (0, 11, 5)  # before, the scheduler multiplied num_ctx by the slots
PARALLEL_ONE_SINCE: Version = (0, 10, 0)  # 20c3266e9 "Reduce default parallelism to 1"
PARALLEL_TWO_SINCE: Version = (0, 6, 7)  # fe5b9bb21 "lower default num parallel to 2"
CONCURRENCY_SINCE: Version = (0, 2, 0)  # 17b7186cd "Enable concurrency by default"


@record
class ContextChoice:
    """The context and slots a model will run with on a node, with the reasons in words."""

    context_length: int  # per slot, after every clamp: what memory is sized with
    requested_context: int  # before the clamp to the trained context
    fit_context: int  # what the scheduler's fit test used (unclamped before v0.11.5)
    ps_context_length: int | None  # what /api/ps context_length will show (None: not shown)
    reason: str
    num_parallel: int
    parallel_reason: str
    parallel_candidates: tuple[int, ...] = ()  # auto parallel (before v0.10.0): tried in order
    notes: tuple[str, ...] = ()


def vram_for_tiers(gpu_total_bytes: Sequence[int], overhead_bytes: int) -> int:
    """``Serve``'s totalVRAM: the sum over GPUs of total less OLLAMA_GPU_OVERHEAD."""
    return sum(max(t - overhead_bytes, 0) for t in gpu_total_bytes)


def default_context(v: Version, gpu_total_bytes: Sequence[int], overhead_bytes: int) -> tuple[int, str]:
    """The version's default context and why."""
    name = format_version(v)
    if v < DEFAULT_4096_SINCE:
        return 2048, f"{name} default: 2048"
    if v < VRAM_TIERS_SINCE:
        return 4096, f"{name} default: 4096"
    if not gpu_total_bytes:
        return 4096, f"{name} default without known GPU memory: 4096"
    vram = vram_for_tiers(gpu_total_bytes, overhead_bytes)
    if vram >= 47 * GIB:
        ctx = 262144
    elif vram >= 23 * GIB:
        ctx = 32768
    else:
        ctx = 4096
    return ctx, f"{name} default for {vram / GIB:.1f} GiB of VRAM: {ctx}"


def _is_completion(info: ModelInfo) -> bool:
    return "completion" in info.capabilities


def resolve_context(
    info: ModelInfo,
    facts: VersionFacts,
    env: OllamaEnv,
    gpu_total_bytes: Sequence[int],
    num_ctx: int | None = None,
) -> ContextChoice:
    """Context and parallel slots ``info`` gets on a node of version ``facts`` with ``env``."""
    v = facts.version
    notes: list[str] = []
    overhead = env.gpu_overhead_bytes or 0
    if num_ctx is not None and num_ctx > 0:
        ctx, reason = num_ctx, f"requested num_ctx {num_ctx}"
    elif info.num_ctx:
        ctx, reason = info.num_ctx, f"Modelfile num_ctx {info.num_ctx}"
    elif env.context_length and v >= CONTEXT_ENV_SINCE:
        ctx, reason = env.context_length, f"OLLAMA_CONTEXT_LENGTH={env.context_length}"
    else:
        if env.context_length and v < CONTEXT_ENV_SINCE:
            notes.append(f"{format_version(v)} does not read OLLAMA_CONTEXT_LENGTH")
        ctx, reason = default_context(v, gpu_total_bytes, overhead)
    if not facts.known:
        reason = f"unknown Ollama version, newest rules assumed: {reason}"
    if ctx < 4:
        ctx, reason = 4, f"{reason}, raised to Ollama's minimum of 4"
    if info.vision_capable and v >= VISION_MINIMUM_SINCE and ctx < 2048:
        ctx, reason = 2048, f"{reason}, raised to 2048 for a vision model"
    requested = ctx
    trained = info.context_length
    if trained and 0 < trained < ctx:
        if v >= CLAMP_SINCE:
            ctx, reason = trained, f"{reason}, clamped to the trained {trained}"
        else:
            notes.append(f"{format_version(v)} does not clamp to the trained context of {trained}")
    fit_ctx = ctx if v >= FIT_AFTER_CLAMP_SINCE else requested

    parallel, parallel_reason, candidates = _parallel(info, v, env)
    ps_ctx: int | None
    if v < PS_CONTEXT_SINCE:
        ps_ctx = None
    elif v >= PS_ACTUAL_CONTEXT_SINCE:
        ps_ctx = ctx
    elif v >= PS_SLOT_CONTEXT_SINCE:
        ps_ctx = requested
    else:
        ps_ctx = requested * parallel
    return ContextChoice(
        ctx, requested, fit_ctx, ps_ctx, reason, parallel, parallel_reason, candidates, tuple(notes)
    )


def _parallel(info: ModelInfo, v: Version, env: OllamaEnv) -> tuple[int, str, tuple[int, ...]]:
    """``server/sched.go``: OLLAMA_NUM_PARALLEL or the version's default, forced to 1 where Ollama does."""
    if not _is_completion(info):
        return 1, "embedding models always get one slot (server/sched.go)", ()
    if info.architecture in SINGLE_SLOT_FAMILIES:
        return 1, f"Ollama forces {info.architecture} to one slot", ()
    requested = env.num_parallel
    if requested is not None and (requested > 0 or v >= PARALLEL_ONE_SINCE):
        n = max(requested, 1)
        return n, f"OLLAMA_NUM_PARALLEL={requested}", ()
    if v >= PARALLEL_ONE_SINCE:
        return 1, f"{format_version(v)} default: 1", ()
    if v >= PARALLEL_TWO_SINCE:
        return 2, f"{format_version(v)} default: 2 slots when they fit, else 1", (2, 1)
    if v >= CONCURRENCY_SINCE:
        return 4, f"{format_version(v)} default: 4 slots when they fit, else 1", (4, 1)
    return 1, f"{format_version(v)} runs one request at a time", ()
