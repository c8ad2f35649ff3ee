"""Daemon CPU time and memory over 1,000 idle reconcile cycles against 10 emulated nodes.

Run: .venv/bin/python bench/bench_daemon.py [--cycles 1000] [--nodes 10] [--interval 0.01] [--gpu static]

Every priority model is already pinned on GPU, so each cycle observes and plans and has nothing to do.
The real daemon runs as a subprocess (`python -m gpu_router --config CFG`, check_interval --interval,
watch_interval 0, log_level INFO: one "reconcile #N" line per cycle). psutil samples its RSS and CPU
time every 0.1 s. Prints CPU seconds per cycle, RSS at cycle 100 and at the last cycle, the growth
between them (target <= 2 MB), the steady RSS (median over the second half; target < 60 MB), then
stops it with SIGTERM and prints the exit code. MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil
import yaml

from gpu_router.config import load_config
from gpu_router.emulator import EmulatedCluster, EmulatedNode
from gpu_router.observe import observe_once
from gpu_router.planner import plan

PRIORITY = ("nomic-embed-text:latest", "llama3.2:latest")
MODELS = (*PRIORITY, "all-minilm:latest", "llama3.1:8b", "qwen2.5:7b")
RECONCILE = re.compile(r"reconcile #(\d+):")
SAMPLE_S = 0.1
MB = 1_000_000
MIB = 1024 * 1024


@dataclass(frozen=True)
class Sample:
    """One look at the daemon."""

    at_s: float
    cycle: int
    rss_bytes: int
    cpu_s: float


class CycleCounter:
    """Reads the daemon's stderr, keeps the last reconcile number and the last lines."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.cycle = 0
        self.lines = 0
        self.last: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            self.lines += 1
            self.last = [*self.last[-19:], line]
            m = RECONCILE.search(line)
            if m:
                self.cycle = int(m.group(1))

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)


def build_cluster(count: int, metrics: bool) -> EmulatedCluster:
    nodes = []
    for i in range(count):
        node = EmulatedNode(f"node-{i + 1:02d}", (8192,), MODELS, metrics=metrics)
        if i == 0:
            for m in PRIORITY:
                node.load(m, keep_alive=-1)
        elif i % 2 == 0:
            node.load("all-minilm:latest", keep_alive=-1)
        nodes.append(node)
    return EmulatedCluster(nodes)


def write_config(cluster: EmulatedCluster, path: Path, interval: str, state_dir: str) -> None:
    cfg = cluster.config(
        PRIORITY,
        check_interval=interval,
        watch_interval=0,
        request_timeout=2,
        state_dir=state_dir,
        log_level="INFO",
    )
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")


def at_cycle(samples: list[Sample], cycle: int) -> Sample | None:
    return next((s for s in samples if s.cycle >= cycle), None)


def mb(n: float) -> str:
    return f"{n / MB:.1f} MB ({n / MIB:.1f} MiB)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--interval", default="0.01", help="check_interval: seconds or a duration such as 10ms")
    ap.add_argument("--gpu", choices=("static", "exporter"), default="static", help="GPU memory source")
    ap.add_argument("--limit", type=float, default=180.0, help="give up after this many seconds")
    args = ap.parse_args()
    early = min(100, args.cycles // 2)

    with (
        tempfile.TemporaryDirectory(prefix="gpu-router-bench-") as tmp,
        build_cluster(args.nodes, args.gpu == "exporter") as cluster,
    ):
        cfg = Path(tmp) / "config.yaml"
        interval: Any = float(args.interval) if re.fullmatch(r"[0-9.]+", args.interval) else args.interval
        write_config(cluster, cfg, interval, str(Path(tmp) / "state"))
        config = load_config(cfg)
        actions = plan(observe_once(config), config).actions
        print(
            f"daemon: {args.nodes} emulated nodes ({args.gpu} GPU figures), check_interval {args.interval}, "
            f"watch off; actions planned at start: {len(actions)} (0 = every cycle idle)"
        )

        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_router", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert proc.stderr is not None
        counter = CycleCounter(proc.stderr)
        ps = psutil.Process(proc.pid)
        samples: list[Sample] = []
        gave_up = ""
        try:
            while True:
                if proc.poll() is not None:
                    gave_up = f"the daemon exited early with code {proc.returncode}"
                    break
                cycle = counter.cycle
                try:
                    cpu = ps.cpu_times()
                    rss = ps.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                samples.append(Sample(time.monotonic() - t0, cycle, rss, cpu.user + cpu.system))
                if cycle >= args.cycles:
                    break
                if time.monotonic() - t0 > args.limit:
                    gave_up = f"only {cycle} cycles in {args.limit:g} s"
                    break
                time.sleep(SAMPLE_S)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            counter.join(5)

        if gave_up:
            print(f"daemon: {gave_up}; last log lines:")
            print("\n".join(counter.last))
        first, last = at_cycle(samples, early), samples[-1] if samples else None
        if first is None or last is None or last.cycle <= first.cycle:
            print("daemon: too few cycles to measure")
        else:
            cycles = last.cycle - first.cycle
            per_cycle = (last.cpu_s - first.cpu_s) / cycles
            wall = last.at_s - first.at_s
            second_half = [s.rss_bytes for s in samples if s.cycle >= last.cycle // 2]
            steady = statistics.median(second_half)
            growth = last.rss_bytes - first.rss_bytes
            print(
                f"cycles: {last.cycle} in {last.at_s:.1f} s "
                f"({cycles / wall:.0f} cycles/s after cycle {first.cycle}); {len(samples)} samples"
            )
            print(
                f"CPU: {per_cycle * 1000:.2f} ms per cycle (user+system, cycles {first.cycle}-{last.cycle}); "
                f"{last.cpu_s:.2f} s in all"
            )
            print(f"RSS at cycle {first.cycle}: {mb(first.rss_bytes)}")
            print(f"RSS at cycle {last.cycle}: {mb(last.rss_bytes)}")
            print(f"RSS growth cycle {first.cycle} -> {last.cycle}: {growth / MB:+.2f} MB")
            print(f"RSS steady (median, cycles {last.cycle // 2}-{last.cycle}): {mb(steady)}")
            print(f"RSS max: {mb(max(s.rss_bytes for s in samples))}")
            verdict = "PASS" if growth <= 2 * MB else "FAIL"
            print(f"{verdict} against the target: growth {growth / MB:+.2f} MB <= 2 MB")
            verdict = "PASS" if steady < 60 * MB else "FAIL"
            print(f"{verdict} against the target: steady RSS {steady / MB:.1f} MB < 60 MB")
        verdict = "PASS" if proc.returncode == 0 else "FAIL"
        print(f"daemon exit code after SIGTERM: {proc.returncode} ({verdict})")


if __name__ == "__main__":
    main()
