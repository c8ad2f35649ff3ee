"""The small enumerations of the observed records (re-exported by :mod:`gpu_router.state`).

A module of their own so that checking a config, which names GPU source kinds, does not have to
build the record classes of :mod:`gpu_router.state` (a third of ``--check-config``'s start-up).
"""

from __future__ import annotations

import enum


class NodeStatus(str, enum.Enum):
    """What a node is, judged over its recent polls (see ``observe.NodeHealth``)."""

    UP = "up"
    # Answers, but badly (5xx, bodies it cannot read), or missed fewer polls in a row than down_after.
    DEGRADED = "degraded"
    DOWN = "down"  # no answer (refused, DNS, timeout) for down_after polls in a row
    ERROR = "degraded"  # an alias: what one failed call says about a node that answered badly


class VramSource(str, enum.Enum):
    """Where a node's GPU memory figures came from."""

    NVML = "nvml"
    AMD = "amd"  # this machine's AMD GPUs, read from the amdgpu driver's sysfs files
    EXPORTER = "exporter"
    STATIC = "static"
    NONE = "none"  # configured CPU-only
    UNKNOWN = "unknown"  # no source configured, or the source failed


class Processor(str, enum.Enum):
    """Where a loaded model sits, as ``ollama ps`` would say."""

    GPU = "gpu"
    CPU = "cpu"
    PARTIAL = "partial"
