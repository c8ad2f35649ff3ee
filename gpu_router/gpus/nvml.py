"""Local GPU memory through NVML (the ``pynvml`` module of ``nvidia-ml-py``).

The module is imported and ``nvmlInit`` called lazily on the first :meth:`NvmlSource.read`, never at
import, so a driverless host can import gpu_router and still run with exporter or static sources.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from gpu_router.gpus.health import HealthTracker
from gpu_router.state import Gpu, GpuReading, VramSource

log = logging.getLogger(__name__)

DEFAULT_RETRY_S = 30.0


class _GpuSkipped(Exception):
    """One GPU could not be read; the others still are."""


class _GpuLost(Exception):
    """NVML says the GPU is lost or failed with an unknown error: report it unhealthy, not skipped."""


class NvmlSource:
    """GPU memory of this machine, read through NVML.

    ``nvml`` is the seam: tests pass an object with the ``pynvml`` names; ``None`` imports ``pynvml`` on the
    first read. A failed ``nvmlInit`` is retried at most once per ``retry_s`` (measured with ``clock``), so a
    driver that is installed or loaded while the daemon runs is picked up without a restart.
    """

    kind = VramSource.NVML

    def __init__(
        self,
        nvml: ModuleType | None = None,
        *,
        retry_s: float = DEFAULT_RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nvml: Any = nvml
        self._retry_s = retry_s
        self._clock = clock
        self._lock = threading.Lock()
        self._initialized = False
        self._closed = False
        self._last_attempt_s: float | None = None
        self._init_error: str | None = None
        self._logged_init_error: str | None = None
        # Old bindings or drivers lack nvmlDeviceGetMemoryInfo_v2; once seen, stop probing it on every read.
        self._v2_unavailable = False
        self._health = HealthTracker("NVML")
        self._last: dict[int, Gpu] = {}  # by index: what is still known of a GPU once it is lost

    def read(self) -> GpuReading:
        """Memory of every local GPU; a reading with ``error`` instead of an exception on any NVML problem."""
        with self._lock:
            if self._closed:
                return GpuReading(VramSource.UNKNOWN, (), error="NVML: source is closed")
            error = self._ensure_init()
            if error is not None:
                return GpuReading(VramSource.UNKNOWN, (), error=error)
            return self._read_devices()

    def close(self) -> None:
        """Release NVML (``nvmlShutdown``); later reads report the source as closed."""
        with self._lock:
            self._closed = True
            self._shutdown()

    # -- internals; every method below runs with self._lock held --

    def _ensure_init(self) -> str | None:
        if self._initialized:
            return None
        now = self._clock()
        if (
            self._init_error is not None
            and self._last_attempt_s is not None
            and now - self._last_attempt_s < self._retry_s
        ):
            return self._init_error
        self._last_attempt_s = now
        error = self._try_init()
        self._init_error = error
        if error is None:
            self._initialized = True
            if self._logged_init_error is not None:
                log.info("NVML is available again")
            self._logged_init_error = None
        elif error != self._logged_init_error:
            # Log each distinct failure once; a driverless host would otherwise warn every poll.
            log.warning("%s; retrying at most every %.0f s", error, self._retry_s)
            self._logged_init_error = error
        return error

    def _try_init(self) -> str | None:
        if self._nvml is None:
            try:
                import pynvml  # lazy on purpose: importing must not need a driver
            except ImportError as exc:
                return f"NVML: the nvidia-ml-py package is not installed ({exc})"
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            return _describe_init_error(nvml, exc)
        except OSError as exc:
            return f"NVML: cannot load the NVML library ({exc})"
        return None

    def _shutdown(self) -> None:
        if not self._initialized:
            return
        self._initialized = False
        nvml = self._nvml
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as exc:
            log.debug("nvmlShutdown failed: %s", exc)

    def _fail_driver(self, what: str, exc: Exception) -> GpuReading:
        """A call that concerns the whole driver failed: drop the session so the next read re-inits."""
        if _is_init_error(self._nvml, exc):
            error = _describe_init_error(self._nvml, exc)
        else:
            error = f"NVML: {what} ({exc})"
        log.warning("%s", error)
        self._shutdown()
        self._init_error = error
        self._last_attempt_s = self._clock()
        return GpuReading(VramSource.UNKNOWN, (), error=error)

    def _read_devices(self) -> GpuReading:
        nvml = self._nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            return self._fail_driver("cannot count GPUs", exc)
        gpus: list[Gpu] = []
        problems: list[str] = []
        for index in range(count):
            try:
                gpus.append(self._read_device(index))
            except _GpuSkipped as exc:
                problems.append(str(exc))
        if problems:
            log.warning("NVML: %s", "; ".join(problems))
        if not gpus:
            if problems:
                return GpuReading(VramSource.UNKNOWN, (), error="NVML: " + "; ".join(problems))
            return GpuReading(VramSource.NVML, (), error="NVML: the driver reports no GPUs")
        return GpuReading(
            VramSource.NVML,
            self._health.apply(gpus),
            error=("NVML: " + "; ".join(problems)) if problems else None,
        )

    def _read_device(self, index: int) -> Gpu:
        nvml = self._nvml
        name, uuid = "", ""
        try:
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except nvml.NVMLError as exc:
                if _is_lost(nvml, exc):
                    raise _GpuLost(str(exc)) from exc
                raise _GpuSkipped(f"GPU {index} skipped: {exc}") from exc
            name = self._text(index, "name", nvml.nvmlDeviceGetName, handle, default=f"GPU {index}")
            uuid = self._text(index, "uuid", nvml.nvmlDeviceGetUUID, handle, default="")
            total, free = self._memory(index, handle)
            utilization = self._optional(index, "utilization", _utilization, handle)
            temperature = self._optional(index, "temperature", _temperature, handle)
        except _GpuLost as exc:
            return self._lost(index, name, uuid, f"NVML: {exc}")
        gpu = Gpu(
            index=index,
            name=name,
            total_bytes=total,
            used_bytes=total - free,
            free_bytes=free,
            uuid=uuid,
            utilization_ratio=utilization,
            temperature_c=temperature,
        )
        self._last[index] = gpu
        return gpu

    def _lost(self, index: int, name: str, uuid: str, reason: str) -> Gpu:
        """An unhealthy entry with what is still known: names from this read, sizes from the last good one."""
        last = self._last.get(index)
        return Gpu(
            index=index,
            name=name or (last.name if last else f"GPU {index}"),
            total_bytes=last.total_bytes if last else 0,
            uuid=uuid or (last.uuid if last else ""),
            healthy=False,
            health_reason=reason,
        )

    def _text(self, index: int, what: str, func: Callable[[Any], Any], handle: Any, *, default: str) -> str:
        nvml = self._nvml
        try:
            value = func(handle)
        except nvml.NVMLError as exc:
            if _is_lost(nvml, exc):
                raise _GpuLost(str(exc)) from exc
            # A missing name or uuid is cosmetic; the memory figures still count.
            log.debug("NVML: GPU %d %s unavailable: %s", index, what, exc)
            return default
        if isinstance(value, bytes):  # bindings before 11.515 returned bytes
            return value.decode("utf-8", "replace")
        return str(value)

    def _optional(
        self, index: int, what: str, func: Callable[[Any, Any], float | None], handle: Any
    ) -> float | None:
        """A figure the GPU may not support (utilization, temperature): None when NVML cannot give it."""
        nvml = self._nvml
        try:
            return func(nvml, handle)
        except nvml.NVMLError as exc:
            if _is_lost(nvml, exc):
                raise _GpuLost(str(exc)) from exc
            log.debug("NVML: GPU %d %s unavailable: %s", index, what, exc)
            return None

    def _memory(self, index: int, handle: Any) -> tuple[int, int]:
        """``(total, free)`` in bytes; used is derived as total - free, so driver-reserved memory is used."""
        nvml = self._nvml
        try:
            info = self._memory_info(handle)
        except nvml.NVMLError_NotSupported:
            return _host_memory()
        except nvml.NVMLError as exc:
            if _is_lost(nvml, exc):
                raise _GpuLost(str(exc)) from exc
            raise _GpuSkipped(f"GPU {index} skipped: {exc}") from exc
        total, free = int(info.total), int(info.free)
        if total <= 0:
            # WSL and integrated GPUs report a zero-sized framebuffer; their memory is the host's.
            return _host_memory()
        return total, min(max(free, 0), total)

    def _memory_info(self, handle: Any) -> Any:
        nvml = self._nvml
        version = getattr(nvml, "nvmlMemory_v2", None)
        if version is not None and not self._v2_unavailable:
            try:
                return nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
            except (nvml.NVMLError_FunctionNotFound, TypeError):
                self._v2_unavailable = True
            except nvml.NVMLError_NotSupported:
                # Either v2 alone is unsupported or the device has no framebuffer (unified memory):
                # v1 tells which by raising NotSupported again.
                pass
        return nvml.nvmlDeviceGetMemoryInfo(handle)


def _host_memory() -> tuple[int, int]:
    """A unified-memory device (Jetson, GB10) shares system RAM: report it as ``(total, free)``."""
    import psutil  # only unified-memory hosts need it

    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)


def _utilization(nvml: Any, handle: Any) -> float | None:
    """The GPU's busy share over NVML's last sample period (1/6 s to 1 s), as 0..1."""
    func = getattr(nvml, "nvmlDeviceGetUtilizationRates", None)
    if func is None:
        return None
    percent = float(func(handle).gpu)
    return min(percent / 100, 1.0) if percent >= 0 else None


def _temperature(nvml: Any, handle: Any) -> float | None:
    """The GPU core temperature in degrees Celsius; a 0 reading is a missing sensor, not a cold GPU."""
    func = getattr(nvml, "nvmlDeviceGetTemperature", None)
    if func is None:
        return None
    value = float(func(handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0)))
    return value if value > 0 else None


def _is_lost(nvml: Any, exc: Exception) -> bool:
    """GPU_IS_LOST or UNKNOWN: the device is there but broken, which the report must show."""
    kinds = tuple(
        getattr(nvml, name) for name in ("NVMLError_GpuIsLost", "NVMLError_Unknown") if hasattr(nvml, name)
    )
    return isinstance(exc, kinds)


def _is_init_error(nvml: Any, exc: Exception) -> bool:
    kinds = tuple(
        getattr(nvml, name)
        for name in (
            "NVMLError_LibraryNotFound",
            "NVMLError_DriverNotLoaded",
            "NVMLError_LibRmVersionMismatch",
            "NVMLError_Uninitialized",
        )
        if hasattr(nvml, name)
    )
    return isinstance(exc, kinds)


def _describe_init_error(nvml: Any, exc: Exception) -> str:
    """A sentence an operator can act on, with NVML's own words in brackets."""
    if isinstance(exc, getattr(nvml, "NVMLError_LibraryNotFound", ())):
        return f"NVML: no NVIDIA driver ({exc})"
    if isinstance(exc, getattr(nvml, "NVMLError_DriverNotLoaded", ())):
        return f"NVML: the NVIDIA driver is not loaded ({exc})"
    if isinstance(exc, getattr(nvml, "NVMLError_LibRmVersionMismatch", ())):
        return f"NVML: driver and kernel module versions differ; reload the nvidia module or reboot ({exc})"
    if isinstance(exc, getattr(nvml, "NVMLError_NoPermission", ())):
        return f"NVML: no permission to use the GPU devices ({exc})"
    if isinstance(exc, getattr(nvml, "NVMLError_Uninitialized", ())):
        return f"NVML: the library was shut down underneath us ({exc})"
    return f"NVML: initialisation failed ({exc})"
