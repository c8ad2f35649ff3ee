"""Remote GPU memory from a Prometheus exporter's ``/metrics`` page.

Four exporters are understood, recognised by the metric names a scrape carries (see
:data:`EXPORTER_KINDS`): NVIDIA's dcgm-exporter and utkuozdemir/nvidia_gpu_exporter
(:mod:`~gpu_router.gpus.exporter_nvidia`), ROCm's device-metrics-exporter and omnistat
(:mod:`~gpu_router.gpus.exporter_amd`). The reading's ``detail`` names the one that matched.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3.exceptions

from gpu_router.gpus.exporter_amd import (
    DEVICE_METRICS_LABEL,
    OMNISTAT_LABEL,
    interpret_amd_device_metrics,
    interpret_omnistat,
)
from gpu_router.gpus.exporter_nvidia import DCGM_LABEL, NVIDIA_SMI_LABEL, interpret_dcgm, interpret_nvidia_smi
from gpu_router.gpus.health import HealthTracker
from gpu_router.gpus.scrape import ExporterMatch, Sample, parse_prometheus_text
from gpu_router.state import MIB, GpuReading, VramSource

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * MIB  # a full dcgm scrape of an 8-GPU node is well under 1 MiB


@dataclass(frozen=True)
class ExporterKind:
    """One exporter the router understands: its report label, its interpreter, the families it looks for."""

    label: str
    interpret: Callable[[Iterable[Sample]], ExporterMatch]
    families: str  # for the message when a scrape matches no kind


# Tried in order; the first whose memory families appear in a scrape wins.
EXPORTER_KINDS: tuple[ExporterKind, ...] = (
    ExporterKind(DCGM_LABEL, interpret_dcgm, "dcgm-exporter DCGM_FI_DEV_FB_*"),
    ExporterKind(NVIDIA_SMI_LABEL, interpret_nvidia_smi, "nvidia_gpu_exporter nvidia_smi_memory_*_bytes"),
    ExporterKind(
        DEVICE_METRICS_LABEL, interpret_amd_device_metrics, "ROCm device-metrics-exporter gpu_*_vram"
    ),
    ExporterKind(OMNISTAT_LABEL, interpret_omnistat, "omnistat rocm_vram_*"),
)


def interpret_samples(samples: list[Sample]) -> tuple[ExporterKind, ExporterMatch] | None:
    """The first exporter kind whose memory families ``samples`` carry, and what it made of them.

    None when no known GPU memory family is present at all.
    """
    for kind in EXPORTER_KINDS:
        match = kind.interpret(samples)
        if match.gpus or match.seen:
            return kind, match
    return None


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


def _find_in_chain(
    exc: BaseException,
    kinds: tuple[type[BaseException], ...],
    exclude: tuple[type[BaseException], ...] = (),
) -> BaseException | None:
    """Search an exception's causes, contexts, ``args`` and urllib3 ``reason`` for one of ``kinds``."""
    stack: list[Any] = [exc]
    seen: set[int] = set()
    while stack:
        cur = stack.pop()
        if not isinstance(cur, BaseException) or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, kinds) and not isinstance(cur, exclude):
            return cur
        stack.extend([cur.__cause__, cur.__context__, getattr(cur, "reason", None), *cur.args])
    return None


def _describe_request_error(exc: requests.RequestException, timeout_s: float) -> str:
    if _find_in_chain(exc, (ConnectionRefusedError,)) is not None:
        return "connection refused"
    if _find_in_chain(exc, (socket.gaierror,)) is not None:
        return "cannot resolve the host name"
    # urllib3's NewConnectionError subclasses its ConnectTimeoutError for history's sake; it is not a timeout.
    timeouts = (TimeoutError, urllib3.exceptions.TimeoutError)
    if isinstance(exc, requests.Timeout) or _find_in_chain(
        exc, timeouts, exclude=(urllib3.exceptions.NewConnectionError,)
    ):
        return f"timed out after {timeout_s:g}s"
    if isinstance(
        exc,
        (
            requests.exceptions.InvalidURL,
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema,
        ),
    ):
        return f"invalid URL ({exc})"
    if isinstance(exc, requests.ConnectionError):
        inner = _find_in_chain(exc, (OSError,), exclude=(requests.RequestException,))
        return f"cannot connect ({inner if inner is not None else type(exc).__name__})"
    return f"request failed ({type(exc).__name__}: {exc})"


class ExporterSource:
    """GPU memory scraped from a dcgm-exporter or nvidia_gpu_exporter ``/metrics`` URL."""

    kind = VramSource.EXPORTER

    def __init__(self, url: str, timeout_s: float, session: requests.Session | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._display_url = redact_url(url)
        self._own_session = session is None
        self._session = session if session is not None else requests.Session()
        # requests' read timeout is per socket read; a server dripping bytes needs a whole-request cap too.
        self._total_timeout_s = 2 * timeout_s

    def read(self) -> GpuReading:
        """Scrape once; a reading with ``error`` (never an exception) when the exporter fails."""
        try:
            text = self._fetch()
        except _FetchError as exc:
            return self._failed(str(exc))
        samples, bad_lines = parse_prometheus_text(text)
        found = interpret_samples(samples)
        if found is None:
            hint = f", {bad_lines} unparseable lines" if bad_lines else ""
            expected = " or ".join(k.families for k in EXPORTER_KINDS)
            return self._failed(
                f"no GPU memory metrics in the response (expected {expected}; {len(samples)} samples{hint})"
            )
        kind, match = found
        if not match.gpus:
            why = "; ".join(match.problems) or "every GPU memory value is missing or a placeholder"
            return self._failed(f"{kind.label} reports no usable GPU memory ({why})")
        if bad_lines:
            log.debug("exporter %s: skipped %d malformed lines", redact_url(self.url), bad_lines)
        error = (f"exporter {redact_url(self.url)}: " + "; ".join(match.problems)) if match.problems else None
        gpus = self._health.apply(match.gpus, match.xid)
        return GpuReading(VramSource.EXPORTER, gpus, error=error, detail=kind.label)

    @cached_property
    def _health(self) -> HealthTracker:
        # Created on first use: XID errors count only when they change between this source's scrapes.
        return HealthTracker(f"exporter {redact_url(self.url)}")

    def close(self) -> None:
        """Close the HTTP session if this source created it."""
        if self._own_session:
            self._session.close()

    def _failed(self, why: str) -> GpuReading:
        error = f"exporter {self._display_url}: {why}"
        log.debug("%s", error)
        return GpuReading(VramSource.UNKNOWN, (), error=error)

    def _fetch(self) -> str:
        deadline = time.monotonic() + self._total_timeout_s
        try:
            with self._session.get(
                self.url,
                timeout=(self.timeout_s, self.timeout_s),
                stream=True,
                headers={"Accept": "text/plain;version=0.0.4;q=0.9, */*;q=0.1"},
            ) as resp:
                if resp.status_code != 200:
                    raise _FetchError(f"HTTP {resp.status_code} {resp.reason or ''}".rstrip())
                chunks: list[bytes] = []
                size = 0
                for chunk in resp.iter_content(chunk_size=64 * 1024):
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        raise _FetchError(f"response larger than {MAX_BODY_BYTES // MIB} MiB")
                    if time.monotonic() > deadline:
                        raise _FetchError(f"response not complete after {self._total_timeout_s:g}s")
                    chunks.append(chunk)
        except requests.RequestException as exc:
            raise _FetchError(_describe_request_error(exc, self.timeout_s)) from exc
        # The exposition format is UTF-8 by definition; requests would guess ISO-8859-1 for bare text/plain.
        return b"".join(chunks).decode("utf-8", errors="replace")
