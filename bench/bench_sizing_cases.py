"""The cases of issue 6's table: what gpu-router judged before, what it judges now, and Ollama's figure.

Run: .venv/bin/python bench/bench_sizing_cases.py
Each model is built from its public config (tests/model_shapes.py, Q4_K_M as Ollama's default
tags), each node from the case's VRAM, version and ``ollama_env``. "need" is the free VRAM the
node's Ollama needs for a full offload (the fit judgement); "/api/ps" is the size it will show.
The "before" and "Ollama" columns are the issue's own figures (before: the classic formula at a
fixed 4096; Ollama: its rules for that case), quoted for comparison, not computed here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import model_shapes  # noqa: E402  (the tests' builders of public-config models)

from gpu_router.memory import NodeProfile, estimate_memory, parse_ollama_env  # noqa: E402
from gpu_router.ollama import parse_show  # noqa: E402
from gpu_router.state import GIB, MIB  # noqa: E402

# (case, builder, builder kwargs, version, GPU GiB, ollama_env, num_ctx, before, Ollama per the issue)
CASES: tuple[
    tuple[str, Callable[..., Any], dict[str, Any], str, int, dict[str, object], int | None, str, str], ...
] = (
    ("llama3.1:8b, 24 GiB node", model_shapes.llama31_8b, {}, "0.16.1", 24, {}, None, "5.98 GiB", "~8.6 GiB"),
    ("llama3.1:8b, 24 GiB node", model_shapes.llama31_8b, {}, "0.30.0", 24, {}, None, "5.98 GiB", "~8.6 GiB"),
    (
        "llama3.1:8b, 48 GiB node",
        model_shapes.llama31_8b,
        {},
        "0.16.1",
        48,
        {},
        None,
        "5.98 GiB",
        "~20.6 GiB",
    ),
    (
        "llama3.1:8b, 48 GiB node",
        model_shapes.llama31_8b,
        {},
        "0.30.0",
        48,
        {},
        None,
        "5.98 GiB",
        "~20.6 GiB",
    ),
    (
        "llama3.1:8b, NUM_PARALLEL=4",
        model_shapes.llama31_8b,
        {},
        "0.11.10",
        24,
        {"OLLAMA_NUM_PARALLEL": 4},
        None,
        "5.98 GiB",
        "7.99 GiB",
    ),
    (
        "llama3.1:8b, 32k, q8_0 + FA",
        model_shapes.llama31_8b,
        {},
        "0.11.10",
        24,
        {"OLLAMA_KV_CACHE_TYPE": "q8_0", "OLLAMA_FLASH_ATTENTION": 1},
        32768,
        "11.4 GiB",
        "~6.7 GiB",
    ),
    (
        "gemma3:27b, 32k (sliding window)",
        model_shapes.gemma3_27b,
        {},
        "0.11.10",
        48,
        {},
        32768,
        "37.8 GiB",
        "~20.9 GiB",
    ),
    (
        "gemma3:27b + vision, 32k",
        model_shapes.gemma3_27b,
        {"vision": True},
        "0.12.6",
        48,
        {},
        32768,
        "37.8 GiB",
        "~20.9 GiB",
    ),
    (
        "nomic-embed-text (embedding)",
        model_shapes.nomic_embed_text,
        {},
        "0.30.0",
        24,
        {},
        None,
        "871 MB",
        "323 MB (ps)",
    ),
    (
        "gemma3:4b with its projector",
        model_shapes.gemma3_4b,
        {},
        "0.11.10",
        24,
        {},
        None,
        "4.5 GiB",
        "5.5 GiB",
    ),
)


def size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def main() -> None:
    print("| case | Ollama | era | context | need | /api/ps | before (issue) | Ollama (issue) |")
    print("|---|---|---|---|---|---|---|---|")
    for what, builder, kwargs, version, gib, env, num_ctx, before, ollama in CASES:
        built = builder(**kwargs)
        info = parse_show(built.body, what.split(",")[0])
        node = NodeProfile(version, (gib * GIB,), parse_ollama_env(env))
        e = estimate_memory(info, built.file_bytes, node, num_ctx=num_ctx)
        assert e is not None, what
        print(
            f"| {what} | {version} | {e.era.value} | {e.context_length} x {e.num_parallel} "
            f"{e.kv_cache_type} | {size(e.need_bytes)} | {size(e.ps_size_bytes)} | {before} | {ollama} |"
        )


if __name__ == "__main__":
    main()
