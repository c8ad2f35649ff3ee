"""``python -m gpu_router.emulator``: run emulated Ollama nodes on loopback until SIGINT/SIGTERM.

Without options it runs :func:`demo_cluster`; ``--nodes N`` runs N plain single-GPU nodes instead
(for load tests), as the Ollama of ``--ollama-version`` with ``--env OLLAMA_...=VALUE`` settings.
``--write-config PATH`` writes a gpu-router YAML config that points at them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

import yaml

from gpu_router.emulator.catalogue import EmulatorError
from gpu_router.emulator.cluster import DEMO_PRIORITY_MODELS, EmulatedCluster, demo_cluster
from gpu_router.emulator.node import EmulatedNode
from gpu_router.wakeup import Wakeup

LOAD_TEST_MODELS = (
    "nomic-embed-text:latest",
    "all-minilm:latest",
    "llama3.2:latest",
    "llama3.1:8b",
    "qwen2.5:7b",
)
LOAD_TEST_PRIORITY = ("nomic-embed-text:latest", "llama3.2:latest")


def load_test_cluster(
    count: int,
    *,
    port_base: int = 0,
    gpu_mib: int = 8192,
    load_delay_s: float = 0.0,
    version: str = "0.12.6",
    env: Mapping[str, str] | None = None,
) -> EmulatedCluster:
    """``count`` identical nodes ``node-1``.. with one GPU each, metrics on, nothing loaded.

    With ``port_base`` node *i* listens on ``port_base + i`` and its exporter on ``port_base + count + i``.
    """
    nodes = [
        EmulatedNode(
            f"node-{i + 1}",
            (gpu_mib,),
            LOAD_TEST_MODELS,
            metrics=True,
            load_delay_s=load_delay_s,
            port=port_base + i if port_base > 0 else 0,
            metrics_port=port_base + count + i if port_base > 0 else 0,
            version=version,
            env=env,
        )
        for i in range(count)
    ]
    return EmulatedCluster(nodes)


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("OLLAMA_"):
        raise argparse.ArgumentTypeError(f"{text!r} is not OLLAMA_NAME=VALUE")
    return key, value


def write_config(path: str, config: dict[str, Any]) -> None:
    """Write ``config`` as YAML atomically (temp file + rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".gpu-router-", suffix=".yaml", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("# written by python -m gpu_router.emulator\n")
            yaml.safe_dump(config, f, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpu_router.emulator", description=__doc__.splitlines()[0])
    p.add_argument(
        "--nodes", type=int, default=0, metavar="N", help="run N plain GPU nodes instead of the demo"
    )
    p.add_argument(
        "--port-base", type=int, default=0, metavar="P", help="node i listens on P+i (default: any)"
    )
    p.add_argument("--gpu-mib", type=int, default=8192, help="GPU size of each --nodes node (default 8192)")
    p.add_argument("--load-delay", type=float, default=0.0, metavar="S", help="seconds each model load takes")
    p.add_argument(
        "--ollama-version",
        default="0.12.6",
        metavar="V",
        help="the Ollama each --nodes node is (default 0.12.6)",
    )
    p.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="OLLAMA_X=V",
        help="an OLLAMA_* setting of the --nodes nodes (repeatable)",
    )
    p.add_argument("--write-config", metavar="PATH", help="write a gpu-router YAML config for these nodes")
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run until SIGINT or SIGTERM; 0 on a clean stop, 1 when the nodes cannot start, 2 on bad usage."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if args.nodes < 0 or not 0 <= args.port_base < 65536 or args.gpu_mib <= 0 or args.load_delay < 0:
        print("error: --nodes, --port-base, --gpu-mib and --load-delay must not be negative", file=sys.stderr)
        return 2
    try:
        if args.nodes:
            cluster = load_test_cluster(
                args.nodes,
                port_base=args.port_base,
                gpu_mib=args.gpu_mib,
                load_delay_s=args.load_delay,
                version=args.ollama_version,
                env=dict(args.env),
            )
            priority: Sequence[str] = LOAD_TEST_PRIORITY
        else:
            cluster = demo_cluster(port_base=args.port_base, load_delay_s=args.load_delay)
            priority = DEMO_PRIORITY_MODELS
        cluster.start()
    except EmulatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stop = Wakeup()  # not an Event: its lock could deadlock against the handler

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stop.wake_on_signals()
    try:
        for n in cluster:
            gpus = "+".join(f"{m}MiB" for m in n.gpus_mib) or "no GPU"
            metrics = f" metrics={n.metrics_url}" if n.metrics else ""
            print(f"{n.name} {n.url} gpus={gpus}{metrics}", flush=True)
        if args.write_config:
            try:
                write_config(args.write_config, cluster.config(priority))
            except OSError as exc:
                print(f"error: cannot write {args.write_config}: {exc}", file=sys.stderr)
                return 1
            print(f"config written to {args.write_config}", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
