"""Emulated Ollama clusters for the benchmarks, in this process or spread over child processes.

Real Ollama nodes are separate (Go) processes. Hundreds of emulated nodes in one Python process
share one GIL: a burst of a thousand requests makes them hand it around so much that the emulator,
not the client being measured, sets the pace (and burns several seconds of CPU doing it). So large
clusters run in child processes of about ``NODES_PER_PROCESS`` nodes each; a child prints its
nodes' config entries as one JSON line and serves until its stdin closes.

Run as a script only by :func:`spawn` (``python bench/emulated.py --child ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_router.emulator import EmulatedCluster, EmulatedNode, Fault

MODEL_SETS = (
    ("nomic-embed-text:latest", "llama3.2:latest", "llama3.1:8b"),
    ("all-minilm:latest", "llama3.2:latest", "qwen2.5:7b", "mistral:latest"),
    ("nomic-embed-text:latest", "mxbai-embed-large:latest", "gemma2:2b", "phi3:mini"),
    ("nomic-embed-text:latest", "llama3.2:1b", "llama3.1:8b", "qwen2.5:14b"),
)
GPU_SETS = ((8192,), (16384,), (24576,), (24576, 24576))
PRIORITY = ("nomic-embed-text:latest", "llama3.2:latest")
NODES_PER_PROCESS = 50


def make_node(i: int, *, metrics: bool | None = None) -> EmulatedNode:
    """Node ``i`` of a benchmark cluster: a few models, one loaded on most, dcgm /metrics on even ones."""
    models = MODEL_SETS[i % len(MODEL_SETS)]
    node = EmulatedNode(
        f"node-{i + 1:02d}",
        GPU_SETS[i % len(GPU_SETS)],
        models,
        metrics=(i % 2 == 0) if metrics is None else metrics,
    )
    # Something resident on most nodes, so /api/ps is not always empty.
    if i % 3 != 2:
        node.load(models[0], keep_alive=-1)
    return node


def build_cluster(count: int, *, first: int = 0) -> EmulatedCluster:
    """Nodes ``first`` .. ``first + count - 1`` (not started)."""
    return EmulatedCluster([make_node(i) for i in range(first, first + count)])


def faulted(index: int, total: int, refuse: int, hang: int) -> Fault | None:
    """The last ``refuse + hang`` nodes of a cluster misbehave: first the refusing, then the hung ones."""
    broken_from = total - refuse - hang
    if index < broken_from:
        return None
    return Fault.REFUSE if index < broken_from + refuse else Fault.HANG


@dataclass
class Spawned:
    """A cluster running in child processes."""

    nodes: list[dict[str, Any]]  # the config's nodes: entries, in node order
    procs: list[subprocess.Popen[str]]

    def config(self, **settings: object) -> dict[str, Any]:
        """A gpu-router config for these nodes (as a dict for YAML)."""
        return {"nodes": self.nodes, "priority_models": list(PRIORITY), **settings}

    def requests(self) -> list[list[str]]:
        """Each node's Ollama API request paths so far, in node order."""
        out: list[list[str]] = []
        for p in self.procs:
            assert p.stdin is not None
            assert p.stdout is not None
            p.stdin.write("count\n")
            p.stdin.flush()
            out.extend(json.loads(p.stdout.readline()))
        return out

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the children have used so far."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for p in self.procs:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        return total


@contextmanager
def spawn(
    count: int, *, refuse: int = 0, hang: int = 0, per_process: int = NODES_PER_PROCESS
) -> Iterator[Spawned]:
    """Start ``count`` nodes (the last ``refuse`` + ``hang`` of them broken) in child processes."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for first in range(0, count, per_process):
            n = min(per_process, count - first)
            args = (first, n, count, refuse, hang)
            cmd = [sys.executable, __file__, "--child", *map(str, args)]
            procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        nodes: list[dict[str, Any]] = []
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line:
                raise RuntimeError("an emulator child process died before it was ready")
            nodes.extend(json.loads(line))
        yield Spawned(nodes, procs)
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
        deadline = time.monotonic() + 20
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _child(first: int, count: int, total: int, refuse: int, hang: int) -> None:
    with build_cluster(count, first=first) as cluster:
        for i, node in enumerate(cluster):
            fault = faulted(first + i, total, refuse, hang)
            if fault is not None:
                node.set_fault(fault)
        print(json.dumps(cluster.config()["nodes"]), flush=True)
        # Until the parent closes our stdin; "count" asks for each node's Ollama API requests so far.
        for line in sys.stdin:
            if line.strip() == "count":
                counts = [[r.path for r in n.requests if r.path.startswith("/api/")] for n in cluster]
                print(json.dumps(counts), flush=True)


def urls_of(nodes: Sequence[dict[str, Any]]) -> list[str]:
    """The Ollama base URLs of config node entries."""
    return [str(n["url"]) for n in nodes]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="emulated nodes for a benchmark (child process)")
    ap.add_argument("--child", nargs=5, type=int, metavar=("FIRST", "COUNT", "TOTAL", "REFUSE", "HANG"))
    args = ap.parse_args()
    if args.child is None:
        ap.error("only run by bench scripts (--child)")
    _child(*args.child)
