"""Planner time for a large cluster: 1,000 (or --nodes 10000) nodes x 4 GPUs x 200 models.

Run: .venv/bin/python bench/bench_planner.py [--nodes 1000] [--gpus 4] [--models 200] [--repeat 5]
Prints the median and best of several runs of the daemon's path (``plan(full=False)``: only the
priority models it acts on) and of the full table the report shows, each on a fresh observation
(new NodeStates, as every reconcile has). The planner is pure, so this is CPU time only.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone

from gpu_router.config import Config, GpuSpec, NodeConfig, PriorityModel
from gpu_router.planner import plan
from gpu_router.state import (
    GIB,
    ClusterState,
    Gpu,
    GpuReading,
    InstalledModel,
    InstalledModels,
    LoadedModel,
    NodeState,
    NodeStatus,
    VramSource,
)


def build(nodes: int, gpus: int, models: int, seed: int = 1) -> tuple[ClusterState, Config, dict[str, int]]:
    rnd = random.Random(seed)
    now = datetime(2026, 11, 23, tzinfo=timezone.utc)
    names = [f"model-{i}:latest" for i in range(models)]
    sizes = {m: int(rnd.uniform(0.2, 20) * GIB) for m in names}
    out = []
    for i in range(nodes):
        total = rnd.choice([8, 16, 24, 48]) * GIB
        # As the observer makes them: one tags answer, indexed by name once and kept between polls.
        installed = InstalledModels(InstalledModel(m, sizes[m] // 2) for m in names)
        # Priority models (the first 20) start unloaded, so the pass has real placements to make.
        resident = [m for m in rnd.sample(names[20:], 3) if sizes[m] < total // 2]
        loaded = tuple(
            LoadedModel(m, sizes[m], sizes[m], expires_at=now + timedelta(seconds=rnd.randint(1, 600)))
            for m in resident
        )
        used = sum(m.size_bytes for m in loaded)
        gpu_list = []
        for g in range(gpus):
            u = min(used, total)
            used -= u
            gpu_list.append(Gpu(g, "bench", total, u, total - u))
        out.append(
            NodeState(
                f"n{i}",
                f"http://n{i}:11434",
                NodeStatus.UP,
                gpu=GpuReading(VramSource.NVML, tuple(gpu_list)),
                loaded=loaded,
                installed=installed,
            )
        )
    cfg = Config(
        nodes=tuple(NodeConfig(n.name, n.url, GpuSpec("nvml")) for n in out),
        priority_models=tuple(PriorityModel(m, replicas=2) for m in names[:20]),
    )
    return ClusterState(tuple(out), observed_at=now), cfg, sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--models", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    state, cfg, sizes = build(args.nodes, args.gpus, args.models)

    def fresh() -> ClusterState:
        # A new observation of the same cluster, as each reconcile has: new NodeStates, the same
        # tags tuples (the observer keeps them between polls, with their index by name).
        return ClusterState(tuple(replace(n) for n in state.nodes), observed_at=state.observed_at)

    plan(fresh(), cfg, needs=sizes, full=False)  # the first poll of the tags indexes them
    figures: dict[str, list[float]] = {"daemon path (priority models)": [], "full table (the report)": []}
    verdicts = 0
    for _ in range(args.repeat):
        for what, full in (("daemon path (priority models)", False), ("full table (the report)", True)):
            s = fresh()
            # The last plan goes first: a full table at 10,000 nodes is 2 million verdicts, and the
            # collector pass that ends the next plan would otherwise walk them all.
            p = None
            t0 = time.perf_counter()
            p = plan(s, cfg, needs=sizes, full=full)
            figures[what].append(time.perf_counter() - t0)
            verdicts = max(verdicts, sum(len(m.fits) for m in p.models))
    print(
        f"planner: {args.nodes} nodes x {args.gpus} GPUs x {args.models} models "
        f"({verdicts:,} node verdicts in the full table, {len(p.actions)} actions)"
    )
    for what, times in figures.items():
        print(
            f"planner, {what}: median {statistics.median(times):.3f} s, best {min(times):.3f} s "
            f"over {args.repeat} runs"
        )


if __name__ == "__main__":
    main()
