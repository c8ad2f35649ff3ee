"""The table of GPU source kinds: config validation, the factory and the report all follow it."""

from __future__ import annotations

import pytest

from gpu_router.config import ConfigError, GpuSpec, NodeConfig, parse_config
from gpu_router.gpus import AutoSource, make_gpu_source
from gpu_router.gpus.kinds import (
    AUTO,
    GPU_SOURCE_KINDS,
    Builder,
    GpuSourceKind,
    config_keys,
    config_syntax,
    config_words,
    exporter_labels,
    source_label,
)
from gpu_router.state import MIB, VramSource

EXAMPLE_VALUE = {"url": "http://10.0.0.12:9400/metrics", "mib": "[8192]"}


def gpu_spec(yaml_value: str) -> GpuSpec:
    config = parse_config(f"nodes:\n  - url: http://10.0.0.12:11434\n    gpu: {yaml_value}\n", "t.yaml")
    return config.nodes[0].gpu


@pytest.mark.parametrize("kind", GPU_SOURCE_KINDS, ids=[k.name for k in GPU_SOURCE_KINDS])
def test_every_kind_parses_and_builds_its_source(kind: GpuSourceKind) -> None:
    written = kind.name if kind.value == "word" else f"{{{kind.config_key}: {EXAMPLE_VALUE[kind.value]}}}"
    assert kind.syntax in config_syntax()
    spec = gpu_spec(written)
    assert spec.kind == kind.name
    source = make_gpu_source(NodeConfig("n", "http://10.0.0.12:11434", spec), 2.0, is_local=lambda h: False)
    try:
        assert source.kind is kind.source
        assert source_label(source.kind) == kind.label
    finally:
        source.close()


def test_the_parsed_values_reach_the_spec() -> None:
    assert gpu_spec("{exporter: http://10.0.0.12:5000}").exporter_url == "http://10.0.0.12:5000/metrics"
    assert gpu_spec("{vram_mb: [8192, 4096]}").vram_bytes == (8192 * MIB, 4096 * MIB)
    assert gpu_spec("AMD").kind == "amd"
    assert gpu_spec("auto") == GpuSpec()


def test_config_accepts_exactly_the_table() -> None:
    assert config_words() == (AUTO, "nvml", "amd", "none")
    assert config_keys() == ("exporter", "vram_mb")
    assert config_syntax() == "auto, nvml, amd, none, {exporter: URL} or {vram_mb: N}"


def test_a_near_miss_is_answered_from_the_table() -> None:
    with pytest.raises(ConfigError) as caught:
        gpu_spec("amdd")
    assert str(caught.value) == (
        "t.yaml:3: nodes[0].gpu: expected auto, nvml, amd, none, {exporter: URL} or {vram_mb: N}, "
        "got a string 'amdd' (did you mean 'amd'?)"
    )


def test_auto_on_this_machine_tries_the_local_kinds_in_table_order() -> None:
    tried: list[str] = []

    def recording(name: str) -> Builder:
        def build(spec: GpuSpec, timeout_s: float) -> AutoSource:
            tried.append(name)
            return AutoSource([])

        return build

    local = [k.name for k in GPU_SOURCE_KINDS if k.local]
    assert local == ["nvml", "amd"]
    source = make_gpu_source(
        NodeConfig("n", "http://127.0.0.1:11434"),
        2.0,
        builders={k.name: recording(k.name) for k in GPU_SOURCE_KINDS},
        is_local=lambda h: True,
    )
    assert isinstance(source, AutoSource)
    assert tried == local


def test_report_labels() -> None:
    assert source_label(VramSource.EXPORTER, "omnistat") == "omnistat"
    assert source_label(VramSource.EXPORTER) == "exporter"
    assert source_label(VramSource.AMD) == "amd-sysfs"
    assert source_label(VramSource.UNKNOWN) == "unknown"
    assert exporter_labels() == (
        "dcgm-exporter",
        "nvidia_gpu_exporter",
        "amd-device-metrics-exporter",
        "omnistat",
    )
