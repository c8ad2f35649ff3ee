"""The one table of GPU source kinds: what ``nodes[].gpu`` may say, and what each answer builds.

Config validation (which words and keys ``gpu:`` accepts), the factory (which source to build, and
which ones ``auto`` tries on this machine) and the report (the SOURCE label) all read
:data:`GPU_SOURCE_KINDS`. A new vendor is one row here and one module beside this one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from gpu_router.enums import VramSource
from gpu_router.records import record

if TYPE_CHECKING:  # config imports this module at parse time; a runtime import back would be a cycle
    from gpu_router.config import GpuSpec
    from gpu_router.gpus import GpuSource

AMD_SYSFS_LABEL = "amd-sysfs"
"""The report's SOURCE label for this machine's AMD GPUs read from sysfs."""

AUTO = "auto"
"""The default ``gpu:`` word: try the local kinds on this machine, else say how to configure one."""

ConfigValue = Literal["word", "url", "mib"]
Builder = Callable[["GpuSpec", float], "GpuSource"]


@record
class GpuSourceKind:
    """One row of the table."""

    name: str  # GpuSpec.kind, and the bare ``gpu:`` word for a "word" kind
    config_key: str  # the mapping key (``{exporter: URL}``); empty for a bare word
    value: ConfigValue  # what the config gives: a bare word, a URL, or MiB per GPU
    source: VramSource  # what a successful reading's ``source`` is (JSON ``vram_source``)
    label: str  # the report's SOURCE label when the reading names nothing finer (``GpuReading.detail``)
    auto: str  # how ``gpu: auto`` finds it, in words
    local: bool  # ``auto`` tries it, in table order, when the node's URL is this machine
    build: Builder

    @property
    def syntax(self) -> str:
        """How the kind is written in the config file."""
        if self.value == "word":
            return self.name
        return f"{{{self.config_key}: {'URL' if self.value == 'url' else 'N'}}}"


# Builders import their source's module when called: config validation reads this table, and
# --check-config must not load an HTTP client or NVML just to know which words gpu: accepts.


def _nvml(spec: GpuSpec, timeout_s: float) -> GpuSource:
    from gpu_router.gpus.nvml import NvmlSource

    return NvmlSource()


def _amd(spec: GpuSpec, timeout_s: float) -> GpuSource:
    from gpu_router.gpus.amd_sysfs import AmdSysfsSource

    return AmdSysfsSource()


def _exporter(spec: GpuSpec, timeout_s: float) -> GpuSource:
    if not spec.exporter_url:
        from gpu_router.gpus.static import UnknownSource

        return UnknownSource("gpu kind is exporter but no exporter URL is configured")
    from gpu_router.gpus.exporter import ExporterSource

    return ExporterSource(spec.exporter_url, timeout_s, ca_file=spec.ca_file, tls_verify=spec.tls_verify)


def _static(spec: GpuSpec, timeout_s: float) -> GpuSource:
    from gpu_router.gpus.static import StaticSource

    return StaticSource(spec.vram_bytes)


def _none(spec: GpuSpec, timeout_s: float) -> GpuSource:
    from gpu_router.gpus.static import NoGpuSource

    return NoGpuSource()


GPU_SOURCE_KINDS: tuple[GpuSourceKind, ...] = (
    GpuSourceKind(
        name="nvml",
        config_key="",
        value="word",
        source=VramSource.NVML,
        label="nvml",
        auto="on this machine: NVML initialises and lists a GPU",
        local=True,
        build=_nvml,
    ),
    GpuSourceKind(
        name="amd",
        config_key="",
        value="word",
        source=VramSource.AMD,
        label=AMD_SYSFS_LABEL,
        auto="on this machine: a /sys/class/drm card with vendor 0x1002 and amdgpu memory files",
        local=True,
        build=_amd,
    ),
    GpuSourceKind(
        name="exporter",
        config_key="exporter",
        value="url",
        source=VramSource.EXPORTER,
        label="exporter",  # a successful scrape names its exporter: see EXPORTER_KINDS
        auto="never: needs the exporter's URL",
        local=False,
        build=_exporter,
    ),
    GpuSourceKind(
        name="static",
        config_key="vram_mb",
        value="mib",
        source=VramSource.STATIC,
        label="static",
        auto="never: needs the sizes",
        local=False,
        build=_static,
    ),
    GpuSourceKind(
        name="none",
        config_key="",
        value="word",
        source=VramSource.NONE,
        label="none",
        auto="never: a CPU-only node must say so",
        local=False,
        build=_none,
    ),
)


def exporter_labels() -> tuple[str, ...]:
    """What ``GpuReading.detail`` can name for an exporter reading."""
    from gpu_router.gpus.exporter import EXPORTER_KINDS

    return tuple(k.label for k in EXPORTER_KINDS)


def kind_named(name: str) -> GpuSourceKind | None:
    """The row for a ``GpuSpec.kind``; None for ``auto`` or an unknown name."""
    return next((k for k in GPU_SOURCE_KINDS if k.name == name), None)


def config_words() -> tuple[str, ...]:
    """The bare words ``gpu:`` accepts: ``auto`` and every "word" kind."""
    return (AUTO, *(k.name for k in GPU_SOURCE_KINDS if k.value == "word"))


def config_keys() -> tuple[str, ...]:
    """The mapping keys ``gpu:`` accepts (``exporter``, ``vram_mb``)."""
    return tuple(k.config_key for k in GPU_SOURCE_KINDS if k.config_key)


def kind_for_key(key: str) -> GpuSourceKind | None:
    """The row written as ``{key: ...}``."""
    return next((k for k in GPU_SOURCE_KINDS if k.config_key and k.config_key == key), None)


def config_syntax() -> str:
    """Every way to write ``gpu:``, for error messages: ``auto, nvml, amd, none, {exporter: URL} or ...``."""
    forms = [AUTO, *(k.syntax for k in GPU_SOURCE_KINDS if k.value == "word")]
    forms += [k.syntax for k in GPU_SOURCE_KINDS if k.value != "word"]
    return ", ".join(forms[:-1]) + " or " + forms[-1]


def source_label(source: VramSource, detail: str = "") -> str:
    """The report's SOURCE label for a reading: its ``detail``, else its kind's label, else the source."""
    if detail:
        return detail
    row = next((k for k in GPU_SOURCE_KINDS if k.source is source), None)
    return row.label if row is not None else source.value
