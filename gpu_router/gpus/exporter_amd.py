"""AMD exporters' ``/metrics``: ROCm device-metrics-exporter and omnistat.

* ROCm/device-metrics-exporter (default ``:5000/metrics``): ``gpu_total_vram``, ``gpu_used_vram``,
  ``gpu_free_vram`` and the ``gpu_*_gtt`` twins in MB (MiB: amd-smi divides bytes by 2**20);
  ``gpu_gfx_activity`` (%); ``gpu_junction_temperature`` / ``gpu_edge_temperature`` (C);
  ``gpu_health`` (1 healthy, 0 not; exported only where a health state exists). The GPU index is the
  ``gpu_id`` label, the UUID ``gpu_uuid``, the name ``card_series`` or ``card_model``. Every name may
  carry the exporter's optional ``amd_`` prefix (``amd_gpu_total_vram``).
* ROCm/omnistat: ``rocm_vram_total_bytes`` (bytes), ``rocm_vram_used_percentage``,
  ``rocm_utilization_percentage``, ``rocm_temperature_celsius{location}``; the index is the ``card``
  label and the name the ``type`` label of ``rocm_version_info``.

A field a card does not support reads 0 (the MI300X edge temperature, for one): a 0 temperature, a 0
total, or used and free both 0 are unknown, not measurements. A 0 % activity is kept as 0: an idle
GPU reads exactly that, and nothing tells the two apart.
"""

from __future__ import annotations

from collections.abc import Iterable

from gpu_router.gpus.amd_sysfs import is_integrated
from gpu_router.gpus.scrape import (
    ExporterMatch,
    GpuFigures,
    Sample,
    build_match,
    celsius,
    int_label,
    is_reading,
    percent_ratio,
)
from gpu_router.state import MIB

DEVICE_METRICS_LABEL = "amd-device-metrics-exporter"
OMNISTAT_LABEL = "omnistat"

_OPTIONAL_PREFIX = "amd_"
_DME_MEMORY = {
    "gpu_total_vram": "total",
    "gpu_used_vram": "used",
    "gpu_free_vram": "free",
}
_DME_GTT = {
    "gpu_total_gtt": "gtt_total",
    "gpu_used_gtt": "gtt_used",
    "gpu_free_gtt": "gtt_free",
}
_DME_TEMPERATURES = {
    "gpu_junction_temperature": "junction",
    "gpu_edge_temperature": "edge",
}
_TEMPERATURE_PREFERENCE = ("junction", "hotspot", "edge")


def _dme_name(name: str) -> str:
    """The metric name without the exporter's optional ``amd_`` prefix."""
    if name.startswith(_OPTIONAL_PREFIX + "gpu_"):
        return name[len(_OPTIONAL_PREFIX) :]
    return name


def _settle_amd_memory(fig: GpuFigures) -> None:
    """Drop figures that mean "not supported", then fold GTT in for an integrated GPU (as Ollama does)."""
    figures = fig.figures
    if figures.get("total") == 0:
        del figures["total"]
    if figures.get("used") == 0 and figures.get("free") == 0 and figures.get("total", 1) > 0:
        del figures["used"], figures["free"]
    vram_total = figures.get("total")
    if vram_total is None and "used" in figures and "free" in figures:
        vram_total = figures["used"] + figures["free"]
    gtt_total = figures.pop("gtt_total", None)
    gtt_used = figures.pop("gtt_used", None)
    gtt_free = figures.pop("gtt_free", None)
    if gtt_total is None and gtt_used is not None and gtt_free is not None:
        gtt_total = gtt_used + gtt_free
    if vram_total is None or gtt_total is None or not is_integrated(vram_total, gtt_total):
        return
    fig.integrated = True
    figures["total"] = vram_total + gtt_total
    # Used and free are only meaningful as VRAM + GTT together; half a pair would mislead.
    if "used" in figures and gtt_used is not None:
        figures["used"] += gtt_used
    else:
        figures.pop("used", None)
    if "free" in figures and gtt_free is not None:
        figures["free"] += gtt_free
    else:
        figures.pop("free", None)


def interpret_amd_device_metrics(samples: Iterable[Sample]) -> ExporterMatch:
    """GPUs from ROCm device-metrics-exporter samples; ``seen`` counts the VRAM samples."""
    by_key: dict[str, GpuFigures] = {}
    seen = 0
    for s in samples:
        name = _dme_name(s.name)
        memory = _DME_MEMORY.get(name) or _DME_GTT.get(name)
        if name in _DME_MEMORY:
            seen += 1
        if (
            memory is None
            and name not in _DME_TEMPERATURES
            and name not in ("gpu_gfx_activity", "gpu_health")
        ):
            continue
        if not is_reading(s.value):
            continue
        gpu_id = s.labels.get("gpu_id", "")
        uuid = s.labels.get("gpu_uuid", "")
        # Partitions of one card share its UUID but not their gpu_id, so the id keys the figures.
        key = f"id:{gpu_id}" if gpu_id else uuid
        fig = by_key.setdefault(key, GpuFigures(index=int_label(gpu_id)))
        # Extra labels (uuid, series) are optional per exporter config: take them from any series.
        fig.uuid = fig.uuid or uuid
        fig.name = fig.name or s.labels.get("card_series", "") or s.labels.get("card_model", "")
        if memory is not None:
            fig.put(memory, round(s.value * MIB), bytes_family=False)
        elif name in _DME_TEMPERATURES:
            temperature = celsius(s.value)
            if temperature is not None:
                fig.temperatures_c[_DME_TEMPERATURES[name]] = temperature
        elif name == "gpu_gfx_activity":
            fig.utilization_ratio = percent_ratio(s.value)
        elif s.value == 0:  # gpu_health
            fig.health_reasons.append("the exporter reports gpu_health 0")
    for fig in by_key.values():
        _settle_amd_memory(fig)
    return build_match(by_key.values(), seen, temperature_preference=_TEMPERATURE_PREFERENCE)


def interpret_omnistat(samples: Iterable[Sample]) -> ExporterMatch:
    """GPUs from omnistat samples; ``seen`` counts the VRAM samples."""
    by_card: dict[str, GpuFigures] = {}
    names: dict[str, str] = {}
    seen = 0
    for s in samples:
        card = s.labels.get("card", "")
        if s.name == "rocm_version_info":
            names[card] = s.labels.get("type", "")
            continue
        if s.name in ("rocm_vram_total_bytes", "rocm_vram_used_percentage"):
            seen += 1
        elif s.name not in ("rocm_utilization_percentage", "rocm_temperature_celsius"):
            continue
        if not is_reading(s.value):
            continue
        fig = by_card.setdefault(card, GpuFigures(index=int_label(card)))
        if s.name == "rocm_vram_total_bytes":
            if s.value > 0:
                fig.put("total", round(s.value), bytes_family=True)
        elif s.name == "rocm_vram_used_percentage":
            fig.used_ratio = percent_ratio(s.value)
        elif s.name == "rocm_utilization_percentage":
            fig.utilization_ratio = percent_ratio(s.value)
        else:
            temperature = celsius(s.value)
            if temperature is not None:
                fig.temperatures_c[s.labels.get("location", "") or "gpu"] = temperature
    for card, fig in by_card.items():
        fig.name = names.get(card, "")
    return build_match(by_card.values(), seen, temperature_preference=_TEMPERATURE_PREFERENCE)
