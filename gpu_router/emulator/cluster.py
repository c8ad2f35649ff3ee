"""Several emulated nodes started and stopped together, their gpu-router config, and the demo cluster."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

from gpu_router.emulator.catalogue import EmulatorError
from gpu_router.emulator.node import EmulatedNode
from gpu_router.state import GIB


class EmulatedCluster:
    """Several nodes started and stopped together; ``cluster["gpu-a"]`` finds one by name."""

    def __init__(self, nodes: Iterable[EmulatedNode]) -> None:
        self.nodes: tuple[EmulatedNode, ...] = tuple(nodes)
        names = [n.name for n in self.nodes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise EmulatorError(f"node names must be unique; repeated: {', '.join(dupes)}")

    def __getitem__(self, name: str) -> EmulatedNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def __iter__(self) -> Iterator[EmulatedNode]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def config(
        self,
        priority_models: Sequence[str] = (),
        *,
        claimed_vram_mib: Mapping[str, Sequence[int]] | None = None,
        **settings: object,
    ) -> dict[str, Any]:
        """A gpu-router config (as a dict, ready for YAML) pointing at this cluster's nodes.

        GPU nodes are read from their /metrics when they serve one, else given as static figures;
        ``claimed_vram_mib`` gives some nodes static figures that differ from their real GPUs (a
        config that says 8192 for a card that has 4096); ``settings`` are further top-level keys
        (request_timeout, state_dir, ...).
        """
        claimed = dict(claimed_vram_mib or {})
        unknown = sorted(set(claimed) - {n.name for n in self.nodes})
        if unknown:
            raise EmulatorError(f"claimed_vram_mib names unknown nodes: {', '.join(unknown)}")
        nodes: list[dict[str, Any]] = []
        for n in self.nodes:
            entry: dict[str, Any] = {"name": n.name, "url": n.url}
            if n.name in claimed:
                entry["gpu"] = {"vram_mb": [int(m) for m in claimed[n.name]]}
            elif not n.gpus_mib:
                entry["gpu"] = "none"
            elif n.metrics:
                entry["gpu"] = {"exporter": n.metrics_url}
            else:
                entry["gpu"] = {"vram_mb": list(n.gpus_mib)}
            nodes.append(entry)
        return {"nodes": nodes, "priority_models": list(priority_models), **settings}

    def start(self) -> list[str]:
        """Start every node; returns their URLs in order. Stops the started ones if one fails."""
        urls: list[str] = []
        try:
            for n in self.nodes:
                urls.append(n.start())
        except BaseException:
            self.stop()
            raise
        return urls

    def stop(self) -> None:
        """Stop every node (idempotent)."""
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> EmulatedCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


DEMO_PRIORITY_MODELS: tuple[str, ...] = ("nomic-embed-text:latest", "llama3.2:latest", "llama3.1:8b")


def demo_cluster(*, port_base: int = 0, load_delay_s: float = 0.0) -> EmulatedCluster:
    """Three nodes in interesting states, not started (see the module docs of ``gpu_router.emulator``).

    - ``gpu-small``: 1 x 4096 MiB, metrics; llama3.1:8b (too big for the card) loaded partially offloaded.
    - ``cpu-only``: no GPU; nomic-embed-text loaded on CPU, forever.
    - ``gpu-8g``: 1 x 8192 MiB, metrics, 300 MiB used by another process; llama3.2 and mxbai-embed-large
      fully on GPU; qwen2.5:7b and llama3.1:8b installed but not loaded.
    All three are Ollama 0.12.6 (the classic estimate). ``port_base`` > 0 puts node *i* on
    ``port_base + i`` and the exporters of the two GPU nodes on ``port_base + 3`` and ``+ 4``.
    """

    def port(i: int) -> int:
        return port_base + i if port_base > 0 else 0

    small = EmulatedNode(
        "gpu-small",
        (4096,),
        ("nomic-embed-text:latest", "all-minilm:latest", "llama3.2:latest", "llama3.1:8b"),
        metrics=True,
        port=port(0),
        metrics_port=port(3),
        ram_bytes=16 * GIB,
    )
    cpu = EmulatedNode(
        "cpu-only",
        (),
        ("nomic-embed-text:latest", "all-minilm:latest", "llama3.2:1b", "llama3.2:latest"),
        port=port(1),
        ram_bytes=16 * GIB,
    )
    big = EmulatedNode(
        "gpu-8g",
        (8192,),
        (
            "nomic-embed-text:latest",
            "mxbai-embed-large:latest",
            "llama3.2:latest",
            "llama3.1:8b",
            "qwen2.5:7b",
        ),
        metrics=True,
        port=port(2),
        metrics_port=port(4),
    )
    small.load("llama3.1:8b", keep_alive="30m")
    cpu.load("nomic-embed-text:latest", keep_alive=-1)
    big.set_other_usage_mib(0, 300)
    big.load("mxbai-embed-large:latest", keep_alive=-1)
    big.load("llama3.2:latest", keep_alive="10m")
    for n in (small, cpu, big):
        n.clear_events()
        n.load_delay_s = float(load_delay_s)  # after the preloads, which should not wait
    return EmulatedCluster([small, cpu, big])
