"""This machine's AMD GPUs, read from the amdgpu driver's sysfs files: no library, no ROCm.

Per card, under ``/sys/class/drm/cardN/device/`` (the files Ollama itself read, see
``discover/amd_linux.go@v0.12.0`` and ``ml/backend/ggml/ggml/src/mem_hip.cpp@v0.24.0``):

* ``vendor`` is ``0x1002`` for AMD; ``device`` is the PCI device id; ``uevent`` has ``PCI_SLOT_NAME=``;
* ``mem_info_vram_total`` / ``mem_info_vram_used`` and ``mem_info_gtt_total`` / ``mem_info_gtt_used``
  are decimal bytes;
* ``gpu_busy_percent`` is the utilization in percent; ``hwmon/hwmon*/temp*_input`` are millidegrees
  Celsius, named by ``temp*_label`` (``edge``, ``junction``, ``mem``);
* ``product_name`` and ``unique_id`` (hex) exist on some cards only.

An integrated GPU (an APU) has a small VRAM carve-out and shares system memory through GTT; Ollama
counts VRAM + GTT for it, and so does this source.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
from pathlib import Path

from gpu_router.gpus.health import HealthTracker
from gpu_router.gpus.kinds import AMD_SYSFS_LABEL
from gpu_router.gpus.scrape import celsius
from gpu_router.records import record
from gpu_router.state import GIB, Gpu, GpuReading, VramSource

log = logging.getLogger(__name__)

LABEL = AMD_SYSFS_LABEL
AMD_VENDOR_ID = "0x1002"

# discover/amd.go@v0.30.0 (readROCmDRMDevice): maxIntegratedVRAM = 4 << 30, minSharedGTT = 8 << 30.
_MAX_INTEGRATED_VRAM_BYTES = 4 * GIB
_MIN_SHARED_GTT_BYTES = 8 * GIB
_CARD = re.compile(r"card(\d+)")
_PCI_ID = re.compile(r"[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")
_TEMPERATURE_PREFERENCE = ("junction", "edge")


def is_integrated(vram_total_bytes: int, gtt_total_bytes: int) -> bool:
    """Ollama's rule for an AMD integrated GPU: VRAM <= 4 GiB, GTT >= 8 GiB and >= 4x VRAM.

    From ``discover/amd.go@v0.30.0`` (``readROCmDRMDevice``), unchanged in v0.33.0-rc2.
    """
    return (
        0 < vram_total_bytes <= _MAX_INTEGRATED_VRAM_BYTES
        and gtt_total_bytes >= _MIN_SHARED_GTT_BYTES
        and gtt_total_bytes >= 4 * vram_total_bytes
    )


class _Unreadable(Exception):
    """A sysfs file that could not be read or parsed; ``missing`` when it does not exist."""

    def __init__(self, name: str, why: str, *, missing: bool = False) -> None:
        super().__init__(f"{name}: {why}")
        self.missing = missing


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise _Unreadable(path.name, why, missing=exc.errno == errno.ENOENT) from exc


def _read_int(path: Path) -> int:
    text = _read(path)
    try:
        return int(text, 0)
    except ValueError:
        raise _Unreadable(path.name, f"not a number: {text[:40]!r}") from None


def _optional_int(path: Path) -> int | None:
    try:
        return _read_int(path)
    except _Unreadable:
        return None


def _optional_text(path: Path) -> str:
    try:
        return _read(path)
    except _Unreadable:
        return ""


@record
class _Card:
    """One DRM card of AMD's, found before any of its memory files is read."""

    index: int  # position among this machine's AMD cards, in card-number order
    card: str  # cardN
    device: Path  # /sys/class/drm/cardN/device


class AmdSysfsSource:
    """Memory, utilization and temperature of this machine's AMD GPUs, from sysfs.

    ``root`` is the sysfs mount (tests pass a fake tree). A card whose files exist but fail to read
    (an I/O error: a GPU that fell off the bus) comes back as an unhealthy :class:`Gpu` with its last
    known figures; a card without the amdgpu memory files is left out, with the reason in ``error``.
    """

    kind = VramSource.AMD

    def __init__(self, root: str | os.PathLike[str] = "/sys") -> None:
        self._drm = Path(root) / "class" / "drm"
        self._health = HealthTracker("AMD sysfs")
        self._lock = threading.Lock()
        self._last: dict[str, Gpu] = {}  # by PCI id (else card name): figures for a card that stops answering

    def read(self) -> GpuReading:
        """Every AMD GPU of this machine; a reading with ``error`` instead of an exception on any problem."""
        try:
            cards = self._cards()
        except FileNotFoundError:
            cards = []  # no DRM class at all: a machine without GPUs (or a container without /sys)
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            return GpuReading(VramSource.UNKNOWN, (), error=f"AMD sysfs: cannot list {self._drm} ({why})")
        if not cards:
            return GpuReading(
                VramSource.UNKNOWN,
                (),
                error=f"AMD sysfs: no AMD GPU (vendor {AMD_VENDOR_ID}) under {self._drm}",
            )
        gpus: list[Gpu] = []
        problems: list[str] = []
        with self._lock:
            for card in cards:
                try:
                    gpus.append(self._read_card(card))
                except _Unreadable as exc:
                    problems.append(f"{card.card} skipped: {exc}")
        if problems:
            log.debug("AMD sysfs: %s", "; ".join(problems))
        if not gpus:
            return GpuReading(VramSource.UNKNOWN, (), error="AMD sysfs: " + "; ".join(problems))
        error = ("AMD sysfs: " + "; ".join(problems)) if problems else None
        return GpuReading(VramSource.AMD, self._health.apply(gpus), error=error)

    def close(self) -> None:
        """Nothing to release: every read opens and closes its files."""

    def _cards(self) -> list[_Card]:
        found: list[tuple[int, str, Path]] = []
        seen: set[str] = set()
        for entry in os.scandir(self._drm):
            match = _CARD.fullmatch(entry.name)
            if match is None:
                continue  # connectors (card0-DP-1) and render nodes (renderD128)
            device = Path(entry.path) / "device"
            if _optional_text(device / "vendor").lower() != AMD_VENDOR_ID:
                continue
            real = os.path.realpath(device)
            if real in seen:
                continue
            seen.add(real)
            found.append((int(match.group(1)), entry.name, device))
        found.sort()
        return [_Card(index, name, device) for index, (_, name, device) in enumerate(found)]

    def _read_card(self, card: _Card) -> Gpu:
        device = card.device
        pci = self._pci_id(device)
        key = pci or card.card
        name = _optional_text(device / "product_name") or self._fallback_name(device)
        uuid = _unique_id(device)
        try:
            total = _read_int(device / "mem_info_vram_total")
        except _Unreadable as exc:
            if exc.missing:
                raise _Unreadable("mem_info_vram_total", "missing (not amdgpu?)", missing=True) from exc
            return self._unhealthy(card.index, key, name, uuid, pci, f"cannot read {exc}")
        used = _optional_int(device / "mem_info_vram_used")
        integrated = False
        # discover/amd.go@v0.30.0: a card that names its VRAM vendor or board is discrete, whatever its sizes.
        if not ((device / "mem_info_vram_vendor").exists() or (device / "board_info").exists()):
            gtt_total = _optional_int(device / "mem_info_gtt_total")
            if gtt_total is not None and is_integrated(total, gtt_total):
                # mem_hip.cpp@v0.24.0 (ggml_hip_get_device_memory): an integrated GPU's memory is VRAM + GTT.
                integrated = True
                total += gtt_total
                gtt_used = _optional_int(device / "mem_info_gtt_used")
                used = None if used is None or gtt_used is None else used + gtt_used
        free = None if used is None else min(max(total - used, 0), total)
        busy = _optional_int(device / "gpu_busy_percent")
        gpu = Gpu(
            index=card.index,
            name=name,
            total_bytes=total,
            used_bytes=None if free is None else total - free,
            free_bytes=free,
            uuid=uuid,
            pci_bus_id=pci,
            utilization_ratio=None if busy is None or not 0 <= busy <= 100 else busy / 100,
            temperature_c=_temperature(device),
            integrated=integrated,
        )
        self._last[key] = gpu
        return gpu

    def _unhealthy(self, index: int, key: str, name: str, uuid: str, pci: str, reason: str) -> Gpu:
        last = self._last.get(key)
        total = last.total_bytes if last is not None else 0
        return Gpu(
            index=index,
            name=name,
            total_bytes=total,
            uuid=uuid,
            pci_bus_id=pci,
            healthy=False,
            health_reason=reason,
            integrated=last.integrated if last is not None else False,
        )

    @staticmethod
    def _pci_id(device: Path) -> str:
        for line in _optional_text(device / "uevent").splitlines():
            if line.startswith("PCI_SLOT_NAME="):
                return line.partition("=")[2].strip()
        base = os.path.basename(os.path.realpath(device))
        return base if _PCI_ID.fullmatch(base) else ""

    @staticmethod
    def _fallback_name(device: Path) -> str:
        device_id = _optional_text(device / "device").lower().removeprefix("0x")
        return f"AMD GPU 1002:{device_id}" if device_id else "AMD GPU"


def _unique_id(device: Path) -> str:
    """``GPU-`` + the hex ``unique_id`` in 16 digits, as Ollama logs it (discover/amd_linux.go@v0.12.0)."""
    text = _optional_text(device / "unique_id")
    try:
        value = int(text, 16)
    except ValueError:
        return ""
    return f"GPU-{value:016x}" if value else ""


def _temperature(device: Path) -> float | None:
    """Degrees Celsius from the card's hwmon sensors: junction, else edge, else the first one."""
    readings: dict[str, float] = {}
    try:
        hwmons = sorted(p for p in (device / "hwmon").iterdir() if p.name.startswith("hwmon"))
    except OSError:
        return None
    for hwmon in hwmons:
        try:
            inputs = sorted(p for p in hwmon.iterdir() if re.fullmatch(r"temp\d+_input", p.name))
        except OSError:
            continue
        for path in inputs:
            milli = _optional_int(path)
            value = None if milli is None else celsius(milli / 1000)
            if value is None:
                continue
            label = _optional_text(path.with_name(path.name.replace("_input", "_label"))).lower()
            readings.setdefault(label or path.name.removesuffix("_input"), value)
    for sensor in _TEMPERATURE_PREFERENCE:
        if sensor in readings:
            return readings[sensor]
    return next(iter(readings.values()), None)
