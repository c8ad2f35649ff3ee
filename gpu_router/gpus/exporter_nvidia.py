"""NVIDIA exporters' ``/metrics``: dcgm-exporter and utkuozdemir/nvidia_gpu_exporter.

* dcgm-exporter: ``DCGM_FI_DEV_FB_{FREE,USED,RESERVED,TOTAL}`` in MiB, and the byte-unit families of
  newer releases (any ``DCGM_FI_DEV_FB_*_BYTES``; ``..._CAPACITY_BYTES`` is the total). Labels ``gpu``
  (index), ``UUID`` or ``uuid``, ``modelName``. Values at or above 2**63 - 16 are DCGM "blank"
  sentinels, not readings. ``DCGM_FI_DEV_GPU_UTIL`` (%) and ``DCGM_FI_DEV_GPU_TEMP`` (C) where exported;
  ``DCGM_FI_DEV_XID_ERRORS`` (the last XID code) and ``DCGM_EXP_XID_ERRORS_COUNT`` (XIDs in the
  exporter's window, one series per ``xid`` label) feed the health tracker.
* nvidia_gpu_exporter: ``nvidia_smi_memory_{total,used,free,reserved}_bytes{uuid}`` in bytes, with index
  and name joined from ``nvidia_smi_gpu_info`` (or ``nvidia_smi_index``);
  ``nvidia_smi_utilization_gpu_ratio`` (0..1) and ``nvidia_smi_temperature_gpu`` (C).

MIG instances (rows with a ``GPU_I_ID`` label, or ``nvidia_smi_mig_*`` families) are ignored: the router
places models on whole GPUs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from gpu_router.gpus.health import XidSignal
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

log = logging.getLogger(__name__)

DCGM_LABEL = "dcgm-exporter"
NVIDIA_SMI_LABEL = "nvidia_gpu_exporter"

_DCGM_PREFIX = "DCGM_FI_DEV_FB_"
_DCGM_MIB_FAMILIES = {
    "DCGM_FI_DEV_FB_FREE": "free",
    "DCGM_FI_DEV_FB_USED": "used",
    "DCGM_FI_DEV_FB_RESERVED": "reserved",
    "DCGM_FI_DEV_FB_TOTAL": "total",
}
# Order matters: a name is classified by the first token found among its words.
_DCGM_BYTES_TOKENS = (
    ("CAPACITY", "total"),
    ("TOTAL", "total"),
    ("RESERVED", "reserved"),
    ("FREE", "free"),
    ("USED", "used"),
)
_DCGM_UTIL = "DCGM_FI_DEV_GPU_UTIL"
_DCGM_TEMP = "DCGM_FI_DEV_GPU_TEMP"
_DCGM_XID_LAST = "DCGM_FI_DEV_XID_ERRORS"
_DCGM_XID_COUNT = "DCGM_EXP_XID_ERRORS_COUNT"
_SMI_MEMORY_FAMILIES = {
    "nvidia_smi_memory_total_bytes": "total",
    "nvidia_smi_memory_used_bytes": "used",
    "nvidia_smi_memory_free_bytes": "free",
    "nvidia_smi_memory_reserved_bytes": "reserved",
}


def _dcgm_family(name: str) -> tuple[str, bool] | None:
    """``(figure, is_bytes)`` for a dcgm framebuffer family, None for anything else."""
    if name in _DCGM_MIB_FAMILIES:
        return _DCGM_MIB_FAMILIES[name], False
    if name.startswith(_DCGM_PREFIX) and name.endswith("_BYTES"):
        words = set(name[len(_DCGM_PREFIX) : -len("_BYTES")].split("_"))
        for token, what in _DCGM_BYTES_TOKENS:
            if token in words:
                return what, True
    return None


def interpret_dcgm(samples: Iterable[Sample]) -> ExporterMatch:
    """GPUs from dcgm-exporter samples; ``seen`` counts the framebuffer samples."""
    by_key: dict[str, GpuFigures] = {}
    xid_last: dict[str, float] = {}
    xid_count: dict[str, float] = {}
    seen = 0
    mig_rows = 0
    mig_memory_rows = 0
    for s in samples:
        family = _dcgm_family(s.name)
        if family is None and s.name not in (_DCGM_UTIL, _DCGM_TEMP, _DCGM_XID_LAST, _DCGM_XID_COUNT):
            continue
        if family is not None:
            seen += 1
        if s.labels.get("GPU_I_ID", "") != "":
            mig_rows += 1
            mig_memory_rows += family is not None
            continue
        if not is_reading(s.value):
            continue
        uuid = s.labels.get("UUID") or s.labels.get("uuid") or ""
        index = int_label(s.labels.get("gpu"))
        if index is None:
            index = int_label(s.labels.get("device"))
        key = uuid or f"index:{index}"
        fig = by_key.setdefault(key, GpuFigures(index=index, uuid=uuid))
        fig.name = fig.name or s.labels.get("modelName", "")
        if family is not None:
            what, is_bytes = family
            fig.put(what, round(s.value) if is_bytes else round(s.value * MIB), bytes_family=is_bytes)
        elif s.name == _DCGM_UTIL:
            fig.utilization_ratio = percent_ratio(s.value)
        elif s.name == _DCGM_TEMP:
            temperature = celsius(s.value)
            if temperature is not None:
                fig.temperatures_c["gpu"] = temperature
        elif s.name == _DCGM_XID_LAST:
            xid_last[key] = s.value
        else:
            xid_count[key] = xid_count.get(key, 0.0) + s.value
    for key, fig in by_key.items():
        if key in xid_last or key in xid_count:
            fig.xid = XidSignal(last_code=xid_last.get(key), window_count=xid_count.get(key))
    if mig_rows:
        log.debug("dcgm-exporter: ignored %d MIG instance samples", mig_rows)
    match = build_match(by_key.values(), seen)
    if not match.gpus and mig_memory_rows and seen == mig_memory_rows:
        problem = "only MIG instance memory is exported; MIG partitions are not supported"
        return ExporterMatch(match.gpus, (*match.problems, problem), seen, match.xid)
    return match


def interpret_nvidia_smi(samples: Iterable[Sample]) -> ExporterMatch:
    """GPUs from nvidia_gpu_exporter samples; ``seen`` counts the memory samples."""
    by_uuid: dict[str, GpuFigures] = {}
    info: dict[str, tuple[int | None, str]] = {}
    index_metric: dict[str, int] = {}
    seen = 0
    for s in samples:
        uuid = s.labels.get("uuid", "")
        if s.name == "nvidia_smi_gpu_info":
            info[uuid] = (int_label(s.labels.get("index")), s.labels.get("name", ""))
        elif s.name == "nvidia_smi_index" and math.isfinite(s.value) and s.value >= 0:
            index_metric[uuid] = int(s.value)
        elif s.name in _SMI_MEMORY_FAMILIES:
            seen += 1
            if is_reading(s.value):
                fig = by_uuid.setdefault(uuid, GpuFigures(uuid=uuid))
                fig.put(_SMI_MEMORY_FAMILIES[s.name], round(s.value), bytes_family=True)
        elif s.name == "nvidia_smi_utilization_gpu_ratio":
            by_uuid.setdefault(uuid, GpuFigures(uuid=uuid)).utilization_ratio = percent_ratio(
                s.value, scale=1.0
            )
        elif s.name == "nvidia_smi_temperature_gpu":
            temperature = celsius(s.value)
            if temperature is not None:
                by_uuid.setdefault(uuid, GpuFigures(uuid=uuid)).temperatures_c["gpu"] = temperature
    for uuid, fig in by_uuid.items():
        index, name = info.get(uuid, (None, ""))
        fig.index = index if index is not None else index_metric.get(uuid)
        fig.name = name
    return build_match(by_uuid.values(), seen)
