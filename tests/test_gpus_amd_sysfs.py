"""AmdSysfsSource on fake /sys trees laid out like the amdgpu driver's (device symlinks into /sys/devices)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gpu_router.gpus.amd_sysfs import AmdSysfsSource, is_integrated
from gpu_router.state import GIB, MIB, VramSource

FIXTURES = Path(__file__).parent / "fixtures" / "amd"


def real_mem_info() -> tuple[int, int]:
    """``(total, used)`` bytes from the real ``cat mem_info_vram_*`` sample."""
    text = (FIXTURES / "sysfs-mem_info.txt").read_text()
    used = int(re.search(r"mem_info_vram_used\n(\d+)", text).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"mem_info_vram_total\n(\d+)", text).group(1))  # type: ignore[union-attr]
    return total, used


@dataclass
class Card:
    """One card of the fake tree; None for a file that must not exist."""

    number: int
    pci: str = "0000:03:00.0"
    vendor: str = "0x1002"
    device: str = "0x73bf"
    vram_total: int | str | None = 8 * GIB
    vram_used: int | str | None = 2 * GIB
    gtt_total: int | None = 16 * GIB
    gtt_used: int | None = 100 * MIB
    busy_percent: int | None = 12
    temps_milli: dict[str, int] | None = field(default_factory=lambda: {"edge": 45000, "junction": 52000})
    product_name: str | None = None
    unique_id: str | None = None
    board_info: bool = False
    unreadable: tuple[str, ...] = ()  # files made into directories: reading them fails with EISDIR


def build(root: Path, *cards: Card) -> Path:
    """A sysfs root holding ``cards``, each ``class/drm/cardN/device`` a symlink to its PCI device."""
    drm = root / "class" / "drm"
    drm.mkdir(parents=True, exist_ok=True)
    for card in cards:
        dev = root / "devices" / "pci0000:00" / card.pci
        dev.mkdir(parents=True)
        files: dict[str, object] = {
            "vendor": card.vendor,
            "device": card.device,
            "uevent": f"DRIVER=amdgpu\nPCI_CLASS=30000\nPCI_SLOT_NAME={card.pci}\n",
            "mem_info_vram_total": card.vram_total,
            "mem_info_vram_used": card.vram_used,
            "mem_info_gtt_total": card.gtt_total,
            "mem_info_gtt_used": card.gtt_used,
            "gpu_busy_percent": card.busy_percent,
            "product_name": card.product_name,
            "unique_id": card.unique_id,
            "board_info": "type : oam\n" if card.board_info else None,
        }
        for name, value in files.items():
            if name in card.unreadable:
                (dev / name).mkdir()
            elif value is not None:
                (dev / name).write_text(f"{value}\n")
        if card.temps_milli is not None:
            hwmon = dev / "hwmon" / "hwmon3"
            hwmon.mkdir(parents=True)
            for i, (label, milli) in enumerate(card.temps_milli.items(), start=1):
                (hwmon / f"temp{i}_input").write_text(f"{milli}\n")
                if label:
                    (hwmon / f"temp{i}_label").write_text(f"{label}\n")
        entry = drm / f"card{card.number}"
        entry.mkdir()
        (entry / "device").symlink_to(dev)
        # What a real /sys/class/drm also holds: connectors and render nodes, which are not cards.
        (drm / f"card{card.number}-DP-1").mkdir()
        (drm / f"renderD{128 + card.number}").mkdir()
    return root


def test_one_discrete_card_from_the_real_mem_info_sample(tmp_path: Path) -> None:
    total, used = real_mem_info()
    root = build(tmp_path, Card(0, vram_total=total, vram_used=used))
    reading = AmdSysfsSource(root).read()
    assert reading.source is VramSource.AMD
    assert reading.error is None
    (gpu,) = reading.gpus
    assert (gpu.index, gpu.pci_bus_id, gpu.name) == (0, "0000:03:00.0", "AMD GPU 1002:73bf")
    assert (gpu.total_bytes, gpu.used_bytes, gpu.free_bytes) == (
        8573157376,
        6812925952,
        8573157376 - 6812925952,
    )
    assert (gpu.utilization_ratio, gpu.temperature_c) == (0.12, 52.0)  # junction before edge
    assert (gpu.healthy, gpu.integrated, gpu.uuid) == (True, False, "")


def test_two_cards_in_card_number_order_and_only_amd_ones(tmp_path: Path) -> None:
    root = build(
        tmp_path,
        Card(10, pci="0000:83:00.0", product_name="AMD Instinct MI210", unique_id="4b0a1c8f02e3e1a3"),
        Card(1, pci="0000:01:00.0", vendor="0x10de"),  # an NVIDIA card on the same host
        Card(2, pci="0000:03:00.0", vram_total=21458059264, vram_used=27856896, busy_percent=0),
    )
    reading = AmdSysfsSource(root).read()
    first, second = reading.gpus
    # card2 sorts before card10: numbers, not strings
    assert (first.index, first.pci_bus_id, first.total_bytes, first.utilization_ratio) == (
        0,
        "0000:03:00.0",
        21458059264,
        0.0,
    )
    assert (second.index, second.pci_bus_id, second.name) == (1, "0000:83:00.0", "AMD Instinct MI210")
    assert second.uuid == "GPU-4b0a1c8f02e3e1a3"


def test_an_integrated_gpu_counts_gtt_and_says_so(tmp_path: Path) -> None:
    root = build(
        tmp_path, Card(0, vram_total=512 * MIB, vram_used=300 * MIB, gtt_total=16 * GIB, gtt_used=2 * GIB)
    )
    (gpu,) = AmdSysfsSource(root).read().gpus
    assert gpu.integrated
    assert gpu.total_bytes == 512 * MIB + 16 * GIB
    assert gpu.used_bytes == 300 * MIB + 2 * GIB
    assert gpu.free_bytes == gpu.total_bytes - gpu.used_bytes


def test_integrated_without_gtt_usage_has_unknown_usage(tmp_path: Path) -> None:
    root = build(tmp_path, Card(0, vram_total=512 * MIB, gtt_total=16 * GIB, gtt_used=None))
    (gpu,) = AmdSysfsSource(root).read().gpus
    assert (gpu.integrated, gpu.total_bytes) == (True, 512 * MIB + 16 * GIB)
    assert (gpu.used_bytes, gpu.free_bytes) == (None, None)


def test_a_card_with_board_info_is_discrete_whatever_its_sizes(tmp_path: Path) -> None:
    root = build(tmp_path, Card(0, vram_total=512 * MIB, vram_used=0, gtt_total=16 * GIB, board_info=True))
    (gpu,) = AmdSysfsSource(root).read().gpus
    assert (gpu.integrated, gpu.total_bytes, gpu.used_bytes) == (False, 512 * MIB, 0)


@pytest.mark.parametrize(
    ("vram", "gtt", "integrated"),
    [
        (512 * MIB, 16 * GIB, True),
        (4 * GIB, 16 * GIB, True),  # the edges are inclusive
        (4 * GIB + 1, 64 * GIB, False),  # too much VRAM
        (2 * GIB, 8 * GIB - 1, False),  # too little GTT
        (3 * GIB, 11 * GIB, False),  # GTT under 4x VRAM
        (0, 16 * GIB, False),
    ],
)
def test_ollamas_integrated_rule(vram: int, gtt: int, integrated: bool) -> None:
    assert is_integrated(vram, gtt) is integrated


def test_a_card_without_hwmon_or_busy_percent_has_unknown_figures(tmp_path: Path) -> None:
    root = build(tmp_path, Card(0, temps_milli=None, busy_percent=None))
    (gpu,) = AmdSysfsSource(root).read().gpus
    assert (gpu.temperature_c, gpu.utilization_ratio) == (None, None)
    assert gpu.free_bytes == 6 * GIB


def test_temperature_without_labels_and_zero_sensors(tmp_path: Path) -> None:
    root = build(tmp_path, Card(0, temps_milli={"": 0, "mem": 71500}))
    (gpu,) = AmdSysfsSource(root).read().gpus
    assert gpu.temperature_c == 71.5  # temp1 reads 0 (no sensor): the labelled mem sensor is all there is


def test_unreadable_used_leaves_usage_unknown(tmp_path: Path) -> None:
    root = build(tmp_path, Card(0, unreadable=("mem_info_vram_used", "gpu_busy_percent")))
    (gpu,) = AmdSysfsSource(root).read().gpus
    assert (gpu.total_bytes, gpu.used_bytes, gpu.free_bytes, gpu.utilization_ratio) == (
        8 * GIB,
        None,
        None,
        None,
    )
    assert gpu.healthy


def test_unreadable_total_is_an_unhealthy_gpu_with_its_last_figures(tmp_path: Path) -> None:
    root = build(tmp_path, Card(0), Card(1, pci="0000:04:00.0"))
    source = AmdSysfsSource(root)
    assert [g.healthy for g in source.read().gpus] == [True, True]
    bad = root / "devices" / "pci0000:00" / "0000:04:00.0" / "mem_info_vram_total"
    bad.unlink()
    bad.mkdir()  # reading it now fails with an I/O-class error, as a GPU off the bus does
    reading = source.read()
    ok, gone = reading.gpus
    assert ok.healthy
    assert (gone.index, gone.pci_bus_id, gone.total_bytes, gone.used_bytes) == (
        1,
        "0000:04:00.0",
        8 * GIB,
        None,
    )
    assert not gone.healthy
    assert gone.health_reason == "cannot read mem_info_vram_total: Is a directory"


def test_a_garbled_total_never_read_before_is_unhealthy_with_zero_total(tmp_path: Path) -> None:
    root = build(tmp_path, Card(0, vram_total="garbage"))
    (gpu,) = AmdSysfsSource(root).read().gpus
    assert (gpu.healthy, gpu.total_bytes) == (False, 0)
    assert gpu.health_reason == "cannot read mem_info_vram_total: not a number: 'garbage'"


def test_a_card_without_amdgpu_memory_files_is_skipped_and_named(tmp_path: Path) -> None:
    root = build(tmp_path, Card(0, vram_total=None, vram_used=None), Card(1, pci="0000:04:00.0"))
    reading = AmdSysfsSource(root).read()
    assert [g.pci_bus_id for g in reading.gpus] == ["0000:04:00.0"]
    assert reading.gpus[0].index == 1
    assert reading.error == "AMD sysfs: card0 skipped: mem_info_vram_total: missing (not amdgpu?)"


def test_only_unusable_cards_is_unknown(tmp_path: Path) -> None:
    root = build(tmp_path, Card(0, vram_total=None))
    reading = AmdSysfsSource(root).read()
    assert reading.source is VramSource.UNKNOWN
    assert reading.gpus == ()
    assert reading.error == "AMD sysfs: card0 skipped: mem_info_vram_total: missing (not amdgpu?)"


def test_no_amd_card_is_unknown_and_says_where_it_looked(tmp_path: Path) -> None:
    root = build(tmp_path, Card(0, vendor="0x8086"))
    reading = AmdSysfsSource(root).read()
    assert (reading.source, reading.gpus) == (VramSource.UNKNOWN, ())
    assert reading.error == f"AMD sysfs: no AMD GPU (vendor 0x1002) under {root}/class/drm"


def test_no_drm_class_at_all_is_no_amd_gpu(tmp_path: Path) -> None:
    reading = AmdSysfsSource(tmp_path).read()
    assert reading.source is VramSource.UNKNOWN
    assert reading.error == f"AMD sysfs: no AMD GPU (vendor 0x1002) under {tmp_path}/class/drm"


def test_an_unlistable_drm_class_is_unknown_not_an_exception(tmp_path: Path) -> None:
    (tmp_path / "class").mkdir()
    (tmp_path / "class" / "drm").write_text("not a directory\n")
    reading = AmdSysfsSource(tmp_path).read()
    assert reading.source is VramSource.UNKNOWN
    assert reading.error == f"AMD sysfs: cannot list {tmp_path}/class/drm (Not a directory)"


def test_pci_id_falls_back_to_the_device_path_without_uevent(tmp_path: Path) -> None:
    root = build(tmp_path, Card(0, pci="0000:0a:00.0"))
    (root / "devices" / "pci0000:00" / "0000:0a:00.0" / "uevent").unlink()
    (gpu,) = AmdSysfsSource(root).read().gpus
    assert gpu.pci_bus_id == "0000:0a:00.0"
