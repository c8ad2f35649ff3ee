"""bench/nvml_check.py's nvidia-smi side, against a fake nvidia-smi script (no GPU needed)."""

from __future__ import annotations

import importlib.util
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from gpu_router.state import GIB, Gpu

BENCH = Path(__file__).resolve().parent.parent / "bench" / "nvml_check.py"


@pytest.fixture(scope="module")
def nvml_check() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("nvml_check", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def fake_smi(tmp_path: Path, output: str) -> str:
    """An executable that prints ``output`` whatever it is asked, like a one-trick nvidia-smi."""
    path = tmp_path / "nvidia-smi"
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}EOF\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_health_query_reads_figures_and_problems(nvml_check: ModuleType, tmp_path: Path) -> None:
    smi = fake_smi(tmp_path, "0, 37, 61\n1, [N/A], [N/A]\n2, [GPU requires reset], [GPU requires reset]\n")
    rows = nvml_check.query_nvidia_smi_health(smi)
    assert [(r.index, r.utilization_pct, r.temperature_c, r.problem) for r in rows] == [
        (0, 37, 61, ""),
        (1, None, None, ""),
        (2, None, None, "[GPU requires reset]; [GPU requires reset]"),
    ]


def test_health_comparison(nvml_check: ModuleType) -> None:
    smi_ok = nvml_check.SmiHealth(0, 37, 61, "")
    smi_bad = nvml_check.SmiHealth(0, None, None, "[GPU requires reset]")
    ours = Gpu(0, "NVIDIA H200", 141 * GIB, temperature_c=63.0)
    lost = Gpu(0, "NVIDIA H200", 141 * GIB, healthy=False, health_reason="NVML: GPU is lost")
    assert nvml_check.compare_health(ours, smi_ok, 3) == []
    assert nvml_check.compare_health(ours, smi_ok, 1) == [
        "GPU 0 temperature: gpu_router 63 C vs nvidia-smi 61 C"
    ]
    assert nvml_check.compare_health(lost, smi_bad, 3) == []
    assert nvml_check.compare_health(lost, smi_ok, 3) == [
        "GPU 0: gpu_router says unhealthy (NVML: GPU is lost), nvidia-smi reads it"
    ]
    assert nvml_check.compare_health(ours, smi_bad, 3) == [
        "GPU 0: nvidia-smi cannot read it ([GPU requires reset]), gpu_router says healthy"
    ]
