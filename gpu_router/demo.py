"""``gpu-router demo``: the real report against an emulated cluster on 127.0.0.1."""

from __future__ import annotations

import contextlib
import signal
from typing import Any, TextIO

import yaml

from gpu_router.config import Config, parse_config
from gpu_router.emulator import EmulatedCluster, demo_cluster
from gpu_router.observe import observe_once
from gpu_router.planner import plan
from gpu_router.report import build_report, render, report_tables, summary_line, write_json
from gpu_router.wakeup import Wakeup

DEMO_PRIORITY = ("nomic-embed-text:latest", "llama3.2:latest")


def demo_settings(cluster: EmulatedCluster) -> dict[str, Any]:
    """The demo's config as data: what a user would save as YAML to point gpu-router at it."""
    return cluster.config(DEMO_PRIORITY, request_timeout=2)


def demo_config(cluster: EmulatedCluster) -> Config:
    """A validated config for a started emulated cluster; the demo learns and writes nothing."""
    text = yaml.safe_dump({**demo_settings(cluster), "state_dir": "/nonexistent/gpu-router-demo"})
    return parse_config(text, "<demo>")


def run_demo(*, serve: bool, as_json: bool, out: TextIO, rich: bool) -> int:
    """Start the demo cluster, print the report (or serve until interrupted)."""
    with demo_cluster() as cluster:
        config = demo_config(cluster)
        state = observe_once(config)
        data = build_report(state, plan(state, config))
        if as_json:
            write_json(data.to_json(), out)
        else:
            render(report_tables(data), out, rich=rich, footer=summary_line(data))
        if serve:
            out.write(
                "\nThe emulated cluster is running. Save this as demo.yaml and try\n"
                "  gpu-router --config demo.yaml --report-only   or   gpu-router --config demo.yaml\n\n"
            )
            out.write(yaml.safe_dump(demo_settings(cluster), sort_keys=False))
            out.write("\nCtrl-C stops it.\n")
            out.flush()
            stop = Wakeup()  # not an Event: its lock could deadlock against the handler
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            stop.wake_on_signals()  # SIGINT too: Ctrl-C may land on an emulator thread
            with contextlib.suppress(KeyboardInterrupt):
                while not stop.wait(3600.0):
                    pass
    return 0
