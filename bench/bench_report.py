"""`gpu-router --report-only` on 50 emulated nodes, 5 refusing and 5 hanging, request_timeout 2 s.

Run: .venv/bin/python bench/bench_report.py [--nodes 50] [--refuse 5] [--hang 5] [--timeout 2] [--repeat 5]

Times the real command as a subprocess (spawn to exit), then observe+plan in this process (no interpreter
start-up), then the same observation with the nodes polled one after another, to show what concurrency
buys. Checks the JSON: how many nodes are up, down with "connection refused", down with "timed out".
The emulated nodes run in this process on 127.0.0.1; the in-process figures share its GIL with them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from gpu_router.config import Config, load_config
from gpu_router.emulator import EmulatedCluster, EmulatedNode, Fault
from gpu_router.observe import Observer, observe_once
from gpu_router.planner import plan
from gpu_router.state import ClusterState

MODEL_SETS = (
    ("nomic-embed-text:latest", "llama3.2:latest", "llama3.1:8b"),
    ("all-minilm:latest", "llama3.2:latest", "qwen2.5:7b", "mistral:latest"),
    ("nomic-embed-text:latest", "mxbai-embed-large:latest", "gemma2:2b", "phi3:mini"),
    ("nomic-embed-text:latest", "llama3.2:1b", "llama3.1:8b", "qwen2.5:14b"),
)
GPU_SETS = ((8192,), (16384,), (24576,), (24576, 24576))
PRIORITY = ("nomic-embed-text:latest", "llama3.2:latest")


def build_cluster(count: int) -> EmulatedCluster:
    """``count`` nodes with a few models each; every other node serves dcgm-style /metrics."""
    nodes = []
    for i in range(count):
        models = MODEL_SETS[i % len(MODEL_SETS)]
        node = EmulatedNode(f"node-{i + 1:02d}", GPU_SETS[i % len(GPU_SETS)], models, metrics=i % 2 == 0)
        # Something resident on most nodes, so /api/ps is not always empty.
        if i % 3 != 2:
            node.load(models[0], keep_alive=-1)
        nodes.append(node)
    return EmulatedCluster(nodes)


def write_config(cluster: EmulatedCluster, path: Path, timeout_s: float, state_dir: str) -> None:
    cfg = cluster.config(PRIORITY, request_timeout=timeout_s, state_dir=state_dir, log_level="WARNING")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")


def run_cli(cfg: Path) -> tuple[float, int, str, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "gpu_router", "--config", str(cfg), "--report-only", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return time.perf_counter() - t0, proc.returncode, proc.stdout, proc.stderr


def observe_and_plan(config: Config) -> tuple[float, ClusterState]:
    t0 = time.perf_counter()
    observer = Observer(config)
    try:
        state = observer.observe()
    finally:
        observer.close()
    plan(state, config)
    return time.perf_counter() - t0, state


def sequential(config: Config) -> tuple[float, float]:
    """Each node on its own one-node Observer, one after another; (total, slowest node) seconds."""
    slowest = 0.0
    t0 = time.perf_counter()
    for node in config.nodes:
        t1 = time.perf_counter()
        observe_once(dataclasses.replace(config, nodes=(node,)))
        slowest = max(slowest, time.perf_counter() - t1)
    return time.perf_counter() - t0, slowest


def count_nodes(data: dict[str, Any]) -> tuple[int, int, int, int]:
    up = refused = timed_out = other = 0
    for n in data["nodes"]:
        error = n.get("error") or ""
        if n["status"] == "up":
            up += 1
        elif n["status"] == "down" and "connection refused" in error:
            refused += 1
        elif n["status"] == "down" and "timed out" in error:
            timed_out += 1
        else:
            other += 1
    return up, refused, timed_out, other


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--refuse", type=int, default=5)
    ap.add_argument("--hang", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=2.0, help="request_timeout in seconds")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-sequential", action="store_true", help="skip the one-node-at-a-time pass")
    args = ap.parse_args()
    # The in-process passes would print the nodes-down warnings of every run; the JSON checks them.
    logging.getLogger("gpu_router").addHandler(logging.NullHandler())
    if args.refuse + args.hang > args.nodes:
        ap.error("--refuse + --hang must not exceed --nodes")
    target_s = args.timeout + 1.0

    with tempfile.TemporaryDirectory(prefix="gpu-router-bench-") as tmp, build_cluster(args.nodes) as cluster:
        faulty = list(cluster)[args.nodes - args.refuse - args.hang :]
        for n in faulty[: args.refuse]:
            n.set_fault(Fault.REFUSE)
        for n in faulty[args.refuse :]:
            n.set_fault(Fault.HANG)
        cfg = Path(tmp) / "config.yaml"
        write_config(cluster, cfg, args.timeout, str(Path(tmp) / "state"))
        config = load_config(cfg)
        print(
            f"report: {args.nodes} emulated nodes on 127.0.0.1, {args.refuse} refuse, {args.hang} hang, "
            f"request_timeout {args.timeout:g} s"
        )

        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gpu_router", "--version"], capture_output=True, check=True)
        startup_s = time.perf_counter() - t0

        times: list[float] = []
        data: dict[str, Any] = {}
        for _ in range(args.repeat):
            wall, rc, out, err = run_cli(cfg)
            times.append(wall)
            if rc != 0:
                print(f"report: the command exited {rc}: {err.strip()[-400:]}")
                continue
            data = json.loads(out)
        print(
            f"report-only (subprocess, spawn to exit): median {statistics.median(times):.2f} s, "
            f"best {min(times):.2f} s, worst {max(times):.2f} s over {args.repeat} runs"
        )
        print(f"interpreter start-up (python -m gpu_router --version): {startup_s:.2f} s")

        inproc: list[float] = []
        state: ClusterState | None = None
        for _ in range(args.repeat):
            wall, state = observe_and_plan(config)
            inproc.append(wall)
        print(
            f"observe+plan (in process): median {statistics.median(inproc):.2f} s, "
            f"best {min(inproc):.2f} s over {args.repeat} runs"
        )
        if state is not None:
            polls = [n.poll_s for n in state.nodes]
            print(
                f"NodeState.poll_s in the last concurrent pass: sum {sum(polls):.2f} s, "
                f"slowest {max(polls):.2f} s (each poll stretched by sharing the CPU with the others)"
            )
        if not args.no_sequential:
            seq_s, slowest = sequential(config)
            print(
                f"sequential (one node after another, in process): {seq_s:.2f} s "
                f"(slowest node {slowest:.2f} s)"
            )
            print(
                f"concurrent {statistics.median(inproc):.2f} s vs sequential {seq_s:.2f} s "
                f"({seq_s / statistics.median(inproc):.1f}x)"
            )

        if data:
            up, refused, timed_out, other = count_nodes(data)
            expected = (args.nodes - args.refuse - args.hang, args.refuse, args.hang, 0)
            print(
                f"JSON: {up} up, {refused} down with 'connection refused', "
                f"{timed_out} down with 'timed out', {other} other (expected {', '.join(map(str, expected))})"
            )
            ok = (up, refused, timed_out, other) == expected
            print(f"JSON node counts: {'PASS' if ok else 'FAIL'}")
        else:
            print("JSON: no successful run to check: FAIL")
        median = statistics.median(times)
        verdict = "PASS" if median < target_s else "FAIL"
        print(
            f"{verdict} against the target: report-only median {median:.2f} s "
            f"< timeout + 1 s = {target_s:g} s"
        )


if __name__ == "__main__":
    main()
