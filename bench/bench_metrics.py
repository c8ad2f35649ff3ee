"""Scrape and route latency of the daemon's API on a large cluster: 50 nodes x 4 GPUs x 20 models.

Run: .venv/bin/python bench/bench_metrics.py [--nodes 50] [--gpus 4] [--models 20]
                                             [--scrapes 200] [--routes 5000]

The snapshot is built from synthetic observations by the real planner and published through the
real Telemetry; the API server is the real one, on 127.0.0.1, and every request goes over one
keep-alive HTTP connection, as Prometheus and a routing proxy would. Prints medians and tails,
and PASS/FAIL against the targets (scrape < 20 ms, route < 1 ms median); always exits 0.
"""

from __future__ import annotations

import argparse
import http.client
import random
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from prometheus_client import generate_latest

from gpu_router.api import ApiServer
from gpu_router.config import Config, GpuSpec, NodeConfig, PriorityModel
from gpu_router.executor import ActionResult
from gpu_router.metrics import TelemetryCollector, registry_for, render
from gpu_router.planner import Action, ActionKind, plan
from gpu_router.snapshot import Telemetry
from gpu_router.state import (
    GIB,
    ClusterState,
    Gpu,
    GpuReading,
    InstalledModel,
    LoadedModel,
    NodeState,
    NodeStatus,
    VramSource,
)

SCRAPE_TARGET_S = 0.020
ROUTE_TARGET_S = 0.001


@dataclass(frozen=True)
class BenchGpu(Gpu):
    """A GPU with utilization and temperature, as NVML and dcgm-exporter report them."""

    utilization_ratio: float | None = None
    temperature_c: float | None = None
    healthy: bool = True
    health_reason: str = ""


def build(nodes: int, gpus: int, models: int, seed: int = 1) -> tuple[ClusterState, Config]:
    rnd = random.Random(seed)
    now = datetime.now(timezone.utc)
    names = [f"model-{i}:latest" for i in range(models)]
    sizes = {m: int(rnd.uniform(0.3, 9) * GIB) for m in names}
    out = []
    for i in range(nodes):
        total = 24 * GIB
        resident = rnd.sample(names, min(models, 2 * gpus))
        loaded = tuple(
            LoadedModel(
                m,
                sizes[m],
                sizes[m] if rnd.random() < 0.9 else sizes[m] // 2,
                expires_at=now + timedelta(seconds=rnd.randint(60, 600)),
            )
            for m in resident
        )
        used = sum(m.vram_bytes for m in loaded)
        gpu_list = []
        for g in range(gpus):
            u = min(used, total)
            used -= u
            gpu_list.append(BenchGpu(g, "NVIDIA L4", total, u, total - u, rnd.random(), rnd.uniform(35, 80)))
        status = NodeStatus.UP if i % 25 else NodeStatus.DOWN
        out.append(
            NodeState(
                f"node-{i:02d}",
                f"http://10.0.{i // 250}.{i % 250}:11434",
                status,
                error=None if status is NodeStatus.UP else "GET /api/ps: connection refused",
                gpu=GpuReading(VramSource.EXPORTER, tuple(gpu_list)),
                loaded=loaded if status is NodeStatus.UP else (),
                installed=tuple(InstalledModel(m, sizes[m] // 2) for m in names)
                if status is NodeStatus.UP
                else (),
                poll_s=rnd.uniform(0.005, 0.05),
            )
        )
    config = Config(
        nodes=tuple(NodeConfig(n.name, n.url, GpuSpec("exporter", n.url + "/metrics")) for n in out),
        priority_models=tuple(PriorityModel(m, replicas=2) for m in names[:5]),
    )
    return ClusterState(tuple(out), observed_at=now), config


def publish(t: Telemetry, state: ClusterState, config: Config, reconcile: int) -> None:
    t.reconciled(state, plan(state, config), reconcile=reconcile, duration_s=0.4, next_in_s=300)


def timed_gets(conn: http.client.HTTPConnection, paths: list[str]) -> tuple[list[float], int]:
    times, size = [], 0
    for path in paths:
        start = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        times.append(time.perf_counter() - start)
        if resp.status not in (200, 404):
            raise SystemExit(f"{path}: HTTP {resp.status}: {body[:200]!r}")
        size = len(body)
    return times, size


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def ms(x: float) -> str:
    return f"{x * 1000:.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--scrapes", type=int, default=200)
    ap.add_argument("--routes", type=int, default=5000)
    ap.add_argument("--cold", type=int, default=30, help="scrapes right after a new observation")
    args = ap.parse_args()

    state, config = build(args.nodes, args.gpus, args.models)
    t = Telemetry(config)
    publish(t, state, config, 1)
    # Counters with realistic label sets: poll errors on the down nodes, actions on many pairs.
    rnd = random.Random(2)
    for n in config.nodes:
        for m in rnd.sample([p.name for p in config.priority_models], 3):
            a = Action(ActionKind.LOAD, n.name, m, "bench")
            t.action_finished(ActionResult(a, rnd.random() < 0.8, "bench", 1.0))
        t.drift(n.name, "model_lost")
    api = ApiServer(t, "127.0.0.1", 0)
    api.start()
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
    try:
        print(
            f"metrics: {args.nodes} nodes x {args.gpus} GPUs x {args.models} models "
            f"({sum(len(n.loaded) for n in state.nodes)} loaded), "
            f"{len(config.priority_models)} priority models"
        )
        timed_gets(conn, ["/metrics"] * 5)  # warm-up: imports, first allocations
        scrape, size = timed_gets(conn, ["/metrics"] * args.scrapes)
        cold, primed, prime = [], [], []
        for i in range(args.cold):
            publish(t, state, config, 100 + i)  # a new observation: its gauges must be rendered afresh
            times, _ = timed_gets(conn, ["/metrics"])
            cold.append(times[0])
        for i in range(args.cold):
            publish(t, state, config, 200 + i)
            start = time.perf_counter()
            api.prime()  # what the daemon does after each reconcile, in its main loop
            prime.append(time.perf_counter() - start)
            times, _ = timed_gets(conn, ["/metrics"])
            primed.append(times[0])
        registry = registry_for(TelemetryCollector(t))
        in_process, stock = [], []
        for _ in range(args.cold):
            start = time.perf_counter()
            render(registry)
            in_process.append(time.perf_counter() - start)
            start = time.perf_counter()
            generate_latest(registry)
            stock.append(time.perf_counter() - start)
        lines = sum(1 for line in render(registry).decode().splitlines() if line and not line.startswith("#"))
        print(
            f"/metrics over HTTP: median {ms(statistics.median(scrape))}, p95 {ms(pct(scrape, 0.95))}, "
            f"max {ms(max(scrape))} over {args.scrapes} scrapes; {size / 1024:.0f} KiB, {lines} samples"
        )
        print(
            "first /metrics after a new observation, rendered in the request: "
            f"median {ms(statistics.median(cold))}, max {ms(max(cold))} over {args.cold}"
        )
        print(
            "the same, primed after the reconcile as the daemon does: "
            f"median {ms(statistics.median(primed))}; priming took {ms(statistics.median(prime))} "
            "of the main loop's time per reconcile"
        )
        ratio = statistics.median(stock) / statistics.median(in_process)
        print(
            "rendering everything in process: gpu-router's renderer "
            f"median {ms(statistics.median(in_process))}, "
            f"prometheus-client's generate_latest {ms(statistics.median(stock))} ({ratio:.1f}x)"
        )

        models = [f"model-{rnd.randrange(args.models)}:latest" for _ in range(args.routes)]
        paths = [f"/api/v1/route?model={m}" for m in models]
        # The server drops a connection idle for 10 s, as it may have been during the in-process runs.
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
        timed_gets(conn, paths[:50])
        route, _ = timed_gets(conn, paths)
        print(
            f"/api/v1/route over HTTP: median {ms(statistics.median(route))}, p99 {ms(pct(route, 0.99))}, "
            f"max {ms(max(route))} over {args.routes} requests"
        )
        first = []
        for i in range(20):
            publish(t, state, config, 2 + i)  # a new snapshot: its route index is built on first use
            times, _ = timed_gets(conn, [paths[i]])
            first.append(times[0])
        print(
            "first /api/v1/route after a new snapshot (builds the index): "
            f"median {ms(statistics.median(first))}"
        )

        scrape_median, route_median = statistics.median(scrape), statistics.median(route)
        ok = "PASS" if scrape_median < SCRAPE_TARGET_S else "FAIL"
        print(f"{ok} against the target: scrape median {ms(scrape_median)} < {ms(SCRAPE_TARGET_S)}")
        first = statistics.median(primed)
        ok = "PASS" if first < SCRAPE_TARGET_S else "FAIL"
        print(f"{ok} against the target, first scrape after a reconcile: {ms(first)} < {ms(SCRAPE_TARGET_S)}")
        ok = "PASS" if route_median < ROUTE_TARGET_S else "FAIL"
        print(f"{ok} against the target: route median {ms(route_median)} < {ms(ROUTE_TARGET_S)}")
    finally:
        conn.close()
        api.stop()


if __name__ == "__main__":
    main()
