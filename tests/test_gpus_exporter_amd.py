"""ROCm device-metrics-exporter and omnistat: the real samples, bodies built from their lines, and HTTP."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_gpus_exporter import ExporterServer, Route, read

from gpu_router.gpus.exporter import interpret_samples
from gpu_router.gpus.exporter_amd import interpret_amd_device_metrics, interpret_omnistat
from gpu_router.gpus.scrape import parse_prometheus_text
from gpu_router.state import GIB, MIB, Gpu, VramSource

FIXTURES = Path(__file__).parent / "fixtures" / "amd"
DME_SAMPLE = (FIXTURES / "device-metrics-exporter.prom").read_text()
OMNISTAT_SAMPLE = (FIXTURES / "omnistat.prom").read_text()


def consumer_labels() -> str:
    """The label set of the real consumer Radeon scrape (first excerpt), with its gpu_id as {id}."""
    line = next(line for line in DME_SAMPLE.splitlines() if line.startswith("gpu_free_vram{"))
    labels = line[line.index("{") + 1 : line.rindex("}")]
    return labels.replace('gpu_id="0"', 'gpu_id="{id}"')


LABELS = consumer_labels()


def dme(*rows: tuple[str, int, float], prefix: str = "") -> str:
    """A device-metrics-exporter body: ``(metric, gpu_id, value)`` rows with the real sample's labels."""
    return "".join(
        f"{prefix}{name}{{{LABELS.replace('{id}', str(gpu))}}} {value}\n" for name, gpu, value in rows
    )


def gpus_of(text: str) -> tuple[Gpu, ...]:
    samples, bad = parse_prometheus_text(text)
    assert bad == 0
    return interpret_amd_device_metrics(samples).gpus


@pytest.fixture
def server() -> Iterator[ExporterServer]:
    srv = ExporterServer()
    yield srv
    srv.stop()


# -- the real samples ------------------------------------------------------------------------------------


def test_real_device_metrics_scrape_over_http(server: ExporterServer) -> None:
    server.routes["/metrics"] = Route(body=DME_SAMPLE.encode())
    reading = read(server.url("/metrics"))
    assert reading.source is VramSource.EXPORTER
    assert reading.detail == "amd-device-metrics-exporter"
    assert reading.error is None
    # Four excerpts, every one gpu_id 0: one GPU. The total is not in the excerpt: free + used (MiB).
    (gpu,) = reading.gpus
    assert gpu.index == 0
    assert (gpu.total_bytes, gpu.used_bytes, gpu.free_bytes) == ((24534 + 26) * MIB, 26 * MIB, 24534 * MIB)
    # 24 GiB of VRAM is no integrated GPU, so the 16 GB of GTT is not counted
    assert not gpu.integrated
    # the MI300X VF's edge temperature reads 0 (not supported there): unknown, not 0 C
    assert gpu.temperature_c is None
    # gfx activity 0 is an idle GPU as far as anyone can tell
    assert gpu.utilization_ratio == 0.0
    assert gpu.name == "Aqua Vanjaram [Instinct MI300X VF]"
    assert gpu.uuid == "17ff74b5-0000-1000-805c-37b0fbe69430"
    assert gpu.healthy


def test_real_omnistat_sample_has_no_memory_lines_and_says_what_was_expected() -> None:
    samples, bad = parse_prometheus_text(OMNISTAT_SAMPLE)
    assert (bad, len(samples)) == (0, 5)
    assert interpret_samples(samples) is None
    assert interpret_omnistat(samples).seen == 0


def test_no_memory_families_error_names_the_amd_exporters(server: ExporterServer) -> None:
    server.routes["/metrics"] = Route(body=OMNISTAT_SAMPLE.encode())
    error = read(server.url("/metrics")).error
    assert error is not None
    assert "device-metrics-exporter gpu_*_vram" in error
    assert "omnistat rocm_vram_*" in error


# -- bodies built from the samples -----------------------------------------------------------------------


def test_two_gpus_with_totals_temperatures_and_health() -> None:
    body = dme(
        ("gpu_total_vram", 0, 196592),
        ("gpu_used_vram", 0, 4096),
        ("gpu_free_vram", 0, 192496),
        ("gpu_junction_temperature", 0, 48),
        ("gpu_edge_temperature", 0, 40),
        ("gpu_gfx_activity", 0, 87),
        ("gpu_health", 0, 1),
        ("gpu_total_vram", 1, 196592),
        ("gpu_used_vram", 1, 0),
        ("gpu_free_vram", 1, 196592),
        ("gpu_edge_temperature", 1, 39),
        ("gpu_health", 1, 0),
    )
    first, second = gpus_of(body)
    assert (first.total_bytes, first.used_bytes, first.free_bytes) == (196592 * MIB, 4096 * MIB, 192496 * MIB)
    assert (first.temperature_c, first.utilization_ratio, first.healthy) == (48.0, 0.87, True)
    assert (second.index, second.used_bytes, second.temperature_c) == (1, 0, 39.0)
    assert second.utilization_ratio is None  # not exported for this GPU
    assert (second.healthy, second.health_reason) == (False, "the exporter reports gpu_health 0")


def test_the_amd_prefix_is_understood(server: ExporterServer) -> None:
    body = dme(("gpu_total_vram", 0, 24560), ("gpu_used_vram", 0, 26), ("gpu_health", 0, 0), prefix="amd_")
    assert body.startswith("amd_gpu_total_vram{")
    server.routes["/metrics"] = Route(body=body.encode())
    reading = read(server.url("/metrics"))
    assert reading.detail == "amd-device-metrics-exporter"
    (gpu,) = reading.gpus
    assert (gpu.total_bytes, gpu.used_bytes, gpu.healthy) == (24560 * MIB, 26 * MIB, False)


def test_total_only_leaves_usage_unknown() -> None:
    (gpu,) = gpus_of(dme(("gpu_total_vram", 0, 16368)))
    assert (gpu.total_bytes, gpu.used_bytes, gpu.free_bytes) == (16368 * MIB, None, None)


def test_used_only_has_no_total_and_the_reading_says_so(server: ExporterServer) -> None:
    server.routes["/metrics"] = Route(body=dme(("gpu_used_vram", 0, 26)).encode())
    reading = read(server.url("/metrics"))
    assert reading.source is VramSource.UNKNOWN
    assert reading.error is not None
    assert reading.error.endswith(
        "amd-device-metrics-exporter reports no usable GPU memory (GPU 0 has no total memory figure)"
    )


def test_zeros_that_mean_not_supported_are_unknown() -> None:
    (gpu,) = gpus_of(
        dme(
            ("gpu_total_vram", 0, 65520),
            ("gpu_used_vram", 0, 0),
            ("gpu_free_vram", 0, 0),
            ("gpu_junction_temperature", 0, 0),
        )
    )
    assert (gpu.total_bytes, gpu.used_bytes, gpu.free_bytes, gpu.temperature_c) == (
        65520 * MIB,
        None,
        None,
        None,
    )


def test_a_zero_total_is_unknown_and_free_plus_used_stands_in() -> None:
    (gpu,) = gpus_of(dme(("gpu_total_vram", 0, 0), ("gpu_used_vram", 0, 26), ("gpu_free_vram", 0, 24534)))
    assert gpu.total_bytes == 24560 * MIB


def test_an_apu_is_integrated_and_counts_gtt() -> None:
    body = dme(
        ("gpu_total_vram", 0, 512),
        ("gpu_used_vram", 0, 100),
        ("gpu_free_vram", 0, 412),
        ("gpu_total_gtt", 0, 16384),
        ("gpu_used_gtt", 0, 15),
        ("gpu_free_gtt", 0, 16369),
    )
    (gpu,) = gpus_of(body)
    assert gpu.integrated
    assert (gpu.total_bytes, gpu.used_bytes, gpu.free_bytes) == (
        (512 + 16384) * MIB,
        115 * MIB,
        (412 + 16369) * MIB,
    )


def test_gtt_alone_never_makes_a_discrete_card_integrated() -> None:
    (gpu,) = gpus_of(dme(("gpu_total_vram", 0, 8176), ("gpu_used_vram", 0, 10), ("gpu_total_gtt", 0, 65536)))
    assert (gpu.integrated, gpu.total_bytes) == (False, 8176 * MIB)


def test_duplicate_series_from_kubernetes_pods_keep_the_first() -> None:
    first = dme(("gpu_total_vram", 0, 8176), ("gpu_used_vram", 0, 10))
    second = re.sub(r'pod=""', 'pod="other"', dme(("gpu_total_vram", 0, 9999), ("gpu_used_vram", 0, 20)))
    (gpu,) = gpus_of(first + second)
    assert (gpu.total_bytes, gpu.used_bytes) == (8176 * MIB, 10 * MIB)


def test_omnistat_body_built_from_the_sample() -> None:
    body = OMNISTAT_SAMPLE + (
        'rocm_vram_total_bytes{card="1"} 68702699520\n'
        'rocm_vram_used_percentage{card="1"} 25.0\n'
        'rocm_utilization_percentage{card="1"} 100.0\n'
        'rocm_vram_total_bytes{card="0"} 68702699520\n'
        'rocm_vram_used_percentage{card="0"} 0.0\n'
    )
    samples, _ = parse_prometheus_text(body)
    found = interpret_samples(samples)
    assert found is not None
    kind, match = found
    assert kind.label == "omnistat"
    card0, card1 = match.gpus
    assert (card1.index, card1.name, card1.total_bytes) == (1, "Instinct MI210", 68702699520)
    assert card1.used_bytes == round(68702699520 * 0.25)
    assert (card1.utilization_ratio, card1.temperature_c) == (1.0, 50.0)
    assert (card0.used_bytes, card0.free_bytes, card0.name) == (0, 68702699520, "GPU 0")
    assert card0.temperature_c is None  # only HBM sensors for card 0, which are not the GPU's
    assert card1.total_bytes < 64 * GIB + GIB


def test_omnistat_junction_beats_edge() -> None:
    samples, _ = parse_prometheus_text(
        'rocm_vram_total_bytes{card="0"} 1e9\n'
        'rocm_temperature_celsius{card="0",location="edge"} 40\n'
        'rocm_temperature_celsius{card="0",location="junction"} 55\n'
    )
    (gpu,) = interpret_omnistat(samples).gpus
    assert gpu.temperature_c == 55.0
    assert (gpu.used_bytes, gpu.free_bytes) == (None, None)
