"""NVML for an emulated node, faked at the adapter seam (``NvmlSource(nvml=...)``).

It answers with the node's own GPU figures (so what NVML says and what the emulated Ollama does
agree) and raises pynvml's real exception classes; ``gone`` makes the driver disappear, as when the
nvidia module is unloaded or the GPU falls off the bus under a running daemon.
"""

from __future__ import annotations

import types

import pynvml

from gpu_router.emulator import EmulatedNode


class EmulatedNvml(types.ModuleType):
    """A ``pynvml`` stand-in backed by an :class:`EmulatedNode`'s GPUs."""

    nvmlMemory_v2 = None  # the v1 memory call only: enough for the figures here

    def __init__(self, node: EmulatedNode) -> None:
        super().__init__("emulated_pynvml")
        for name in dir(pynvml):
            if name.startswith(("NVMLError", "NVML_")):
                setattr(self, name, getattr(pynvml, name))
        self.node = node
        self.gone = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.gone:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    def nvmlInit(self) -> None:
        self._check()

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.node.gpu_state())

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._check()
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return str(self.node.gpu_state()[handle]["name"])

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return str(self.node.gpu_state()[handle]["uuid"])

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> types.SimpleNamespace:
        self._check()
        g = self.node.gpu_state()[handle]
        return types.SimpleNamespace(total=g["total_bytes"], free=g["free_bytes"], used=g["used_bytes"])
