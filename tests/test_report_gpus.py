"""How the report shows each GPU: health, utilization, temperature, integrated, and the source label."""

from __future__ import annotations

import dataclasses

from builders import cluster, config, node

from gpu_router.planner import plan
from gpu_router.report import Report, build_report, node_tables
from gpu_router.state import GIB, Gpu, GpuReading, VramSource


def report_for(reading: GpuReading) -> Report:
    state = cluster(dataclasses.replace(node("n1"), gpu=reading))
    return build_report(state, plan(state, config()))


def nodes_row(report: Report) -> tuple[str, ...]:
    (row,) = node_tables(report)[0].rows
    return row


def test_healthy_gpu_with_figures_and_an_unhealthy_one() -> None:
    reading = GpuReading(
        VramSource.NVML,
        (
            Gpu(0, "NVIDIA L4", 24 * GIB, GIB, 23 * GIB, utilization_ratio=0.374, temperature_c=61.4),
            Gpu(1, "NVIDIA L4", 24 * GIB, healthy=False, health_reason="NVML: GPU is lost"),
            Gpu(2, "GPU 2", 0, healthy=False, health_reason="NVML: Unknown Error"),
        ),
    )
    report = report_for(reading)
    (n,) = report.to_json()["nodes"]
    assert n["vram_source_detail"] == "nvml"
    g0, g1, g2 = n["gpus"]
    assert (g0["utilization_ratio"], g0["temperature_c"], g0["healthy"]) == (0.374, 61.4, True)
    assert (g1["healthy"], g1["health_reason"]) == (False, "NVML: GPU is lost")
    assert (g2["total_bytes"], g2["used_bytes"], g2["healthy"]) == (0, None, False)
    row = nodes_row(report)
    assert row[2] == "nvml"
    assert row[3] == (
        "0: NVIDIA L4 24.0 GiB (37% busy, 61 C); "
        "1: NVIDIA L4 24.0 GiB (UNHEALTHY: NVML: GPU is lost); "
        "2: GPU 2 ? (UNHEALTHY: NVML: Unknown Error)"
    )


def test_integrated_amd_gpu_and_the_exporter_that_answered() -> None:
    apu = Gpu(0, "AMD Radeon 8060S", 80 * GIB, GIB, 79 * GIB, integrated=True, pci_bus_id="0000:c5:00.0")
    report = report_for(GpuReading(VramSource.EXPORTER, (apu,), detail="amd-device-metrics-exporter"))
    (n,) = report.to_json()["nodes"]
    assert (n["vram_source"], n["vram_source_detail"]) == ("exporter", "amd-device-metrics-exporter")
    assert (n["gpus"][0]["integrated"], n["gpus"][0]["pci_bus_id"]) == (True, "0000:c5:00.0")
    row = nodes_row(report)
    assert (row[2], row[3]) == ("amd-device-metrics-exporter", "0: AMD Radeon 8060S 80.0 GiB (integrated)")


def test_local_amd_reading_is_labelled_amd_sysfs() -> None:
    report = report_for(GpuReading(VramSource.AMD, (Gpu(0, "AMD GPU 1002:744c", 20 * GIB, 0, 20 * GIB),)))
    assert report.nodes[0].vram_source == "amd"
    assert nodes_row(report)[2:4] == ("amd-sysfs", "0: AMD GPU 1002:744c 20.0 GiB")
