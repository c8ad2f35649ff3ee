"""Prometheus text exposition, and the bookkeeping every GPU exporter interpreter shares.

:func:`parse_prometheus_text` turns a ``/metrics`` page into :class:`Sample` records. The exporter
interpreters (``exporter_nvidia``, ``exporter_amd``) gather each GPU's figures in a
:class:`GpuFigures` and hand them to :func:`build_match`, which gives an :class:`ExporterMatch`.
Nothing here does I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from gpu_router.gpus.health import XidSignal
from gpu_router.records import field, record
from gpu_router.state import Gpu

# DCGM_FT_INT64_BLANK (0x7ffffffffffffff0) and its neighbours up to 0x...f3 mark missing values.
DCGM_SENTINEL_MIN = 9223372036854775792
_SENTINEL_FLOAT = float(DCGM_SENTINEL_MIN)


@record
class Sample:
    """One line of Prometheus text exposition."""

    name: str
    labels: Mapping[str, str]
    value: float


class PromParseError(ValueError):
    """A line that is not valid text exposition."""


def parse_prometheus_text(text: str) -> tuple[list[Sample], int]:
    """Parse text exposition into samples; returns ``(samples, number_of_malformed_lines)``.

    Comments (``# HELP``, ``# TYPE``, ``# EOF``) are skipped. Malformed lines are counted, not raised, so
    one bad line from an exporter does not hide every GPU.
    """
    samples: list[Sample] = []
    bad = 0
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            samples.append(parse_sample_line(line))
        except PromParseError:
            bad += 1
    return samples, bad


def _is_name_start(ch: str) -> bool:
    return ch.isascii() and (ch.isalpha() or ch in "_:")


def _is_name_char(ch: str) -> bool:
    return ch.isascii() and (ch.isalnum() or ch in "_:")


# The common line whole: a name, labels whose values have no escapes, a value, maybe a timestamp.
# Equivalent to the scanner below for every line it matches (a test holds the two to it); any
# other line goes to the scanner, which also says what is wrong. One scrape of a DCGM exporter
# through the scanner alone cost about as much CPU as the request that fetched it.
_PLAIN_LINE = re.compile(
    r"([A-Za-z_:][A-Za-z0-9_:]*)(?=[ \t{])[ \t]*"
    r'(?:\{((?:[ \t]*[A-Za-z0-9_]+[ \t]*=[ \t]*"[^"\\]*"[ \t]*,)*'
    r'(?:[ \t]*[A-Za-z0-9_]+[ \t]*=[ \t]*"[^"\\]*")?)[ \t]*\})?'
    r"[ \t]*([^\s{]\S*)(?:[ \t]+\S+)?[ \t]*"
)
_PLAIN_LABEL = re.compile(r'([A-Za-z0-9_]+)[ \t]*=[ \t]*"([^"]*)"')


def parse_sample_line(line: str) -> Sample:
    """Parse ``name{label="value",...} value [timestamp]``; raises :class:`PromParseError`."""
    plain = _PLAIN_LINE.fullmatch(line)
    if plain is None:
        return _scan_sample_line(line)
    name, block, value = plain.groups()
    labels = dict(_PLAIN_LABEL.findall(block)) if block else {}
    try:
        number = float(value)
    except ValueError:
        raise PromParseError(f"bad value {value[:40]!r}") from None
    return Sample(name, MappingProxyType(labels), number)


def _scan_sample_line(line: str) -> Sample:
    n = len(line)
    if not line or not _is_name_start(line[0]):
        raise PromParseError(f"no metric name: {line[:80]!r}")
    i = 1
    while i < n and _is_name_char(line[i]):
        i += 1
    name = line[:i]
    while i < n and line[i] in " \t":
        i += 1
    labels: dict[str, str] = {}
    if i < n and line[i] == "{":
        i = _parse_labels(line, i + 1, labels)
    rest = line[i:].split()
    if not rest or len(rest) > 2:
        raise PromParseError(f"expected a value and an optional timestamp: {line[:80]!r}")
    try:
        value = float(rest[0])
    except ValueError:
        raise PromParseError(f"bad value {rest[0][:40]!r}") from None
    return Sample(name, MappingProxyType(labels), value)


def _parse_labels(line: str, i: int, labels: dict[str, str]) -> int:
    """Parse from just after ``{``; fills ``labels`` and returns the index after ``}``."""
    n = len(line)
    while True:
        while i < n and line[i] in " \t":
            i += 1
        if i < n and line[i] == "}":
            return i + 1
        start = i
        while i < n and _is_name_char(line[i]) and line[i] != ":":
            i += 1
        key = line[start:i]
        if not key:
            raise PromParseError(f"bad label name at column {start}")
        while i < n and line[i] in " \t":
            i += 1
        if i >= n or line[i] != "=":
            raise PromParseError(f"expected '=' after label {key!r}")
        i += 1
        while i < n and line[i] in " \t":
            i += 1
        if i >= n or line[i] != '"':
            raise PromParseError(f"expected a quoted value for label {key!r}")
        i += 1
        chars: list[str] = []
        while True:
            if i >= n:
                raise PromParseError(f"unterminated value for label {key!r}")
            ch = line[i]
            if ch == "\\" and i + 1 < n:
                nxt = line[i + 1]
                chars.append({"n": "\n", '"': '"', "\\": "\\"}.get(nxt, "\\" + nxt))
                i += 2
                continue
            if ch == '"':
                i += 1
                break
            chars.append(ch)
            i += 1
        labels[key] = "".join(chars)
        while i < n and line[i] in " \t":
            i += 1
        if i < n and line[i] == ",":
            i += 1
        elif i < n and line[i] == "}":
            return i + 1
        else:
            raise PromParseError(f"expected ',' or '}}' after label {key!r}")


def is_reading(value: float) -> bool:
    """False for NaN, infinities, negatives and DCGM sentinels: none of them is a measurement."""
    return math.isfinite(value) and 0 <= value < _SENTINEL_FLOAT


def percent_ratio(value: float, *, scale: float = 100.0) -> float | None:
    """A percentage (or, with ``scale=1``, a ratio) as a 0..1 ratio; None when it is no reading."""
    if not is_reading(value):
        return None
    return min(value / scale, 1.0)


def celsius(value: float) -> float | None:
    """A temperature in degrees Celsius, or None: sensors a card lacks read 0, not a real temperature."""
    if not is_reading(value) or value == 0:
        return None
    return float(value)


def int_label(value: str | None) -> int | None:
    """A GPU index label (``0``, or dcgm's ``nvidia0``) as an int; None when absent or not a number."""
    if value is None:
        return None
    value = value.strip().removeprefix("nvidia")  # dcgm's "device" label: nvidia0
    # isdigit() alone admits "²" and 5,000-digit strings that int() rejects or chokes on.
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 9 else None


@record(frozen=False)
class GpuFigures:
    """Figures gathered for one GPU while walking the samples (memory in bytes)."""

    index: int | None = None
    uuid: str = ""
    name: str = ""
    figures: dict[str, int] = field(default_factory=dict)  # total, used, free, reserved
    from_bytes_family: set[str] = field(default_factory=set)
    used_ratio: float | None = None  # for exporters that give used memory as a share of the total
    utilization_ratio: float | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)  # by sensor: edge, junction, gpu...
    health_reasons: list[str] = field(default_factory=list)
    integrated: bool = False
    xid: XidSignal | None = None

    def put(self, what: str, value_bytes: int, *, bytes_family: bool) -> None:
        """Record a memory figure: exact byte families beat MiB-rounded twins; the first duplicate wins."""
        if what in self.from_bytes_family and not bytes_family:
            return
        if what in self.figures and what not in self.from_bytes_family and not bytes_family:
            return  # duplicate series (e.g. one per Kubernetes pod): the first wins
        self.figures[what] = value_bytes
        if bytes_family:
            self.from_bytes_family.add(what)

    def temperature(self, preference: Iterable[str]) -> float | None:
        """The first sensor of ``preference`` that has a reading, else any sensor's."""
        for sensor in preference:
            if sensor in self.temperatures_c:
                return self.temperatures_c[sensor]
        return next(iter(self.temperatures_c.values()), None)


@record
class ExporterMatch:
    """What one exporter kind made of a scrape.

    ``seen`` counts the samples of the kind's memory families: 0 means the scrape is not from this
    exporter. ``xid`` is keyed by :attr:`Gpu.key`, for :class:`~gpu_router.gpus.health.HealthTracker`.
    """

    gpus: tuple[Gpu, ...] = ()
    problems: tuple[str, ...] = ()
    seen: int = 0
    xid: Mapping[str, XidSignal] = field(default_factory=lambda: MappingProxyType({}))


def _to_gpu(fig: GpuFigures, index: int, temperature_preference: Iterable[str]) -> Gpu | None:
    total = fig.figures.get("total")
    free = fig.figures.get("free")
    used = fig.figures.get("used")
    reserved = fig.figures.get("reserved", 0)
    if total is None and free is not None and used is not None:
        total = free + used + reserved
    if total is None:
        return None
    if used is None and fig.used_ratio is not None:
        used = round(total * fig.used_ratio)
    if free is None and used is not None:
        free = total - used - reserved
    if free is not None:
        free = min(max(free, 0), total)
    return Gpu(
        index=index,
        name=fig.name or f"GPU {index}",
        total_bytes=total,
        # used = total - free so reserved memory counts as used: what matters is what is left.
        used_bytes=None if free is None else total - free,
        free_bytes=free,
        uuid=fig.uuid,
        utilization_ratio=fig.utilization_ratio,
        temperature_c=fig.temperature(temperature_preference),
        healthy=not fig.health_reasons,
        health_reason="; ".join(fig.health_reasons),
        integrated=fig.integrated,
    )


def build_match(
    found: Iterable[GpuFigures], seen: int, *, temperature_preference: Iterable[str] = ()
) -> ExporterMatch:
    """Give GPUs without an index the numbers after the known ones, and build the sorted :class:`Gpu` list."""
    items = [f for f in found if f.figures or f.used_ratio is not None]
    next_index = max((f.index for f in items if f.index is not None), default=-1) + 1
    preference = tuple(temperature_preference)
    pairs: list[tuple[Gpu, GpuFigures]] = []
    problems: list[str] = []
    for fig in items:
        if fig.index is None:
            fig.index = next_index
            next_index += 1
        gpu = _to_gpu(fig, fig.index, preference)
        if gpu is None:
            problems.append(f"GPU {fig.index} has no total memory figure")
        else:
            pairs.append((gpu, fig))
    pairs.sort(key=lambda p: p[0].index)
    xid = {gpu.key: fig.xid for gpu, fig in pairs if fig.xid is not None}
    return ExporterMatch(tuple(g for g, _ in pairs), tuple(problems), seen, MappingProxyType(xid))
