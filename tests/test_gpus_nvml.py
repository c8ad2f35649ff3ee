"""NvmlSource against a fake ``pynvml`` module that raises the real pynvml exception classes."""

from __future__ import annotations

import ctypes
import logging
import threading
import time
import types
from dataclasses import dataclass, field

import psutil
import pynvml
import pytest

from gpu_router.gpus.nvml import NvmlSource
from gpu_router.state import GIB, MIB, VramSource


def nvml_error(code: int) -> pynvml.NVMLError:
    """The real exception pynvml raises for ``code`` (NVMLError maps a code to its subclass)."""
    return pynvml.NVMLError(code)


@dataclass
class FakeDevice:
    """One GPU as the fake driver reports it. ``*_error`` fields hold an NVML_ERROR_* code to raise."""

    name: str | bytes = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    total: int = 80 * GIB
    free: int = 60 * GIB
    reserved: int = 512 * MIB
    lost: bool = False  # every call about this device raises GpuIsLost
    v2_error: int | None = None  # raised by the v2 memory call only
    memory_error: int | None = None  # raised by both memory calls
    utilization_percent: int = 37
    utilization_error: int | None = None
    temperature_c: int = 61
    temperature_error: int | None = None


class FakeNvml(types.ModuleType):
    """A module object with the pynvml names the source uses and pynvml's real exception classes."""

    nvmlMemory_v2: int | None = pynvml.nvmlMemory_v2

    def __init__(self, devices: list[FakeDevice], init_error: int | None = None) -> None:
        super().__init__("fake_pynvml")
        for name in dir(pynvml):
            if name.startswith("NVMLError"):
                setattr(self, name, getattr(pynvml, name))
        self.devices = devices
        self.init_error = init_error
        self.count_error: int | None = None
        self.init_delay_s = 0.0
        self.calls: list[str] = []
        self.live_inits = 0

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_delay_s:
            time.sleep(self.init_delay_s)  # widens the window for the concurrency test
        if self.init_error is not None:
            raise nvml_error(self.init_error)
        self.live_inits += 1

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")
        self.live_inits -= 1

    def nvmlDeviceGetCount(self) -> int:
        self.calls.append("count")
        if self.count_error is not None:
            raise nvml_error(self.count_error)
        return len(self.devices)

    def _device(self, handle: int) -> FakeDevice:
        dev = self.devices[handle]
        if dev.lost:
            raise nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
        return dev

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str | bytes:
        return self._device(handle).name

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self._device(handle).uuid

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: int | None = None) -> types.SimpleNamespace:
        dev = self._device(handle)
        self.calls.append(f"mem_v{2 if version else 1}:{handle}")
        if dev.memory_error is not None:
            raise nvml_error(dev.memory_error)
        if version:
            if dev.v2_error is not None:
                raise nvml_error(dev.v2_error)
            # v2 reports reserved separately; used excludes it, as nvidia-smi shows.
            return types.SimpleNamespace(
                version=version,
                total=dev.total,
                reserved=dev.reserved,
                free=dev.free,
                used=dev.total - dev.free - dev.reserved,
            )
        return types.SimpleNamespace(total=dev.total, free=dev.free, used=dev.total - dev.free)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> types.SimpleNamespace:
        dev = self._device(handle)
        if dev.utilization_error is not None:
            raise nvml_error(dev.utilization_error)
        return types.SimpleNamespace(gpu=dev.utilization_percent, memory=0)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        dev = self._device(handle)
        if dev.temperature_error is not None:
            raise nvml_error(dev.temperature_error)
        return dev.temperature_c


class OldBindings(FakeNvml):
    """nvidia-ml-py before the ``version`` keyword existed: the v2 call raises a real TypeError."""

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> types.SimpleNamespace:  # type: ignore[override]
        return super().nvmlDeviceGetMemoryInfo(handle)


@dataclass
class FakeClock:
    now: float = 1000.0
    reads: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        self.reads.append(self.now)
        return self.now


def test_nothing_touches_nvml_until_the_first_read() -> None:
    fake = FakeNvml([FakeDevice()])
    NvmlSource(fake)
    assert fake.calls == []


def test_no_driver_gives_unknown_with_a_clear_error() -> None:
    fake = FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    reading = NvmlSource(fake).read()
    assert reading.source is VramSource.UNKNOWN
    assert reading.gpus == ()
    assert reading.error == "NVML: no NVIDIA driver (NVML Shared Library Not Found)"
    assert fake.calls == ["init"]


def test_driver_not_loaded_then_loaded_is_picked_up_after_the_backoff() -> None:
    fake = FakeNvml([FakeDevice()], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    clock = FakeClock()
    source = NvmlSource(fake, retry_s=30.0, clock=clock)

    first = source.read()
    assert first.source is VramSource.UNKNOWN
    assert first.error is not None
    assert "not loaded" in first.error

    fake.init_error = None  # modprobe nvidia
    clock.now += 10.0
    second = source.read()
    assert second.error == first.error, "within the backoff the cached error is returned"
    assert fake.calls.count("init") == 1

    clock.now += 21.0
    third = source.read()
    assert fake.calls.count("init") == 2
    assert third.source is VramSource.NVML
    assert third.error is None
    assert [g.total_bytes for g in third.gpus] == [80 * GIB]


def test_library_and_kernel_module_version_mismatch_says_what_to_do() -> None:
    fake = FakeNvml([], init_error=pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH)
    reading = NvmlSource(fake).read()
    assert reading.source is VramSource.UNKNOWN
    assert reading.error is not None
    assert "reload the nvidia module or reboot" in reading.error


def test_any_other_init_error_is_a_reading_not_an_exception() -> None:
    fake = FakeNvml([], init_error=pynvml.NVML_ERROR_NO_PERMISSION)
    reading = NvmlSource(fake).read()
    assert reading.source is VramSource.UNKNOWN
    assert reading.error is not None
    assert "permission" in reading.error.lower()


def test_two_healthy_gpus_report_used_as_total_minus_free() -> None:
    fake = FakeNvml(
        [
            FakeDevice(name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaa", total=80 * GIB, free=60 * GIB),
            FakeDevice(name=b"NVIDIA L4", uuid="GPU-bbbb", total=24 * GIB, free=20 * GIB, reserved=300 * MIB),
        ]
    )
    reading = NvmlSource(fake).read()
    assert reading.source is VramSource.NVML
    assert reading.error is None
    first, second = reading.gpus
    assert (first.index, first.name, first.uuid) == (0, "NVIDIA H100 80GB HBM3", "GPU-aaaa")
    assert (second.index, second.name, second.uuid) == (1, "NVIDIA L4", "GPU-bbbb")
    assert first.total_bytes == 80 * GIB
    assert first.free_bytes == 60 * GIB
    # v2 "used" excludes reserved; the reading counts reserved as used.
    assert first.used_bytes == 20 * GIB
    assert second.used_bytes == 4 * GIB
    assert reading.total_bytes == 104 * GIB
    assert "mem_v2:0" in fake.calls
    assert "mem_v1:0" not in fake.calls


def test_one_lost_gpu_of_two_is_reported_unhealthy_not_dropped() -> None:
    fake = FakeNvml([FakeDevice(uuid="GPU-ok"), FakeDevice(uuid="GPU-gone", lost=True)])
    reading = NvmlSource(fake).read()
    assert reading.source is VramSource.NVML
    assert reading.error is None
    ok, gone = reading.gpus
    assert (ok.uuid, ok.healthy, ok.health_reason) == ("GPU-ok", True, "")
    # never read before it was lost: only its index is known, and a 0 total is never planned on
    assert (gone.index, gone.name, gone.uuid, gone.total_bytes) == (1, "GPU 1", "", 0)
    assert (gone.used_bytes, gone.free_bytes, gone.utilization_ratio, gone.temperature_c) == (None,) * 4
    assert (gone.healthy, gone.health_reason) == (False, "NVML: GPU is lost")


def test_a_gpu_lost_after_a_good_read_keeps_what_was_known() -> None:
    device = FakeDevice(uuid="GPU-a", total=24 * GIB, free=20 * GIB)
    source = NvmlSource(FakeNvml([device]))
    assert source.read().gpus[0].healthy
    device.lost = True
    (gpu,) = source.read().gpus
    assert (gpu.name, gpu.uuid, gpu.total_bytes) == ("NVIDIA H100 80GB HBM3", "GPU-a", 24 * GIB)
    assert (gpu.used_bytes, gpu.free_bytes) == (None, None)  # no live figure from a lost GPU
    assert not gpu.healthy
    device.lost = False
    assert source.read().gpus[0].healthy, "a GPU that answers again is healthy again"


def test_every_gpu_lost_is_still_listed() -> None:
    fake = FakeNvml([FakeDevice(lost=True)])
    reading = NvmlSource(fake).read()
    assert reading.source is VramSource.NVML
    ((index, healthy, reason),) = [(g.index, g.healthy, g.health_reason) for g in reading.gpus]
    assert (index, healthy, reason) == (0, False, "NVML: GPU is lost")


def test_unknown_error_on_memory_marks_that_gpu_unhealthy_with_its_names() -> None:
    fake = FakeNvml(
        [FakeDevice(uuid="GPU-1", memory_error=pynvml.NVML_ERROR_UNKNOWN), FakeDevice(uuid="GPU-2")]
    )
    reading = NvmlSource(fake).read()
    bad, good = reading.gpus
    assert (bad.index, bad.uuid, bad.name) == (0, "GPU-1", "NVIDIA H100 80GB HBM3")
    assert (bad.healthy, bad.health_reason) == (False, "NVML: Unknown Error")
    assert (good.index, good.uuid, good.healthy) == (1, "GPU-2", True)
    assert reading.error is None


def test_other_memory_errors_skip_that_gpu_and_say_so() -> None:
    fake = FakeNvml([FakeDevice(memory_error=pynvml.NVML_ERROR_NO_PERMISSION), FakeDevice(uuid="GPU-2")])
    reading = NvmlSource(fake).read()
    assert [g.uuid for g in reading.gpus] == ["GPU-2"]
    assert reading.gpus[0].index == 1
    assert reading.error == "NVML: GPU 0 skipped: Insufficient Permissions"


def test_utilization_and_temperature_are_read() -> None:
    fake = FakeNvml(
        [FakeDevice(utilization_percent=37, temperature_c=61), FakeDevice(utilization_percent=100)]
    )
    first, second = NvmlSource(fake).read().gpus
    assert (first.utilization_ratio, first.temperature_c) == (0.37, 61.0)
    assert second.utilization_ratio == 1.0


@pytest.mark.parametrize(
    "code", [pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_NO_PERMISSION], ids=["not_supported", "perm"]
)
def test_unsupported_utilization_and_temperature_are_unknown_not_zero(code: int) -> None:
    fake = FakeNvml([FakeDevice(utilization_error=code, temperature_error=code)])
    reading = NvmlSource(fake).read()
    (gpu,) = reading.gpus
    assert (gpu.utilization_ratio, gpu.temperature_c) == (None, None)
    assert gpu.healthy
    assert gpu.free_bytes == 60 * GIB
    assert reading.error is None


def test_a_zero_temperature_is_a_missing_sensor() -> None:
    (gpu,) = NvmlSource(FakeNvml([FakeDevice(temperature_c=0)])).read().gpus
    assert gpu.temperature_c is None


def test_gpu_lost_while_reading_utilization_is_unhealthy() -> None:
    fake = FakeNvml([FakeDevice(utilization_error=pynvml.NVML_ERROR_GPU_IS_LOST)])
    (gpu,) = NvmlSource(fake).read().gpus
    assert (gpu.healthy, gpu.health_reason) == (False, "NVML: GPU is lost")


def test_bindings_without_utilization_or_temperature_leave_them_unknown() -> None:
    class Bare(FakeNvml):
        nvmlDeviceGetUtilizationRates = None
        nvmlDeviceGetTemperature = None

    (gpu,) = NvmlSource(Bare([FakeDevice()])).read().gpus
    assert (gpu.utilization_ratio, gpu.temperature_c, gpu.healthy) == (None, None, True)


def test_health_changes_are_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    device = FakeDevice()
    source = NvmlSource(FakeNvml([device]))
    device.lost = True
    with caplog.at_level(logging.INFO, logger="gpu_router.gpus.health"):
        source.read()
        source.read()
        device.lost = False
        source.read()
        source.read()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "NVML: GPU 0 (GPU 0) is unhealthy: NVML: GPU is lost",
        "NVML: GPU 0 (NVIDIA H100 80GB HBM3) is healthy again",
    ]


@pytest.mark.parametrize(
    "v2_error", [pynvml.NVML_ERROR_FUNCTION_NOT_FOUND, pynvml.NVML_ERROR_NOT_SUPPORTED], ids=["fnf", "ns"]
)
def test_v2_memory_call_unsupported_falls_back_to_v1(v2_error: int) -> None:
    fake = FakeNvml([FakeDevice(total=16 * GIB, free=12 * GIB, v2_error=v2_error)])
    reading = NvmlSource(fake).read()
    assert reading.error is None
    (gpu,) = reading.gpus
    assert (gpu.total_bytes, gpu.free_bytes, gpu.used_bytes) == (16 * GIB, 12 * GIB, 4 * GIB)
    assert fake.calls[-2:] == ["mem_v2:0", "mem_v1:0"]


def test_missing_v2_function_is_not_probed_again() -> None:
    fake = FakeNvml([FakeDevice(v2_error=pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)])
    source = NvmlSource(fake)
    source.read()
    source.read()
    assert fake.calls.count("mem_v2:0") == 1
    assert fake.calls.count("mem_v1:0") == 2


def test_old_bindings_without_the_version_keyword_use_v1() -> None:
    fake = OldBindings([FakeDevice(total=8 * GIB, free=2 * GIB)])
    reading = NvmlSource(fake).read()
    assert reading.error is None
    assert reading.gpus[0].used_bytes == 6 * GIB


def test_bindings_without_nvmlMemory_v2_use_v1() -> None:
    fake = FakeNvml([FakeDevice(total=8 * GIB, free=3 * GIB)])
    fake.nvmlMemory_v2 = None
    reading = NvmlSource(fake).read()
    assert reading.gpus[0].free_bytes == 3 * GIB
    assert "mem_v2:0" not in fake.calls


def test_unified_memory_device_reports_host_ram() -> None:
    fake = FakeNvml([FakeDevice(name="NVIDIA GB10", memory_error=pynvml.NVML_ERROR_NOT_SUPPORTED)])
    reading = NvmlSource(fake).read()
    assert reading.source is VramSource.NVML
    assert reading.error is None
    (gpu,) = reading.gpus
    assert gpu.name == "NVIDIA GB10"
    assert gpu.total_bytes == psutil.virtual_memory().total
    assert gpu.free_bytes is not None
    assert 0 < gpu.free_bytes <= gpu.total_bytes
    assert gpu.used_bytes == gpu.total_bytes - gpu.free_bytes


def test_zero_sized_framebuffer_reports_host_ram() -> None:
    fake = FakeNvml([FakeDevice(total=0, free=0, reserved=0)])
    reading = NvmlSource(fake).read()
    assert reading.gpus[0].total_bytes == psutil.virtual_memory().total


def test_driver_failing_after_init_drops_the_session_and_reinits_later() -> None:
    fake = FakeNvml([FakeDevice()])
    clock = FakeClock()
    source = NvmlSource(fake, retry_s=30.0, clock=clock)
    assert source.read().source is VramSource.NVML

    fake.count_error = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    broken = source.read()
    assert broken.source is VramSource.UNKNOWN
    assert broken.error is not None
    assert "not loaded" in broken.error
    assert fake.calls.count("shutdown") == 1
    assert fake.live_inits == 0

    fake.count_error = None
    clock.now += 31.0
    assert source.read().source is VramSource.NVML
    assert fake.calls.count("init") == 2


def test_no_gpus_is_an_nvml_reading_with_a_note() -> None:
    reading = NvmlSource(FakeNvml([])).read()
    assert reading.source is VramSource.NVML
    assert reading.gpus == ()
    assert reading.error == "NVML: the driver reports no GPUs"


def test_close_shuts_nvml_down_once_and_later_reads_say_closed() -> None:
    fake = FakeNvml([FakeDevice()])
    source = NvmlSource(fake)
    source.read()
    source.close()
    source.close()
    assert fake.calls.count("shutdown") == 1
    assert fake.live_inits == 0
    reading = source.read()
    assert reading.source is VramSource.UNKNOWN
    assert reading.error == "NVML: source is closed"


def test_close_before_any_read_does_not_call_shutdown() -> None:
    fake = FakeNvml([FakeDevice()])
    NvmlSource(fake).close()
    assert fake.calls == []


def test_concurrent_first_reads_initialise_once() -> None:
    fake = FakeNvml([FakeDevice()])
    fake.init_delay_s = 0.02
    source = NvmlSource(fake)
    results: list[VramSource] = []
    threads = [threading.Thread(target=lambda: results.append(source.read().source)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == [VramSource.NVML] * 8
    assert fake.calls.count("init") == 1


def _nvml_library_loadable() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(_nvml_library_loadable(), reason="this machine has an NVIDIA driver")
def test_real_pynvml_without_a_driver_gives_a_clean_no_driver_reading() -> None:
    source = NvmlSource()
    try:
        reading = source.read()
    finally:
        source.close()
    assert reading.source is VramSource.UNKNOWN
    assert reading.gpus == ()
    assert reading.error == "NVML: no NVIDIA driver (NVML Shared Library Not Found)"
