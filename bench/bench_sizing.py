"""The VRAM-need engine against what real Ollama nodes reported (tests/fixtures/observations).

Run: .venv/bin/python bench/bench_sizing.py

For every observation row the engine can model, prints the row, what the engine estimates for
that row's model, context, slots and Ollama version, the observed figure and what it is
(/api/ps size, size_vram, a server-log ``memory.required.*`` figure, a llama.cpp buffer line), and
the error; then the median and worst absolute error per era (A classic, B layouts, C
llama-server). Rows whose figure was used to calibrate the llama-server compute buffer are marked
and left out of the summary.

Models come from the rows' real /api/show bodies where there is one, else from the public
configuration of the weights (tests/model_shapes.py builds their tensor lists); those rows say
"config". A config model's tensors are scaled so that the weights Ollama counts match the
``memory.weights.total`` a log of that model shows (row 20's for gpt-oss:120b, row 13's for
gemma3:12b), because a quantisation mix rebuilt from a config is only close to the real file;
the KV cache, graphs, reserves and placement are then the engine's own.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import model_shapes  # noqa: E402  (the tests' builders of public-config models)

from gpu_router.memory import (  # noqa: E402
    MemoryEstimate,
    NodeProfile,
    classic_inputs,
    estimate_gpu_layers,
    estimate_memory,
    parse_ollama_env,
)
from gpu_router.ollama import parse_show  # noqa: E402
from gpu_router.state import GIB, MIB, ModelInfo  # noqa: E402

OBSERVATIONS = ROOT / "tests" / "fixtures" / "observations"
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "GB": 10**9, "MB": 10**6, "G": 10**9}


def observed_bytes(text: str) -> int:
    """``"6.6 GB (6557205504 B)"`` -> 6557205504; ``"22.6 GiB"`` -> bytes; ``"45G"`` -> bytes."""
    m = re.search(r"\((\d+) B\)", text)
    if m:
        return int(m.group(1))
    if text.strip().isdigit():
        return int(text.strip())
    m = re.search(r"([\d.]+)\s*(GiB|MiB|KiB|GB|MB|G|B)\b", text)
    if not m:
        raise ValueError(f"no figure in {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


@dataclass(frozen=True)
class Model:
    info: ModelInfo
    file_bytes: int
    source: str  # "show" or "config"


def show_model(name: str, file_bytes: int) -> Model:
    body = json.loads((OBSERVATIONS / "show" / f"{name}.json").read_text())
    return Model(parse_show(body, name), file_bytes, "show")


def config_model(builder: Callable[[], model_shapes.Built], name: str, weights_gib: float | None) -> Model:
    """A public-config model; with ``weights_gib``, its file scaled so that the weights Ollama
    counts (blocks + output layer, the log's ``memory.weights.total``) are what the row logged."""
    built = builder()
    file_bytes = built.file_bytes
    if weights_gib is not None:
        head = built.output or built.token_embd
        counted = sum(built.blocks) + built.output_norm + head
        file_bytes = int(file_bytes * weights_gib * GIB / counted)
    return Model(parse_show(built.body, name), file_bytes, "config")


@dataclass
class Check:
    """One figure of one row: what it is, how the engine's side is read, and the observed value."""

    kind: str
    read: Callable[[MemoryEstimate, ModelInfo, int, NodeProfile, int], int]
    column: str  # observations.csv column holding the figure
    calibration: bool = False


@dataclass
class Row:
    id: int
    model: Callable[[], Model]
    version: str
    ctx: int
    checks: list[Check]
    parallel: int = 1
    library: str = "cuda"
    gpus_gib: tuple[float, ...] = ()
    free_gib: tuple[float, ...] = ()  # for estimate_gpu_layers, largest first as Ollama sorts them
    env: dict[str, object] = field(default_factory=dict)
    note: str = ""
    calibration: bool = False  # every figure of the row was used to calibrate the compute buffer


def ps_size(e: MemoryEstimate, *_: Any) -> int:
    return e.ps_size_bytes


def kv(e: MemoryEstimate, *_: Any) -> int:
    return e.kv_bytes


def graph(e: MemoryEstimate, *_: Any) -> int:
    return e.graph_bytes


def classic_total(free_gib: tuple[float, ...]) -> Callable[..., int]:
    """TotalSize of llm/memory.go estimateGPULayers with the row's free memory per GPU."""

    def read(e: MemoryEstimate, info: ModelInfo, file_bytes: int, node: NodeProfile, ctx: int) -> int:
        inputs = classic_inputs(info, file_bytes, node, num_ctx=ctx)
        assert inputs is not None
        return estimate_gpu_layers([int(g * GIB) for g in free_gib], inputs).total_bytes

    return read


def cpu_total(free_gib: float) -> Callable[..., int]:
    """TotalSize of a CPU load before v0.12: the CPU went through estimateGPULayers like a GPU
    (discover.GetCPUInfo), with the system's free memory and no per-device minimum."""

    def read(e: MemoryEstimate, info: ModelInfo, file_bytes: int, node: NodeProfile, ctx: int) -> int:
        inputs = classic_inputs(info, file_bytes, node, num_ctx=ctx)
        assert inputs is not None
        cpu = dataclasses.replace(inputs, minimum_bytes=0)
        return estimate_gpu_layers([int(free_gib * GIB)], cpu).total_bytes

    return read


def classic_vram(free_gib: tuple[float, ...]) -> Callable[..., int]:
    def read(e: MemoryEstimate, info: ModelInfo, file_bytes: int, node: NodeProfile, ctx: int) -> int:
        inputs = classic_inputs(info, file_bytes, node, num_ctx=ctx)
        assert inputs is not None
        return estimate_gpu_layers([int(g * GIB) for g in free_gib], inputs).vram_bytes

    return read


def classic_graph_full(
    e: MemoryEstimate, info: ModelInfo, file_bytes: int, node: NodeProfile, ctx: int
) -> int:
    inputs = classic_inputs(info, file_bytes, node, num_ctx=ctx)
    assert inputs is not None
    return inputs.graph_full


PS = Check("/api/ps size", ps_size, "ps_size")
ERA_A_RANGE = "0.11.4"  # the "~0.10.x-0.11.x" rows: the classic formula is the same over that range


def rows() -> list[Row]:
    def show(name: str, file_bytes: int) -> Callable[[], Model]:
        return lambda: show_model(name, file_bytes)

    def config(
        builder: Callable[[], model_shapes.Built], name: str, weights_gib: float | None = None
    ) -> Callable[[], Model]:
        return lambda: config_model(builder, name, weights_gib)

    metal = "metal"  # rows of 2025-07-29..31: exactly 512 - 457 MiB above the CUDA figure
    out = [
        Row(25, show("deepseek-r1_8b", 5225376047), ERA_A_RANGE, 4096, [PS], library=metal),
        Row(29, show("gemma3_1b", 815319791), ERA_A_RANGE, 4096, [PS], library=metal),
        Row(31, show("granite3.3_2b", 1545321637), ERA_A_RANGE, 4096, [PS], library=metal),
        Row(32, show("granite3.3_2b", 1545321637), "0.11.6", 4096, [PS]),
        Row(37, show("llama3.2_1b", 1321098329), ERA_A_RANGE, 4096, [PS], library=metal),
        Row(38, show("llama3.2_3b", 2019393189), ERA_A_RANGE, 4096, [PS], library=metal),
        Row(41, show("mistral_7b", 4372824384), ERA_A_RANGE, 4096, [PS]),
        Row(42, show("mistral_7b", 4113301824), ERA_A_RANGE, 4096, [PS], note="q4_K_M body, q4_0 file"),
        Row(
            43,
            show("mistral_7b", 4372824384),
            "0.11.6",
            16384,
            [
                Check("/api/ps size (partial)", classic_total((6.8,)), "ps_size"),
                Check("/api/ps size_vram", classic_vram((6.72,)), "size_vram_bytes"),
            ],
        ),
        Row(46, show("qwen2.5vl_7b", 5969245856), ERA_A_RANGE, 4096, [PS], library=metal),
        Row(48, show("qwen3_8b", 5225388164), ERA_A_RANGE, 4096, [PS], library=metal),
        Row(49, show("qwen3_8b", 5225388164), ERA_A_RANGE, 4096, [PS]),
        Row(
            50,
            show("qwen3_8b", 5225388164),
            ERA_A_RANGE,
            16384,
            [
                Check("/api/ps size (partial)", classic_total((6.68,)), "ps_size"),
                Check("/api/ps size_vram", classic_vram((6.68,)), "size_vram_bytes"),
            ],
        ),
        Row(
            7,
            config(model_shapes.nomic_embed_text, "nomic-embed-text"),
            "0.5.7",
            8192,
            [
                Check("memory.required.full", classic_total((39.1,)), "mem_required_full"),
                Check("memory.required.kv", kv, "mem_required_kv"),
                Check("memory.graph.full", classic_graph_full, "mem_graph_full"),
            ],
            note="v0.5 does not clamp to the trained 2048",
        ),
        Row(
            10,
            config(model_shapes.gemma3_12b, "gemma3:12b", 6.77),
            "0.6.2",
            2048,
            [
                Check("memory.required.full", classic_total((14.5,)), "mem_required_full"),
                Check("memory.required.kv", kv, "mem_required_kv"),
            ],
            parallel=4,
            note="the log has projector.graph=0 B; VisionGraphSize@v0.6.2 gives 1.0 GiB",
        ),
        Row(
            11,
            config(lambda: model_shapes.gemma3_27b(vision=True), "gemma3:27b", 15.3),
            "0.6.0",
            2048,
            [
                Check("memory.required.full", classic_total((14.5,)), "mem_required_full"),
                Check("memory.required.partial", classic_vram((14.5,)), "mem_required_partial"),
                Check("memory.required.kv", kv, "mem_required_kv"),
            ],
            gpus_gib=(16,),
            note="auto slots: 4 did not fit the 16 GB GPU, so 1",
        ),
        Row(
            13,
            config(model_shapes.gemma3_12b, "gemma3:12b", 6.77),
            "0.9.0",
            4096,
            [
                Check("memory.required.full (CPU)", cpu_total(29.5), "mem_required_full"),
                Check("memory.required.kv", kv, "mem_required_kv"),
            ],
            parallel=2,
        ),
        Row(
            19,
            config(model_shapes.gpt_oss_20b, "gpt-oss:20b", 11.7),
            "0.11.3",
            36864,
            [
                Check("memory.required.full", classic_total((23.4,)), "mem_required_full"),
                Check("memory.required.kv", kv, "mem_required_kv"),
                Check("memory.graph.full", classic_graph_full, "mem_graph_full"),
            ],
        ),
        Row(
            20,
            config(model_shapes.gpt_oss_120b, "gpt-oss:120b", 59.7),
            "0.11.5",
            75000,
            [
                Check("memory.required.full", classic_total((31.4, 23.1, 23.1)), "mem_required_full"),
                Check("memory.required.partial", classic_vram((31.4, 23.1, 23.1)), "mem_required_partial"),
                Check("memory.required.kv", kv, "mem_required_kv"),
                Check("memory.graph.full", classic_graph_full, "mem_graph_full"),
            ],
            env={"OLLAMA_FLASH_ATTENTION": "true"},
        ),
        Row(62, show("qwen2.5vl_7b", 5969245856), "0.13.3", 16384, [PS], gpus_gib=(24,)),
        Row(
            63,
            show("qwen2.5vl_7b", 5969245856),
            "0.13.4",
            16384,
            [PS],
            gpus_gib=(24,),
            note="v0.13.4 reserves a larger vision graph",
        ),
        Row(
            65,
            config(model_shapes.bge_m3, "bge-m3", 1.0),
            "0.13.0",
            8192,
            [
                Check("total memory (log)", ps_size, "buffers_or_breakdown"),
                Check("kv cache (log)", kv, "buffers_or_breakdown"),
                Check("compute graph (log)", graph, "buffers_or_breakdown"),
            ],
            library="metal",
            gpus_gib=(463.5,),
            note="context inferred from the 48 MiB KV line",
        ),
        Row(
            58, config(model_shapes.gpt_oss_120b, "gpt-oss:120b", 59.7), "0.12.11", 8192, [PS], gpus_gib=(56,)
        ),
        Row(
            59,
            config(model_shapes.gpt_oss_120b, "gpt-oss:120b", 59.7),
            "0.12.11",
            32768,
            [PS],
            gpus_gib=(56,),
        ),
        Row(
            60,
            config(model_shapes.gpt_oss_120b, "gpt-oss:120b", 59.7),
            "0.12.11",
            32768,
            [PS],
            gpus_gib=(56,),
        ),
        Row(
            66,
            config(model_shapes.gpt_oss_120b, "gpt-oss:120b", 59.7),
            "0.30.0",
            131072,
            [
                Check("ROCm0 model+context+compute", ps_size, "buffers_or_breakdown"),
                Check("ROCm0 compute buffer", graph, "buffers_or_breakdown", calibration=True),
            ],
            parallel=2,
            library="rocm",
            gpus_gib=(112.5,),
            note="context and slots from row 67 (same user)",
        ),
        Row(
            67,
            config(model_shapes.gpt_oss_120b, "gpt-oss:120b", 59.7),
            "0.30.2",
            131072,
            [Check("KV buffers (SWA + non-SWA)", kv, "buffers_or_breakdown")],
            parallel=2,
            library="rocm",
            gpus_gib=(112.5,),
        ),
        Row(
            5,
            config(model_shapes.qwen25_32b, "qwen2.5:32b"),
            "0.30.0",
            8192,
            [
                Check("CUDA0 compute buffer", graph, "buffers_or_breakdown", calibration=True),
                Check("CUDA0 KV buffer", kv, "buffers_or_breakdown"),
            ],
            env={"OLLAMA_FLASH_ATTENTION": "false"},
            gpus_gib=(24,),
            calibration=True,
            note="llama.cpp of a v0.5 runner, one cache for 4 x 2048 (sized as 1 x 8192)",
        ),
        Row(
            55,
            config(model_shapes.qwen3_32b, "qwen3:32b"),
            "0.30.0",
            8192,
            [
                Check("CUDA0 compute buffer", graph, "buffers_or_breakdown", calibration=True),
                Check("KV self buffer", kv, "buffers_or_breakdown"),
            ],
            env={"OLLAMA_FLASH_ATTENTION": "false"},
            gpus_gib=(24,),
            calibration=True,
            note="llama.cpp of a v0.10 runner",
        ),
    ]
    return out


# The figure each buffer-line check reads out of the "buffers_or_breakdown" text.
_BUFFER_FIGURES = {
    (65, "total memory (log)"): r"total memory ([\d.]+ GiB)",
    (65, "kv cache (log)"): r"kv cache Metal ([\d.]+ MiB)",
    (65, "compute graph (log)"): r"compute graph Metal ([\d.]+ MiB)",
    (66, "ROCm0 model+context+compute"): r"ROCm0 self (\d+ MiB)",
    (66, "ROCm0 compute buffer"): r"\+ compute (\d+) ?(?:;|$)",
    (5, "CUDA0 compute buffer"): r"CUDA0 compute ([\d.]+ MiB)",
    (5, "CUDA0 KV buffer"): r"CUDA0 KV ([\d.]+ MiB)",
    (55, "CUDA0 compute buffer"): r"CUDA0 compute ([\d.]+ MiB)",
    (55, "KV self buffer"): r"KV self ([\d.]+ MiB)",
}


def figure(row: dict[str, str], row_id: int, check: Check) -> int:
    text = row[check.column]
    key = (row_id, check.kind)
    if row_id == 67:
        non_swa = float(re.search(r"non-SWA KV ROCm0 ([\d.]+) MiB", text).group(1))  # type: ignore[union-attr]
        swa = float(re.search(r"; SWA KV ROCm0 ([\d.]+) MiB", text).group(1))  # type: ignore[union-attr]
        return int((non_swa + swa) * MIB)
    if key == (66, "ROCm0 compute buffer"):
        return int(float(re.search(r"compute (\d+);", text).group(1)) * MIB)  # type: ignore[union-attr]
    if key in _BUFFER_FIGURES:
        m = re.search(_BUFFER_FIGURES[key], text)
        if m is None:
            raise ValueError(f"row {row_id}: no {check.kind} in {text!r}")
        value = m.group(1)
        return observed_bytes(value if " " in value else value + " MiB")
    return observed_bytes(text)


def speed(specs: list[Row]) -> None:
    """Time estimate_memory per call over the rows' models and nodes (the planner calls it per
    model and node profile; the model's shape is cached, so this is the repeated-call cost)."""
    cases = []
    for spec in specs:
        m = spec.model()
        gpus = tuple(int(g * GIB) for g in (spec.gpus_gib or spec.free_gib or (24,)))
        cases.append((m, NodeProfile(spec.version, gpus, parse_ollama_env(spec.env), spec.library), spec.ctx))
    per_call = []
    for _ in range(5):
        start = time.perf_counter()
        for m, node, ctx in cases * 20:
            estimate_memory(m.info, m.file_bytes, node, num_ctx=ctx)
        per_call.append((time.perf_counter() - start) / (len(cases) * 20))
    print(
        f"estimate_memory: median {statistics.median(per_call) * 1e6:.0f} us per call"
        f" ({len(cases)} model/node pairs x 20, 5 runs)"
    )


def fmt(n: int) -> str:
    return f"{n / GIB:8.2f} GiB" if n >= GIB else f"{n / MIB:8.1f} MiB"


def main() -> None:
    with (OBSERVATIONS / "observations.csv").open(newline="") as f:
        csv_rows = {int(r["id"]): r for r in csv.DictReader(f)}
    errors: dict[str, list[float]] = {}
    header = (
        f"{'row':>3} {'era':3} {'model':22} {'version':8} {'ctx':>7} {'par':>3} {'gpu':5} {'src':6} "
        f"{'figure':30} {'estimate':>12} {'observed':>12} {'error':>8}"
    )
    print(header)
    print("-" * len(header))
    for spec in rows():
        row = csv_rows[spec.id]
        m = spec.model()
        env = dict(spec.env)
        if spec.parallel != 1:
            env["OLLAMA_NUM_PARALLEL"] = spec.parallel
        gpus = tuple(int(g * GIB) for g in (spec.gpus_gib or spec.free_gib or (24,)))
        node = NodeProfile(spec.version, gpus, parse_ollama_env(env), spec.library)
        est = estimate_memory(m.info, m.file_bytes, node, num_ctx=spec.ctx)
        assert est is not None, spec.id
        era = row["era"][:1]
        for check in spec.checks:
            got = check.read(est, m.info, m.file_bytes, node, spec.ctx)
            want = figure(row, spec.id, check)
            err = (got - want) / want * 100
            calibration = check.calibration or spec.calibration
            mark = " (calibration)" if calibration else ""
            if not calibration:
                errors.setdefault(era, []).append(abs(err))
            where = f"{spec.id:>3} {era:3} {row['model'][:22]:22} {spec.version:8} {spec.ctx:>7}"
            what = f"{est.num_parallel:>3} {spec.library:5} {m.source:6} {check.kind[:30]:30}"
            print(f"{where} {what} {fmt(got):>12} {fmt(want):>12} {err:+7.2f}%{mark}")
        if spec.note:
            print(f"{'':>4}note: {spec.note}")
    print()
    speed(rows())
    names = {
        "A": "A classic (< v0.11.11)",
        "B": "B layouts (v0.11.11 - v0.29)",
        "C": "C llama-server (v0.30+)",
    }
    for era in ("A", "B", "C"):
        e = errors.get(era, [])
        if e:
            print(
                f"era {names[era]:30} {len(e):3} figures: median |error| {statistics.median(e):5.2f}%,"
                f" worst {max(e):6.2f}%"
            )


if __name__ == "__main__":
    main()
