"""Check gpu_router's NVML reading against nvidia-smi on a real GPU machine.

Run from the repository root: ``python bench/nvml_check.py [--tolerance-mib 4]``.

Prints what :class:`gpu_router.gpus.nvml.NvmlSource` reads, then nvidia-smi's view of the same GPUs, side by
side. Total and free must agree within the tolerance. gpu_router's *used* is total - free (driver-reserved
memory counts as used), while nvidia-smi's ``memory.used`` excludes ``memory.reserved`` on recent drivers, so
used is compared with nvidia-smi's total - free and smi's own used/reserved are shown for information.

Exit status: 0 agree (or nvidia-smi absent and NVML read fine), 1 disagree, 2 NVML could not read any GPU.
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


def _fmt(value: int | None) -> str:
    return "-" if value is None else str(value)


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
    print(f"  {'idx':>3} {'name':<32} {'total MiB':>10} {'used MiB':>10} {'free MiB':>10}  uuid")
    for g in reading.gpus:
        print(
            f"  {g.index:>3} {g.name:<32} {_fmt(_b2mib(g.total_bytes)):>10} {_fmt(_b2mib(g.used_bytes)):>10}"
            f" {_fmt(_b2mib(g.free_bytes)):>10}  {g.uuid}"
        )
    if not reading.gpus:
        print("NVML read no GPU")
        return 2

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

    problems: list[str] = []
    ours_by_index = {g.index: g for g in reading.gpus}
    smi_by_index = {r.index: r for r in smi_rows}
    if sorted(ours_by_index) != sorted(smi_by_index):
        problems.append(
            f"GPU indexes differ: gpu_router {sorted(ours_by_index)} vs nvidia-smi {sorted(smi_by_index)}"
        )
    for index in sorted(set(ours_by_index) & set(smi_by_index)):
        problems.extend(compare(ours_by_index[index], smi_by_index[index], args.tolerance_mib))

    if problems:
        print(f"DISAGREE (tolerance {args.tolerance_mib} MiB):")
        for p in problems:
            print(f"  {p}")
        return 1
    print(f"AGREE within {args.tolerance_mib} MiB on {len(smi_by_index)} GPU(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
