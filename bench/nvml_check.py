"""Check gpu_router's NVML reading against nvidia-smi on a real GPU machine.

Run from the repository root: ``python bench/nvml_check.py [--tolerance-mib 4]``.

Prints what :class:`gpu_router.gpus.nvml.NvmlSource` reads, then nvidia-smi's view of the same GPUs, side by
side. Total and free must agree within the tolerance. gpu_router's *used* is total - free (driver-reserved
memory counts as used), while nvidia-smi's ``memory.used`` excludes ``memory.reserved`` on recent drivers, so
used is compared with nvidia-smi's total - free and smi's own used/reserved are shown for information.

Utilization, temperature and health come next, beside ``nvidia-smi --query-gpu=index,utilization.gpu,
temperature.gpu``. Temperatures must agree within ``--tolerance-c``; utilization is shown, not compared (it
moves between the two reads); a GPU gpu_router calls unhealthy must be one nvidia-smi cannot read either, and
the other way round.

Exit status: 0 agree (or nvidia-smi absent and NVML read fine, or no NVIDIA driver at all: nothing to check),
1 disagree, 2 the driver is there but NVML could not read any GPU.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Importable both as a script from anywhere and from the repository root.
from gpu_router.gpus.nvml import NvmlSource
from gpu_router.state import MIB, Gpu

QUERY_FIELDS = ("index", "uuid", "name", "memory.total", "memory.used", "memory.free", "memory.reserved")
BASIC_FIELDS = ("index", "name", "memory.total", "memory.used", "memory.free")  # oldest nvidia-smi
HEALTH_FIELDS = ("index", "utilization.gpu", "temperature.gpu")
# NvmlSource's errors when there is nothing to check: no library, no package, no kernel module.
NO_DRIVER_ERRORS = (
    "NVML: no NVIDIA driver",
    "NVML: the nvidia-ml-py package is not installed",
    "NVML: the NVIDIA driver is not loaded",
)


@dataclass(frozen=True)
class SmiGpu:
    """One row of nvidia-smi --query-gpu, sizes in MiB (None for [N/A])."""

    index: int
    name: str
    uuid: str
    total_mib: int | None
    used_mib: int | None
    free_mib: int | None
    reserved_mib: int | None


def _mib(text: str) -> int | None:
    text = text.strip()
    try:
        return int(float(text))
    except ValueError:
        return None  # "[N/A]" on unified-memory devices, "[Not Supported]"


def query_nvidia_smi(smi: str) -> list[SmiGpu]:
    """nvidia-smi's view; the richer query first, the brief's basic one if this nvidia-smi lacks a field."""
    for fields in (QUERY_FIELDS, BASIC_FIELDS):
        proc = subprocess.run(
            [smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            continue
        rows: list[SmiGpu] = []
        for line in proc.stdout.splitlines():
            if not line.strip():
                continue
            cols = dict(zip(fields, (c.strip() for c in line.split(",")), strict=False))
            rows.append(
                SmiGpu(
                    index=int(cols["index"]),
                    name=cols.get("name", ""),
                    uuid=cols.get("uuid", ""),
                    total_mib=_mib(cols.get("memory.total", "")),
                    used_mib=_mib(cols.get("memory.used", "")),
                    free_mib=_mib(cols.get("memory.free", "")),
                    reserved_mib=_mib(cols["memory.reserved"]) if "memory.reserved" in cols else None,
                )
            )
        return rows
    raise RuntimeError(f"nvidia-smi failed: {proc.stderr.strip() or proc.stdout.strip()}")


@dataclass(frozen=True)
class SmiHealth:
    """One row of nvidia-smi --query-gpu=index,utilization.gpu,temperature.gpu."""

    index: int
    utilization_pct: int | None
    temperature_c: int | None
    problem: str  # what nvidia-smi printed instead of a figure ("[GPU requires reset]"), else ""


def query_nvidia_smi_health(smi: str) -> list[SmiHealth]:
    """nvidia-smi's utilization and temperature per GPU; a field it cannot read is named in ``problem``."""
    proc = subprocess.run(
        [smi, f"--query-gpu={','.join(HEALTH_FIELDS)}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"nvidia-smi failed: {proc.stderr.strip() or proc.stdout.strip()}")
    rows: list[SmiHealth] = []
    for line in proc.stdout.splitlines():
        if not line.strip():
            continue
        index, util, temp = (c.strip() for c in line.split(",")[:3])
        problems = [c for c in (util, temp) if c.startswith("[") and c not in ("[N/A]", "[Not Supported]")]
        rows.append(SmiHealth(int(index), _mib(util), _mib(temp), "; ".join(problems)))
    return rows


def compare_health(ours: Gpu, smi: SmiHealth, tolerance_c: int) -> list[str]:
    """Temperature beyond the tolerance, or a health verdict nvidia-smi contradicts, as sentences."""
    problems: list[str] = []
    ours_c, smi_c = ours.temperature_c, smi.temperature_c
    if ours_c is not None and smi_c is not None and abs(ours_c - smi_c) > tolerance_c:
        problems.append(f"GPU {ours.index} temperature: gpu_router {ours_c:.0f} C vs nvidia-smi {smi_c} C")
    if not ours.healthy and not smi.problem:
        problems.append(
            f"GPU {ours.index}: gpu_router says unhealthy ({ours.health_reason}), nvidia-smi reads it"
        )
    if ours.healthy and smi.problem:
        problems.append(
            f"GPU {ours.index}: nvidia-smi cannot read it ({smi.problem}), gpu_router says healthy"
        )
    return problems


def _fmt(value: int | None) -> str:
    return "-" if value is None else str(value)


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.0f}"


def _health(gpu: Gpu) -> str:
    return "ok" if gpu.healthy else f"UNHEALTHY: {gpu.health_reason}"


def _b2mib(value: int | None) -> int | None:
    return None if value is None else round(value / MIB)


def compare(ours: Gpu, smi: SmiGpu, tolerance_mib: int) -> list[str]:
    """Disagreements beyond the tolerance, as sentences (empty when they agree)."""
    problems: list[str] = []

    def check(what: str, mine: int | None, theirs: int | None) -> None:
        if mine is None or theirs is None:
            return
        if abs(mine - theirs) > tolerance_mib:
            problems.append(f"GPU {ours.index} {what}: gpu_router {mine} MiB vs nvidia-smi {theirs} MiB")

    check("total", _b2mib(ours.total_bytes), smi.total_mib)
    check("free", _b2mib(ours.free_bytes), smi.free_mib)
    smi_used = None if smi.total_mib is None or smi.free_mib is None else smi.total_mib - smi.free_mib
    check("used (total - free)", _b2mib(ours.used_bytes), smi_used)
    if smi.uuid and ours.uuid and smi.uuid != ours.uuid:
        problems.append(f"GPU {ours.index} uuid: gpu_router {ours.uuid} vs nvidia-smi {smi.uuid}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Read, print, compare; the exit status says whether they agree."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance-mib", type=int, default=4, help="allowed difference per figure (MiB)")
    parser.add_argument("--tolerance-c", type=int, default=3, help="allowed temperature difference (C)")
    parser.add_argument("--repeat", type=int, default=20, help="extra reads to time after the first")
    args = parser.parse_args(argv)

    source = NvmlSource()
    try:
        t0 = time.perf_counter()
        reading = source.read()
        first_s = time.perf_counter() - t0
        timings = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            source.read()
            timings.append(time.perf_counter() - t0)
    finally:
        source.close()

    print(f"gpu_router NvmlSource: source={reading.source.value} error={reading.error}")
    print(f"  first read (with nvmlInit) {first_s * 1000:.2f} ms", end="")
    if timings:
        print(f"; median of {len(timings)} later reads {statistics.median(timings) * 1000:.3f} ms")
    else:
        print()
    if not reading.gpus:
        if reading.error is not None and reading.error.startswith(NO_DRIVER_ERRORS):
            print("no NVIDIA driver on this machine: nothing to compare")
            return 0
        print("NVML read no GPU")
        return 2
    print(f"  {'idx':>3} {'name':<32} {'total MiB':>10} {'used MiB':>10} {'free MiB':>10}  uuid")
    for g in reading.gpus:
        print(
            f"  {g.index:>3} {g.name:<32} {_fmt(_b2mib(g.total_bytes)):>10} {_fmt(_b2mib(g.used_bytes)):>10}"
            f" {_fmt(_b2mib(g.free_bytes)):>10}  {g.uuid}"
        )
    print(f"  {'idx':>3} {'util %':>7} {'temp C':>7}  health")
    for g in reading.gpus:
        temp = "-" if g.temperature_c is None else f"{g.temperature_c:.0f}"
        print(f"  {g.index:>3} {_pct(g.utilization_ratio):>7} {temp:>7}  {_health(g)}")

    smi_path = shutil.which("nvidia-smi")
    if smi_path is None:
        print("nvidia-smi not found: nothing to compare with")
        return 0
    smi_rows = query_nvidia_smi(smi_path)
    print("nvidia-smi:")
    print(
        f"  {'idx':>3} {'name':<32} {'total MiB':>10} {'used MiB':>10} {'free MiB':>10}"
        f" {'reserved':>10} {'total-free':>10}"
    )
    for r in smi_rows:
        derived = None if r.total_mib is None or r.free_mib is None else r.total_mib - r.free_mib
        sizes = (r.total_mib, r.used_mib, r.free_mib, r.reserved_mib, derived)
        print(f"  {r.index:>3} {r.name:<32} " + " ".join(f"{_fmt(v):>10}" for v in sizes))

    health_rows = query_nvidia_smi_health(smi_path)
    print("nvidia-smi:")
    print(f"  {'idx':>3} {'util %':>7} {'temp C':>7}  health")
    for h in health_rows:
        print(f"  {h.index:>3} {_fmt(h.utilization_pct):>7} {_fmt(h.temperature_c):>7}  {h.problem or 'ok'}")

    problems: list[str] = []
    ours_by_index = {g.index: g for g in reading.gpus}
    health_by_index = {h.index: h for h in health_rows}
    smi_by_index = {r.index: r for r in smi_rows}
    if sorted(ours_by_index) != sorted(smi_by_index):
        problems.append(
            f"GPU indexes differ: gpu_router {sorted(ours_by_index)} vs nvidia-smi {sorted(smi_by_index)}"
        )
    for index in sorted(set(ours_by_index) & set(smi_by_index)):
        problems.extend(compare(ours_by_index[index], smi_by_index[index], args.tolerance_mib))
        if index in health_by_index:
            problems.extend(compare_health(ours_by_index[index], health_by_index[index], args.tolerance_c))

    if problems:
        print(f"DISAGREE (tolerance {args.tolerance_mib} MiB, {args.tolerance_c} C):")
        for p in problems:
            print(f"  {p}")
        return 1
    print(f"AGREE within {args.tolerance_mib} MiB and {args.tolerance_c} C on {len(smi_by_index)} GPU(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
