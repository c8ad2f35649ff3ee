"""GPU health kept between reads: new XID errors, and one log line per health change.

A source's single read can say a GPU is unhealthy (NVML "GPU is lost", an exporter's health field);
an XID error is different, because dcgm-exporter only shows the *last* XID code and, in newer releases,
a count over a sliding window. Only a change between two scrapes says a new error happened, so this
module remembers each GPU's last figures (by UUID, else index) and keeps the GPU unhealthy for
``hold_s`` after the error was seen: one bad scrape must not flap a GPU in and out of placement.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from gpu_router.records import record, replace
from gpu_router.state import Gpu

log = logging.getLogger(__name__)

DEFAULT_XID_HOLD_S = 600.0


@record
class XidSignal:
    """What an exporter says about one GPU's XID errors; None where a figure is not exported.

    ``last_code`` is ``DCGM_FI_DEV_XID_ERRORS`` (the code of the last XID, 0 for none);
    ``window_count`` is ``DCGM_EXP_XID_ERRORS_COUNT`` summed over its ``xid`` labels.
    """

    last_code: float | None = None
    window_count: float | None = None


def _new_xid(before: XidSignal, now: XidSignal) -> bool:
    """True when ``now`` shows an XID that ``before`` did not."""
    if now.last_code is not None and now.last_code != 0 and now.last_code != before.last_code:
        return True
    return (
        now.window_count is not None
        and before.window_count is not None
        and now.window_count > before.window_count
    )


class HealthTracker:
    """Per-GPU health memory for one source; thread-safe.

    ``what`` names the source in log lines (``NVML``, ``exporter http://host:9400/metrics``).
    """

    def __init__(
        self,
        what: str,
        *,
        xid_hold_s: float = DEFAULT_XID_HOLD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self._hold_s = xid_hold_s
        self._clock = clock
        self._lock = threading.Lock()
        self._xid: dict[str, XidSignal] = {}
        self._xid_until: dict[str, tuple[float, str]] = {}
        # By index: a GPU lost before its UUID was ever read has only that, and it must match on recovery.
        self._logged: dict[int, str] = {}  # GPU index -> the unhealthy reason last logged

    def apply(self, gpus: Iterable[Gpu], xid: Mapping[str, XidSignal] | None = None) -> tuple[Gpu, ...]:
        """``gpus`` with XID holds applied (``xid`` is keyed by :attr:`Gpu.key`); logs health changes."""
        now = self._clock()
        out: list[Gpu] = []
        with self._lock:
            for gpu in gpus:
                key = gpu.key
                signal = (xid or {}).get(key)
                if signal is not None:
                    before = self._xid.get(key)
                    if before is not None and _new_xid(before, signal):
                        self._xid_until[key] = (now + self._hold_s, _xid_reason(signal))
                    self._xid[key] = signal
                held = self._xid_until.get(key)
                if held is not None:
                    until, reason = held
                    if now < until:
                        if gpu.healthy:
                            gpu = replace(gpu, healthy=False, health_reason=reason)
                    else:
                        del self._xid_until[key]
                self._log_change(gpu)
                out.append(gpu)
        return tuple(out)

    def _log_change(self, gpu: Gpu) -> None:
        key = gpu.index
        before = self._logged.get(key)
        if not gpu.healthy and before != gpu.health_reason:
            log.warning("%s: GPU %d (%s) is unhealthy: %s", self.what, gpu.index, gpu.name, gpu.health_reason)
            self._logged[key] = gpu.health_reason
        elif gpu.healthy and before is not None:
            log.info("%s: GPU %d (%s) is healthy again", self.what, gpu.index, gpu.name)
            del self._logged[key]


def _xid_reason(signal: XidSignal) -> str:
    code = f" {signal.last_code:.0f}" if signal.last_code else ""
    return f"new XID error{code} since the previous scrape"
