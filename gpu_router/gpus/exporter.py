"""Remote GPU memory from a Prometheus exporter's ``/metrics`` page.

Four exporters are understood, recognised by the metric names a scrape carries (see
:data:`EXPORTER_KINDS`): NVIDIA's dcgm-exporter and utkuozdemir/nvidia_gpu_exporter
(:mod:`~gpu_router.gpus.exporter_nvidia`), ROCm's device-metrics-exporter and omnistat
(:mod:`~gpu_router.gpus.exporter_amd`). The reading's ``detail`` names the one that matched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

from gpu_router.gpus.exporter_amd import (
    DEVICE_METRICS_LABEL,
    OMNISTAT_LABEL,
    interpret_amd_device_metrics,
    interpret_omnistat,
)
from gpu_router.gpus.exporter_nvidia import DCGM_LABEL, NVIDIA_SMI_LABEL, interpret_dcgm, interpret_nvidia_smi
from gpu_router.gpus.health import HealthTracker
from gpu_router.gpus.scrape import ExporterMatch, Sample, parse_prometheus_text
from gpu_router.records import record
from gpu_router.state import MIB, GpuReading, VramSource
from gpu_router.transport import HttpClient, Pending, Response, TransportError

log = logging.getLogger(__name__)

# Real scrapes: nvidia_gpu_exporter on one H100 under load is 29 KB, so about 240 KB for 8 GPUs; dcgm-exporter
# with its default counters is smaller. 4 MiB is >10x an 8-GPU node's page and still cheap to hold.
MAX_BODY_BYTES = 4 * MIB
_ACCEPT = "text/plain;version=0.0.4;q=0.9, */*;q=0.1"


@record
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


class ExporterSource:
    """GPU memory scraped from an exporter's ``/metrics`` URL (see :data:`EXPORTER_KINDS`).

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
        self._last_error: str | None = None  # what the last failed scrape said, for logging changes only
        # XID errors count only when they change between this source's scrapes. Made here, not on
        # first use: functools.cached_property locks one lock for every instance, and 250 sources
        # read at once in a one-shot report queued on it.
        self._health = HealthTracker(f"exporter {self._display_url}")
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
        if self._client is None:
            return self._failed(self._problem or "no HTTP client")
        try:
            resp = self._client.request("GET", self._path, timeout_s=self.timeout_s)
        except TransportError as exc:
            return self._failed(exc.reason)
        return self._reading(resp)

    def start(self, *, connect: bool = False) -> Pending | None:
        """Send a scrape without waiting for its answer (``HttpClient.start``); None: use :meth:`read`."""
        if self._client is None:
            return None
        deadline = time.monotonic() + self.timeout_s
        return self._client.start("GET", self._path, deadline=deadline, connect=connect)

    @property
    def selectable(self) -> bool:
        """:meth:`start` can connect without waiting (``HttpClient.selectable``)."""
        return self._client is not None and self._client.selectable

    def finish(self, pending: Pending) -> GpuReading:
        """The reading for a scrape sent by :meth:`start`, as :meth:`read` gives it.

        Raises ``StaleConnection`` when the kept-alive connection had been closed: :meth:`read` again.
        """
        try:
            resp = pending.finish()
        except TransportError as exc:
            return self._failed(exc.reason)
        return self._reading(resp)

    def _reading(self, resp: Response) -> GpuReading:
        if resp.status != 200:
            reason = " ".join(resp.reason.split())[:80]  # the server's words: one short line
            return self._failed(f"HTTP {resp.status} {reason}".rstrip())
        # The exposition format is UTF-8 by definition; a stray byte must not hide every GPU.
        text = resp.body.decode("utf-8", errors="replace")
        try:
            samples, bad_lines = parse_prometheus_text(text)
            found = interpret_samples(samples)
        except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as exc:
            # An absurd page (a label int() cannot read, say) is this exporter's problem, not the loop's.
            return self._failed(f"cannot interpret the response ({type(exc).__name__})")
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
        if self._last_error is not None:
            log.info("exporter %s answers with GPU memory figures again", self._display_url)
            self._last_error = None
        gpus = self._health.apply(match.gpus, match.xid)
        return GpuReading(VramSource.EXPORTER, gpus, error=error, detail=kind.label)

    def close(self) -> None:
        """Close the HTTP client's connections if this source created it."""
        if self._own_client and self._client is not None:
            self._client.close()

    def _failed(self, why: str) -> GpuReading:
        error = f"exporter {self._display_url}: {why}"
        # A warning when it starts failing (or fails differently), not at every poll: the node's free
        # VRAM is unknown from now on, so nothing new is placed there.
        level = logging.DEBUG if error == self._last_error else logging.WARNING
        log.log(level, "%s; GPU memory unknown until it answers", error)
        self._last_error = error
        return GpuReading(VramSource.UNKNOWN, (), error=error)
