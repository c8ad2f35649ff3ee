"""Remote GPU memory from a Prometheus exporter's ``/metrics`` page.

Two exporters are understood:

* NVIDIA dcgm-exporter: ``DCGM_FI_DEV_FB_{FREE,USED,RESERVED,TOTAL}`` in MiB, and the byte-unit
  families of newer releases (any ``DCGM_FI_DEV_FB_*_BYTES``; ``..._CAPACITY_BYTES`` is the total).
  Labels ``gpu`` (index), ``UUID`` or ``uuid``, ``modelName``. Values at or above 2**63 - 16 are DCGM
  "blank" sentinels, not readings.
* utkuozdemir/nvidia_gpu_exporter: ``nvidia_smi_memory_{total,used,free,reserved}_bytes{uuid}`` in bytes,
  with index and name joined from ``nvidia_smi_gpu_info`` (or ``nvidia_smi_index``).

MIG instances (rows with a ``GPU_I_ID`` label, or ``nvidia_smi_mig_*`` families) are ignored: the router
places models on whole GPUs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import urlsplit, urlunsplit

from gpu_router.state import MIB, Gpu, GpuReading, VramSource
from gpu_router.transport import HttpClient, TransportError

log = logging.getLogger(__name__)

# Real scrapes: nvidia_gpu_exporter on one H100 under load is 29 KB, so about 240 KB for 8 GPUs; dcgm-exporter
# with its default counters is smaller. 4 MiB is >10x an 8-GPU node's page and still cheap to hold.
MAX_BODY_BYTES = 4 * MIB
_ACCEPT = "text/plain;version=0.0.4;q=0.9, */*;q=0.1"
# DCGM_FT_INT64_BLANK (0x7ffffffffffffff0) and its neighbours up to 0x...f3 mark missing values.
DCGM_SENTINEL_MIN = 9223372036854775792
_SENTINEL_FLOAT = float(DCGM_SENTINEL_MIN)

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
_SMI_MEMORY_FAMILIES = {
    "nvidia_smi_memory_total_bytes": "total",
    "nvidia_smi_memory_used_bytes": "used",
    "nvidia_smi_memory_free_bytes": "free",
    "nvidia_smi_memory_reserved_bytes": "reserved",
}


@dataclass(frozen=True)
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


def parse_sample_line(line: str) -> Sample:
    """Parse ``name{label="value",...} value [timestamp]``; raises :class:`PromParseError`."""
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


def _usable(value: float) -> bool:
    """False for NaN, infinities, negatives and DCGM sentinels: none of them is a memory size."""
    return math.isfinite(value) and 0 <= value < _SENTINEL_FLOAT


@dataclass
class _GpuFigures:
    """Memory figures gathered for one GPU while walking the samples (bytes)."""

    index: int | None = None
    uuid: str = ""
    name: str = ""
    figures: dict[str, int] = field(default_factory=dict)
    from_bytes_family: set[str] = field(default_factory=set)

    def put(self, what: str, value_bytes: int, *, bytes_family: bool) -> None:
        # The byte-unit families are exact; never let a MiB-rounded twin overwrite them.
        if what in self.from_bytes_family and not bytes_family:
            return
        if what in self.figures and what not in self.from_bytes_family and not bytes_family:
            return  # duplicate series (e.g. one per Kubernetes pod): the first wins
        self.figures[what] = value_bytes
        if bytes_family:
            self.from_bytes_family.add(what)


def _to_gpu(fig: _GpuFigures, index: int) -> Gpu | None:
    total = fig.figures.get("total")
    free = fig.figures.get("free")
    used = fig.figures.get("used")
    reserved = fig.figures.get("reserved", 0)
    if total is None and free is not None and used is not None:
        total = free + used + reserved
    if total is None:
        return None
    if free is None and used is not None:
        free = total - used - reserved
    name = fig.name or f"GPU {index}"
    if free is None:
        return Gpu(index=index, name=name, total_bytes=total, uuid=fig.uuid)
    free = min(max(free, 0), total)
    # used = total - free so reserved memory counts as used: what matters is what is left.
    return Gpu(
        index=index, name=name, total_bytes=total, used_bytes=total - free, free_bytes=free, uuid=fig.uuid
    )


def _finish(found: Iterable[_GpuFigures]) -> tuple[list[Gpu], list[str]]:
    """Assign missing indexes after the known ones, build :class:`Gpu` records, sorted by index."""
    items = list(found)
    next_index = max((f.index for f in items if f.index is not None), default=-1) + 1
    gpus: list[Gpu] = []
    problems: list[str] = []
    for fig in items:
        if fig.index is None:
            fig.index = next_index
            next_index += 1
        gpu = _to_gpu(fig, fig.index)
        if gpu is None:
            problems.append(f"GPU {fig.index} has no total memory figure")
        else:
            gpus.append(gpu)
    gpus.sort(key=lambda g: g.index)
    return gpus, problems


def _int_label(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    if value.startswith("nvidia") and value[6:].isdigit():  # dcgm "device" label: nvidia0
        return int(value[6:])
    return int(value) if value.isdigit() else None


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


def interpret_dcgm(samples: Iterable[Sample]) -> tuple[list[Gpu], list[str], int]:
    """GPUs from dcgm-exporter samples: ``(gpus, problems, number_of_framebuffer_samples_seen)``."""
    by_key: dict[str, _GpuFigures] = {}
    seen = 0
    mig_rows = 0
    for s in samples:
        family = _dcgm_family(s.name)
        if family is None:
            continue
        seen += 1
        if s.labels.get("GPU_I_ID", "") != "":
            mig_rows += 1
            continue
        if not _usable(s.value):
            continue
        what, is_bytes = family
        uuid = s.labels.get("UUID") or s.labels.get("uuid") or ""
        index = _int_label(s.labels.get("gpu"))
        if index is None:
            index = _int_label(s.labels.get("device"))
        key = uuid or f"index:{index}"
        fig = by_key.setdefault(key, _GpuFigures(index=index, uuid=uuid))
        fig.name = fig.name or s.labels.get("modelName", "")
        fig.put(what, round(s.value) if is_bytes else round(s.value * MIB), bytes_family=is_bytes)
    if mig_rows:
        log.debug("dcgm-exporter: ignored %d MIG instance samples", mig_rows)
    gpus, problems = _finish(f for f in by_key.values() if f.figures)
    if not gpus and mig_rows and seen == mig_rows:
        problems.append("only MIG instance memory is exported; MIG partitions are not supported")
    return gpus, problems, seen


def interpret_nvidia_smi(samples: Iterable[Sample]) -> tuple[list[Gpu], list[str], int]:
    """GPUs from nvidia_gpu_exporter samples: ``(gpus, problems, number_of_memory_samples_seen)``."""
    by_uuid: dict[str, _GpuFigures] = {}
    info: dict[str, tuple[int | None, str]] = {}
    index_metric: dict[str, int] = {}
    seen = 0
    for s in samples:
        uuid = s.labels.get("uuid", "")
        if s.name == "nvidia_smi_gpu_info":
            info[uuid] = (_int_label(s.labels.get("index")), s.labels.get("name", ""))
        elif s.name == "nvidia_smi_index" and math.isfinite(s.value) and s.value >= 0:
            index_metric[uuid] = int(s.value)
        elif s.name in _SMI_MEMORY_FAMILIES:
            seen += 1
            if _usable(s.value):
                fig = by_uuid.setdefault(uuid, _GpuFigures(uuid=uuid))
                fig.put(_SMI_MEMORY_FAMILIES[s.name], round(s.value), bytes_family=True)
    for uuid, fig in by_uuid.items():
        index, name = info.get(uuid, (None, ""))
        fig.index = index if index is not None else index_metric.get(uuid)
        fig.name = name
    gpus, problems = _finish(f for f in by_uuid.values() if f.figures)
    return gpus, problems, seen


def interpret_samples(samples: list[Sample]) -> tuple[list[Gpu], list[str], str | None]:
    """GPUs from whichever known exporter produced ``samples``: ``(gpus, problems, exporter_name)``.

    ``exporter_name`` is None when no known GPU memory family is present at all.
    """
    gpus, problems, seen = interpret_dcgm(samples)
    if gpus or seen:
        return gpus, problems, "dcgm-exporter"
    gpus, problems, seen = interpret_nvidia_smi(samples)
    if gpus or seen:
        return gpus, problems, "nvidia_gpu_exporter"
    return [], [], None


def redact_url(url: str) -> str:
    """``url`` without user:password, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.username is None and parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port is not None else host
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    except ValueError:
        return "<invalid URL>"


class _FetchError(Exception):
    """Why the exporter page could not be fetched, as a short phrase."""


class ExporterSource:
    """GPU memory scraped from a dcgm-exporter or nvidia_gpu_exporter ``/metrics`` URL.

    ``timeout_s`` is the wall-clock deadline of one scrape. ``ca_file``/``tls_verify`` are for an
    ``https://`` exporter. ``client`` is a seam: an :class:`HttpClient` for the exporter's origin,
    used as given and left open by :meth:`close`.
    """

    kind = VramSource.EXPORTER

    def __init__(
        self,
        url: str,
        timeout_s: float,
        *,
        ca_file: str | None = None,
        tls_verify: bool = True,
        max_body_bytes: int = MAX_BODY_BYTES,
        client: HttpClient | None = None,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._display_url = redact_url(url)
        self._path = "/"
        self._client: HttpClient | None = client
        self._own_client = client is None
        self._problem = ""
        try:
            parts = urlsplit(url)
            self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            if client is None:
                origin = f"{parts.scheme}://{parts.netloc}"
                self._client = HttpClient(
                    origin,
                    headers={"Accept": _ACCEPT},
                    timeout_s=timeout_s,
                    max_body_bytes=max_body_bytes,
                    ca_file=ca_file,
                    tls_verify=tls_verify,
                )
        except ValueError as exc:
            self._problem = f"invalid URL ({exc})"

    def read(self) -> GpuReading:
        """Scrape once; a reading with ``error`` (never an exception) when the exporter fails."""
        try:
            text = self._fetch()
        except _FetchError as exc:
            return self._failed(str(exc))
        try:
            samples, bad_lines = parse_prometheus_text(text)
            gpus, problems, exporter = interpret_samples(samples)
        except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as exc:
            # An absurd page (a label int() cannot read, say) is this exporter's problem, not the loop's.
            return self._failed(f"cannot interpret the response ({type(exc).__name__})")
        if exporter is None:
            hint = f", {bad_lines} unparseable lines" if bad_lines else ""
            return self._failed(
                "no GPU memory metrics in the response (expected dcgm-exporter DCGM_FI_DEV_FB_* or "
                f"nvidia_gpu_exporter nvidia_smi_memory_*_bytes; {len(samples)} samples{hint})"
            )
        if not gpus:
            why = "; ".join(problems) if problems else "every GPU memory value is missing or a placeholder"
            return self._failed(f"{exporter} reports no usable GPU memory ({why})")
        if bad_lines:
            log.debug("exporter %s: skipped %d malformed lines", self._display_url, bad_lines)
        error = (f"exporter {self._display_url}: " + "; ".join(problems)) if problems else None
        return GpuReading(VramSource.EXPORTER, tuple(gpus), error=error)

    def close(self) -> None:
        """Close the HTTP client's connections if this source created it."""
        if self._own_client and self._client is not None:
            self._client.close()

    def _failed(self, why: str) -> GpuReading:
        error = f"exporter {self._display_url}: {why}"
        log.debug("%s", error)
        return GpuReading(VramSource.UNKNOWN, (), error=error)

    def _fetch(self) -> str:
        if self._client is None:
            raise _FetchError(self._problem or "no HTTP client")
        try:
            resp = self._client.request("GET", self._path, timeout_s=self.timeout_s)
        except TransportError as exc:
            raise _FetchError(exc.reason) from None
        if resp.status != 200:
            reason = " ".join(resp.reason.split())[:80]  # the server's words: one short line
            raise _FetchError(f"HTTP {resp.status} {reason}".rstrip())
        # The exposition format is UTF-8 by definition; a stray byte must not hide every GPU.
        return resp.body.decode("utf-8", errors="replace")
