"""What pulls cost gpu-router: the planner's pull step, and the client CPU per pull status line.

Run: .venv/bin/python bench/bench_pull.py [--nodes 1000] [--gpus 4] [--models 200] [--repeat 5]
     [--lines 100000]

1. The planner on a large cluster where every priority model is installed on only two nodes, so
   each is short of its replicas and the pull step judges every node: ``pull_missing`` on against
   off, the same state, as a ratio of medians (one process, one run).
2. A PullManager reading a long ``/api/pull`` stream from a server on 127.0.0.1 that sends ready-made
   progress lines as fast as the socket takes them: wall time per line on the client side, against
   the 60 ms between two lines of a real Ollama download.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import threading
import time
from datetime import datetime, timezone

from gpu_router.config import Config, GpuSpec, NodeConfig, PriorityModel
from gpu_router.ollama import OllamaClient
from gpu_router.planner import Action, ActionKind, plan
from gpu_router.pull import PullManager
from gpu_router.state import (
    GIB,
    ClusterState,
    Gpu,
    GpuReading,
    InstalledModel,
    NodeState,
    NodeStatus,
    VramSource,
)

OLLAMA_LINE_INTERVAL_S = 0.06  # blobDownload.Wait ticker, server/download.go@v0.30.0


def build(nodes: int, gpus: int, models: int, seed: int = 1) -> tuple[ClusterState, dict[str, int]]:
    rnd = random.Random(seed)
    names = [f"model-{i}:latest" for i in range(models)]
    sizes = {m: int(rnd.uniform(0.2, 20) * GIB) for m in names}
    out = []
    for i in range(nodes):
        total = rnd.choice([8, 16, 24, 48]) * GIB
        # The first 20 (the priority models) only on nodes 0 and 1; the rest everywhere.
        installed = tuple(InstalledModel(m, sizes[m] // 2) for j, m in enumerate(names) if j >= 20 or i < 2)
        gpu_list = tuple(Gpu(g, "bench", total, 0, total) for g in range(gpus))
        out.append(
            NodeState(
                f"n{i}",
                f"http://n{i}:11434",
                NodeStatus.UP,
                gpu=GpuReading(VramSource.NVML, gpu_list),
                installed=installed,
            )
        )
    return ClusterState(tuple(out), observed_at=datetime(2026, 11, 23, tzinfo=timezone.utc)), sizes


def time_plan(state: ClusterState, cfg: Config, sizes: dict[str, int], repeat: int) -> tuple[float, int]:
    times = []
    pulls = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        p = plan(state, cfg, needs=sizes, full=False)
        times.append(time.perf_counter() - t0)
        pulls = sum(1 for a in p.actions if a.kind is ActionKind.PULL)
    return statistics.median(times), pulls


def bench_planner(args: argparse.Namespace) -> None:
    state, sizes = build(args.nodes, args.gpus, args.models)
    names = sorted(sizes, key=lambda m: int(m.split("-")[1].split(":")[0]))[:20]
    nodes = tuple(NodeConfig(n.name, n.url, GpuSpec("nvml")) for n in state.nodes)
    pms = tuple(PriorityModel(m, replicas=4) for m in names)
    off = Config(nodes=nodes, priority_models=pms)
    on = Config(nodes=nodes, priority_models=pms, pull_missing=True)
    time_plan(state, on, sizes, 1)  # warm up
    t_off, _ = time_plan(state, off, sizes, args.repeat)
    t_on, pulls = time_plan(state, on, sizes, args.repeat)
    print(
        f"planner (daemon path, priority models only): {args.nodes} nodes x {args.gpus} GPUs,"
        f" 20 priority models x 4 replicas, each installed on 2 nodes"
    )
    print(f"  pull_missing off: median {t_off * 1000:.1f} ms over {args.repeat} runs")
    print(f"  pull_missing on:  median {t_on * 1000:.1f} ms ({pulls} pulls planned)")
    print(f"  ratio on/off: {t_on / t_off:.2f}")


def _serve(listener: socket.socket, body: bytes) -> None:
    conn, _ = listener.accept()
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":")[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        while len(rest) < length:
            rest += conn.recv(65536)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n" + body
        )


def bench_stream(args: argparse.Namespace) -> None:
    total = 40 * GIB
    digest = "sha256:" + "ab" * 32
    lines = [json.dumps({"status": "pulling manifest"})]
    for i in range(args.lines):
        done = total * (i + 1) // args.lines
        lines.append(
            json.dumps(
                {"status": f"pulling {digest[7:19]}", "digest": digest, "total": total, "completed": done}
            )
        )
    lines += [json.dumps({"status": s}) for s in ("verifying sha256 digest", "writing manifest", "success")]
    body = ("\n".join(lines) + "\n").encode()
    walls = []
    cpus = []
    for _ in range(3):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        server = threading.Thread(target=_serve, args=(listener, body), daemon=True)
        server.start()
        client = OllamaClient("bench", f"http://127.0.0.1:{listener.getsockname()[1]}", timeout_s=30.0)
        done = threading.Event()
        manager = PullManager(max_concurrent=1, timeout_s=120.0, on_done=done.set)
        c0, t0 = time.process_time(), time.perf_counter()
        assert manager.start(Action(ActionKind.PULL, "bench", "m:latest", "bench"), client) is None
        done.wait(120)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        [result] = manager.collect()
        assert result.ok, result.detail
        server.join(5)
        listener.close()
    n = len(lines)
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    print(
        f"pull stream: {n:,} status lines ({len(body) / 1e6:.1f} MB)"
        " through OllamaClient.pull and PullManager"
    )
    print(f"  median {wall:.2f} s wall, {cpu:.2f} s CPU (both ends in this process) over 3 runs")
    print(
        f"  {cpu / n * 1e6:.1f} us CPU per line;"
        f" Ollama sends one every {OLLAMA_LINE_INTERVAL_S * 1000:.0f} ms:"
    )
    print(f"  {cpu / n / OLLAMA_LINE_INTERVAL_S * 100:.3f}% of one core per pull in flight")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--models", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--lines", type=int, default=100_000)
    args = ap.parse_args()
    bench_planner(args)
    bench_stream(args)


if __name__ == "__main__":
    main()
