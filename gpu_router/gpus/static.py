"""GPU sources that do no I/O: sizes from the config, CPU-only nodes, and nodes with no source."""

from __future__ import annotations

from collections.abc import Iterable

from gpu_router.state import Gpu, GpuReading, VramSource


class StaticSource:
    """Totals written in the config (``gpu: {vram_mb: [...]}``); used and free stay unknown."""

    kind = VramSource.STATIC

    def __init__(self, vram_bytes: Iterable[int]) -> None:
        self._reading = GpuReading(
            VramSource.STATIC,
            tuple(Gpu(index=i, name="static", total_bytes=int(b)) for i, b in enumerate(vram_bytes)),
        )

    def read(self) -> GpuReading:
        """The configured totals, the same every time."""
        return self._reading

    def close(self) -> None:
        """Nothing to release."""


class NoGpuSource:
    """A node configured as CPU-only: no GPUs, and that is a fact, not an error."""

    kind = VramSource.NONE

    def read(self) -> GpuReading:
        """An empty reading from :attr:`VramSource.NONE`."""
        return GpuReading(VramSource.NONE, ())

    def close(self) -> None:
        """Nothing to release."""


class UnknownSource:
    """No way to learn this node's GPU memory; every reading carries ``error`` so the report can say why."""

    kind = VramSource.UNKNOWN

    def __init__(self, error: str) -> None:
        self.error = error

    def read(self) -> GpuReading:
        """An empty :attr:`VramSource.UNKNOWN` reading with the reason."""
        return GpuReading(VramSource.UNKNOWN, (), error=self.error)

    def close(self) -> None:
        """Nothing to release."""
