"""``gpu-router demo``: the real report against an emulated cluster on 127.0.0.1."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import TextIO

from gpu_router.config import Config, GpuSpec, NodeConfig, PriorityModel
from gpu_router.emulator import EmulatedCluster, demo_cluster
from gpu_router.observe import observe_once
from gpu_router.planner import plan
from gpu_router.report import build_report, render, report_tables, summary_line, write_json
from gpu_router.state import MIB

DEMO_PRIORITY = ("nomic-embed-text:latest", "llama3.2:latest")


def demo_config(cluster: EmulatedCluster) -> Config:
    """A config that points at a started emulated cluster."""
    nodes = []
    for n in cluster.nodes:
        if not n.gpus_mib:
            gpu = GpuSpec("none")
        elif n.metrics:
            gpu = GpuSpec("exporter", exporter_url=n.metrics_url)
        else:
            gpu = GpuSpec("static", vram_bytes=tuple(m * MIB for m in n.gpus_mib))
        nodes.append(NodeConfig(name=n.name, url=n.url, gpu=gpu))
    return Config(
        nodes=tuple(nodes),
        priority_models=tuple(PriorityModel(m) for m in DEMO_PRIORITY),
        request_timeout_s=2.0,
        path="<demo>",
        state_dir="/nonexistent/gpu-router-demo",  # the demo learns nothing and writes nothing
    )


def config_yaml(config: Config) -> str:
    """The demo config as YAML a user can save and pass to --config."""
    lines = ["nodes:"]
    for n in config.nodes:
        lines.append(f"  - url: {n.url}")
        lines.append(f"    name: {n.name}")
        if n.gpu.kind == "none":
            lines.append("    gpu: none")
        elif n.gpu.kind == "exporter":
            lines.append(f"    gpu: {{exporter: {n.gpu.exporter_url}}}")
        elif n.gpu.kind == "static":
            lines.append(f"    gpu: {{vram_mb: {[b // MIB for b in n.gpu.vram_bytes]}}}")
    lines.append("priority_models:")
    lines += [f"  - {p.name}" for p in config.priority_models]
    lines.append("request_timeout: 2")
    return "\n".join(lines) + "\n"


def run_demo(*, serve: bool, as_json: bool, out: TextIO, rich: bool) -> int:
    """Start the demo cluster, print the report (or serve until interrupted)."""
    with demo_cluster() as cluster:
        config = demo_config(cluster)
        state = observe_once(config)
        data = build_report(state, plan(state, config))
        if as_json:
            write_json(data, out)
        else:
            render(report_tables(data), out, rich=rich, footer=summary_line(data))
        if serve:
            out.write(
                "\nThe emulated cluster is running. Save this as demo.yaml and try\n"
                "  gpu-router --config demo.yaml --report-only   or   gpu-router --config demo.yaml\n\n"
            )
            out.write(config_yaml(config))
            out.write("\nCtrl-C stops it.\n")
            out.flush()
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            with contextlib.suppress(KeyboardInterrupt):
                stop.wait()
    return 0
