"""Recovery time after an Ollama restart: how long until the priority models are fully on GPU again.

Run: .venv/bin/python bench/bench_recovery.py [--repeat 5] [--watch 1.0] [--load-delay 1.0] [--down 0]

Starts 3 emulated GPU nodes on 127.0.0.1 and the real daemon as a subprocess
(`python -m gpu_router --config CFG`, watch_interval --watch, check_interval 300 s) with two priority
models, one embedding and one chat. Once both are fully on GPU, it restarts the node(s) holding them
(every loaded model gone; with --down the port refuses for that long first) and measures, by polling
the emulator every 20 ms, the time from the restart until both are fully on GPU again, anywhere.
Target: watch_interval + load time (load delay x 2: one node may load both, one after the other)
+ down time + 1 s. A load counts as done when the daemon logs "action load ... result=ok": /api/ps lists
a model from the moment its load starts.
"""

from __future__ import annotations

import argparse
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import yaml

from gpu_router.emulator import EmulatedCluster, EmulatedNode

PRIORITY = ("nomic-embed-text:latest", "llama3.2:latest")
OTHER_MODELS = ("all-minilm:latest", "llama3.1:8b", "qwen2.5:7b")
POLL_S = 0.02
LOAD_OK = re.compile(r"action load node=\S+ model=(\S+) result=ok")


def build_cluster(load_delay_s: float) -> EmulatedCluster:
    return EmulatedCluster(
        EmulatedNode(f"gpu-{c}", (8192,), PRIORITY + OTHER_MODELS, metrics=True, load_delay_s=load_delay_s)
        for c in "abc"
    )


def write_config(cluster: EmulatedCluster, path: Path, watch_s: float, state_dir: str) -> None:
    cfg = cluster.config(
        PRIORITY,
        check_interval=300,
        watch_interval=watch_s,
        request_timeout=2,
        load_timeout=60,
        state_dir=state_dir,
        log_level="INFO",
    )
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")


def holders(cluster: EmulatedCluster, models: Sequence[str]) -> dict[str, str]:
    """model -> a node whose /api/ps shows it fully on GPU (absent: fully on GPU nowhere)."""
    out: dict[str, str] = {}
    for node in cluster:
        for entry in node.loaded():
            if entry["name"] in models and entry["size"] > 0 and entry["size_vram"] == entry["size"]:
                out.setdefault(entry["name"], node.name)
    return out


class DaemonLog:
    """The daemon's stderr, line by line with the time each arrived, copied to a file."""

    def __init__(self, stream: IO[bytes], path: Path) -> None:
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._path = path
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        with self._path.open("w", encoding="utf-8") as out:
            for raw in stream:
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                with self._lock:
                    self.lines.append((time.monotonic(), line))
                out.write(line + "\n")
                out.flush()

    def loads_ok_since(self, t0: float) -> set[str]:
        """Models whose load the daemon reported done (result=ok) after ``t0``."""
        with self._lock:
            return {m.group(1) for t, line in self.lines if t >= t0 and (m := LOAD_OK.search(line))}

    def tail(self, count: int = 15) -> str:
        with self._lock:
            return "\n".join(line for _, line in self.lines[-count:])


def wait_recovered(
    cluster: EmulatedCluster,
    proc: subprocess.Popen[bytes],
    log: DaemonLog,
    t0: float,
    limit_s: float,
) -> dict[str, str] | None:
    """Wait until every priority model is fully on GPU and its load has finished.

    /api/ps (and so the emulator) lists a model from the moment its load starts, so the daemon's
    "action load ... result=ok" line, logged after the load call returned and /api/ps confirmed it,
    marks the end of the load.
    """
    deadline = t0 + limit_s
    while time.monotonic() < deadline and proc.poll() is None:
        found = holders(cluster, PRIORITY)
        if len(found) == len(PRIORITY) and log.loads_ok_since(t0) >= set(PRIORITY):
            return found
        time.sleep(POLL_S)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--watch", type=float, default=1.0, help="watch_interval in seconds")
    ap.add_argument("--load-delay", type=float, default=1.0, help="emulated load time per model, seconds")
    ap.add_argument("--down", type=float, default=0.0, help="seconds the restarted node refuses connections")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rnd = random.Random(args.seed)

    with (
        tempfile.TemporaryDirectory(prefix="gpu-router-bench-") as tmp,
        build_cluster(args.load_delay) as cluster,
    ):
        cfg = Path(tmp) / "config.yaml"
        log_path = Path(tmp) / "daemon.log"
        write_config(cluster, cfg, args.watch, str(Path(tmp) / "state"))
        print(
            f"recovery: 3 emulated nodes x 8 GiB, priority {', '.join(PRIORITY)}, "
            f"watch_interval {args.watch:g} s, load delay {args.load_delay:g} s per model, "
            f"down {args.down:g} s"
        )
        t_spawn = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_router", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert proc.stderr is not None
        log = DaemonLog(proc.stderr, log_path)
        try:
            placed = wait_recovered(cluster, proc, log, t_spawn, 60)
            if placed is None:
                print("recovery: the priority models never got fully on GPU at start; daemon log:")
                print(log.tail())
                return
            print(
                f"initial placement (spawn to loaded, fully on GPU): {time.monotonic() - t_spawn:.2f} s "
                f"({', '.join(f'{m} on {n}' for m, n in sorted(placed.items()))})"
            )
            # Both models may land on one node, whose loads Ollama serializes.
            target = args.watch + len(PRIORITY) * args.load_delay + args.down + 1.0
            times: list[float] = []
            for i in range(args.repeat):
                # A random phase against the watch timer, as a real restart would have.
                time.sleep(0.3 + rnd.uniform(0, args.watch))
                before = holders(cluster, PRIORITY)
                victims = sorted(set(before.values()))
                t0 = time.monotonic()
                for name in victims:
                    cluster[name].restart(down_s=args.down, wait=False)
                after = wait_recovered(cluster, proc, log, t0, 60)
                elapsed = time.monotonic() - t0
                if after is None:
                    print(f"run {i + 1}: restart {', '.join(victims)}: NOT back on GPU within 60 s")
                    print(log.tail())
                    continue
                times.append(elapsed)
                where = ", ".join(f"{m} on {n}" for m, n in sorted(after.items()))
                print(
                    f"run {i + 1}: restart {', '.join(victims)}: both loaded and fully on GPU again "
                    f"in {elapsed:.2f} s ({where})"
                )
            if times:
                print(
                    f"recovery: median {statistics.median(times):.2f} s, max {max(times):.2f} s, "
                    f"best {min(times):.2f} s over {len(times)} restarts"
                )
                verdict = "PASS" if max(times) <= target and len(times) == args.repeat else "FAIL"
                print(
                    f"{verdict} against the target: max {max(times):.2f} s <= watch {args.watch:g} s + "
                    f"load {len(PRIORITY) * args.load_delay:g} s + down {args.down:g} s + 1 s = {target:g} s"
                )
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            print(f"daemon exit code after SIGTERM: {proc.returncode}")


if __name__ == "__main__":
    main()
