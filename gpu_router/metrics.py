"""Prometheus metrics computed at scrape time from the last published snapshot.

A custom collector (the way prometheus-client's own process collector works): nothing is stored
in client-library metric objects, so a node or model that leaves the config leaves the metrics
with the next snapshot, and a scrape never waits on a node.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gpu_router import __version__
from gpu_router.snapshot import NODE_STATES, DaemonSnapshot, Telemetry, gpu_health, node_state_name

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Every metric family this module exports, for the tests that check dashboards and alert rules
# name only real metrics. Histograms and counters are listed by their exposed sample names too.
EXPORTED = (
    "gpu_router_build_info",
    "gpu_router_node_up",
    "gpu_router_node_state",
    "gpu_router_node_poll_seconds",
    "gpu_router_gpu_memory_total_bytes",
    "gpu_router_gpu_memory_used_bytes",
    "gpu_router_gpu_memory_free_bytes",
    "gpu_router_gpu_memory_usable_bytes",
    "gpu_router_gpu_utilization_ratio",
    "gpu_router_gpu_temperature_celsius",
    "gpu_router_gpu_healthy",
    "gpu_router_model_loaded_bytes",
    "gpu_router_model_vram_bytes",
    "gpu_router_priority_model_on_gpu",
    "gpu_router_priority_model_replicas_wanted",
    "gpu_router_priority_models",
    "gpu_router_priority_models_on_gpu",
    "gpu_router_reconciles_total",
    "gpu_router_reconcile_duration_seconds",
    "gpu_router_reconcile_duration_seconds_bucket",
    "gpu_router_reconcile_duration_seconds_sum",
    "gpu_router_reconcile_duration_seconds_count",
    "gpu_router_last_reconcile_timestamp_seconds",
    "gpu_router_start_time_seconds",
    "gpu_router_actions_in_flight",
    "gpu_router_backoffs",
    "gpu_router_pulls_in_flight",
    "gpu_router_poll_errors_total",
    "gpu_router_actions_total",
    "gpu_router_drift_events_total",
)


def snapshot_families(snap: DaemonSnapshot) -> Iterator[Metric]:
    """The gauges of one snapshot: the same for the daemon and ``--report-only --textfile``."""
    build = InfoMetricFamily("gpu_router_build", "gpu-router version running.")
    build.add_metric([], {"version": __version__})
    yield build

    configured = [n.name for n in snap.config.nodes]
    nodes = {n.name: n for n in (snap.state.nodes if snap.state else ())}
    up = GaugeMetricFamily("gpu_router_node_up", "1 when the node answered its last poll.", labels=["node"])
    states = GaugeMetricFamily(
        "gpu_router_node_state",
        "1 for the node's current state (up, degraded, down).",
        labels=["node", "state"],
    )
    poll = GaugeMetricFamily(
        "gpu_router_node_poll_seconds", "Seconds the node's last poll took.", labels=["node"]
    )
    for name in configured:
        n = nodes.get(name)
        if n is None:
            continue  # not observed yet
        current = node_state_name(n.status.value)
        up.add_metric([name], 1.0 if n.up else 0.0)
        for s in NODE_STATES:
            states.add_metric([name, s], 1.0 if s == current else 0.0)
        poll.add_metric([name], n.poll_s)
    yield up
    yield states
    yield poll

    yield from _gpu_families(snap, configured)
    yield from _model_families(snap, configured)


def _gpu_families(snap: DaemonSnapshot, configured: list[str]) -> Iterator[Metric]:
    labels = ["node", "gpu"]

    def gauge(name: str, doc: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=labels)

    total = gauge("gpu_router_gpu_memory_total_bytes", "GPU memory in all, as the GPU source reports it.")
    used = gauge("gpu_router_gpu_memory_used_bytes", "GPU memory in use (every process), where reported.")
    free = gauge("gpu_router_gpu_memory_free_bytes", "GPU memory free, where reported.")
    usable = gauge(
        "gpu_router_gpu_memory_usable_bytes",
        "GPU memory gpu-router may plan for: total x vram_safety_margin - vram_reserve_mb.",
    )
    util = gauge("gpu_router_gpu_utilization_ratio", "GPU utilization, 0 to 1, where the source has it.")
    temp = gauge("gpu_router_gpu_temperature_celsius", "GPU temperature, where the source has it.")
    healthy = gauge("gpu_router_gpu_healthy", "1 when the GPU is healthy; 0 gets it no new placement.")
    nodes = {n.name: n for n in (snap.state.nodes if snap.state else ())}
    caps = {c.node: c for c in (snap.plan.nodes if snap.plan else ())}
    for name in configured:
        n = nodes.get(name)
        if n is None:
            continue
        cap = caps.get(name)
        usable_by_index = {g.index: g.usable_bytes for g in cap.gpus} if cap is not None else {}
        for g in n.gpu.gpus:
            key = [name, str(g.index)]
            total.add_metric(key, float(g.total_bytes))
            if g.used_bytes is not None:
                used.add_metric(key, float(g.used_bytes))
            if g.free_bytes is not None:
                free.add_metric(key, float(g.free_bytes))
            if g.index in usable_by_index:
                usable.add_metric(key, float(usable_by_index[g.index]))
            h = gpu_health(g)
            if h.utilization_ratio is not None:
                util.add_metric(key, h.utilization_ratio)
            if h.temperature_c is not None:
                temp.add_metric(key, h.temperature_c)
            healthy.add_metric(key, 1.0 if h.healthy else 0.0)
    yield from (total, used, free, usable, util, temp, healthy)


def _model_families(snap: DaemonSnapshot, configured: list[str]) -> Iterator[Metric]:
    loaded = GaugeMetricFamily(
        "gpu_router_model_loaded_bytes",
        "Size of a loaded model (/api/ps size); processor is gpu, cpu or partial.",
        labels=["node", "model", "processor"],
    )
    vram = GaugeMetricFamily(
        "gpu_router_model_vram_bytes",
        "Bytes of a loaded model in VRAM (/api/ps size_vram).",
        labels=["node", "model"],
    )
    nodes = {n.name: n for n in (snap.state.nodes if snap.state else ())}
    for name in configured:
        n = nodes.get(name)
        if n is None or not n.up:
            continue
        for m in n.loaded:
            loaded.add_metric([name, m.name, m.processor.value], float(m.size_bytes))
            vram.add_metric([name, m.name], float(m.vram_bytes))
    yield loaded
    yield vram

    on_gpu = GaugeMetricFamily(
        "gpu_router_priority_model_on_gpu", "Replicas of a priority model fully on GPU.", labels=["model"]
    )
    wanted = GaugeMetricFamily(
        "gpu_router_priority_model_replicas_wanted", "Replicas wanted of a priority model.", labels=["model"]
    )
    plans = {m.model: m for m in (snap.plan.models if snap.plan else ())}
    for pm in snap.config.priority_models:
        mp = plans.get(pm.name)
        if mp is None:
            continue  # no plan yet (before the first reconcile, or just after a reload)
        on_gpu.add_metric([pm.name], float(mp.replicas_on_gpu))
        wanted.add_metric([pm.name], float(mp.replicas_wanted))
    yield on_gpu
    yield wanted
    placed, total = snap.priority_on_gpu()
    yield GaugeMetricFamily("gpu_router_priority_models", "Priority models configured.", value=float(total))
    yield GaugeMetricFamily(
        "gpu_router_priority_models_on_gpu",
        "Priority models with as many replicas fully on GPU as wanted (at least one).",
        value=float(placed),
    )


class TelemetryCollector(Collector):
    """Everything the daemon exports, from the telemetry's last snapshot and its counters."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        """Called by the registry at each scrape."""
        snap = self.telemetry.snapshot  # one read: every family below describes the same moment
        yield from snapshot_families(snap)
        yield from daemon_families(self.telemetry, snap)


def daemon_families(t: Telemetry, snap: DaemonSnapshot) -> Iterator[Metric]:
    """The daemon's own figures: reconcile count and timing, actions in flight, the counters."""
    yield CounterMetricFamily(
        "gpu_router_reconciles",
        "Reconciles started since the daemon started.",
        value=float(snap.reconciles),
    )
    buckets, total = t.reconcile_seconds.cumulative()
    yield HistogramMetricFamily(
        "gpu_router_reconcile_duration_seconds",
        "Seconds one reconcile (observe, plan, start actions) took.",
        buckets=[(_le(b), float(c)) for b, c in buckets],
        sum_value=total,
    )
    if snap.last_reconcile_at is not None:
        yield GaugeMetricFamily(
            "gpu_router_last_reconcile_timestamp_seconds",
            "Unix time the last reconcile finished.",
            value=snap.last_reconcile_at.timestamp(),
        )
    yield GaugeMetricFamily(
        "gpu_router_start_time_seconds",
        "Unix time the daemon started.",
        value=snap.started_at.timestamp(),
    )
    yield GaugeMetricFamily(
        "gpu_router_actions_in_flight",
        "Actions started and not finished.",
        value=float(len(snap.in_flight)),
    )
    yield GaugeMetricFamily(
        "gpu_router_backoffs",
        "(model, node) pairs waiting after a failed load or pull.",
        value=float(len(snap.backoffs)),
    )
    yield GaugeMetricFamily(
        "gpu_router_pulls_in_flight",
        "Pulls of missing priority models started and not finished.",
        value=float(len(snap.pulls())),
    )
    for name, doc, counter in (
        ("gpu_router_poll_errors", "Failed polls of a node, by reason.", t.poll_errors),
        ("gpu_router_actions", "Actions finished, by result (ok, failed).", t.actions),
        ("gpu_router_drift_events", "Drift seen between reconciles, by kind.", t.drift_events),
    ):
        family = CounterMetricFamily(name, doc, labels=list(counter.labelnames))
        for labels, value in counter.samples():
            family.add_metric(list(labels), value)
        yield family


class SnapshotCollector(Collector):
    """The gauges of one fixed snapshot (``--report-only --textfile``)."""

    def __init__(self, snapshot: DaemonSnapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        """Called by the registry at each scrape."""
        yield from snapshot_families(self.snapshot)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def registry_for(collector: Collector) -> CollectorRegistry:
    """A private registry holding only ``collector`` (never the process-global default one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


_PLAIN_TYPES = {"gauge": "gauge", "counter": "counter", "histogram": "histogram", "info": "gauge"}
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")
_INF = float("inf")


def _go_float(d: float) -> str:
    """A sample value as Go (and prometheus-client's floatToGoString) writes it."""
    if d == _INF:
        return "+Inf"
    if d == -_INF:
        return "-Inf"
    if d != d:  # NaN
        return "NaN"
    text = repr(float(d))
    dot = text.find(".")
    # Go switches to an exponent sooner than Python does for large positive values.
    if d > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _label_value(v: str) -> str:
    if "\\" in v or "\n" in v or '"' in v:
        return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return v


class Scraper:
    """What ``/metrics`` serves: the snapshot's gauges, rendered once per observation, plus the
    daemon's counters rendered at every scrape.

    The gauges depend only on the config, the observation and the plan, which change once a
    reconcile; counters and timings change in between. Rendering the gauges of a large cluster
    is most of a scrape's cost, so it is kept with the objects it came from and reused while
    they are the current ones. Two scrapes racing may both render; each gets a right answer.
    """

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self._cache: tuple[object, object, object, bytes] | None = None

    def scrape(self) -> bytes:
        """The text exposition of everything, as of the current snapshot."""
        snap = self.telemetry.snapshot
        return self._gauges(snap) + render_families(daemon_families(self.telemetry, snap))

    def prime(self) -> None:
        """Render the current snapshot's gauges now (the daemon calls this after a reconcile)."""
        self._gauges(self.telemetry.snapshot)

    def _gauges(self, snap: DaemonSnapshot) -> bytes:
        cached = self._cache
        if (
            cached is not None
            and cached[0] is snap.config
            and cached[1] is snap.state
            and cached[2] is snap.plan
        ):
            return cached[3]
        gauges = render_families(snapshot_families(snap))
        self._cache = (snap.config, snap.state, snap.plan, gauges)
        return gauges


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format of everything in ``registry``."""
    return render_families(registry.collect())


def render_families(metrics: Iterable[Metric]) -> bytes:
    """The text exposition format of everything in ``registry``: byte for byte what
    ``generate_latest`` writes for these families, in about 60% of the time.

    ``generate_latest`` validates and escapes every label name of every sample (about 15 us a
    sample here); these names are this module's own and known valid, so only label values are
    escaped. Anything this fast path does not know (other types, timestamps, OpenMetrics-only
    samples) goes through ``generate_latest``.
    """
    families = list(metrics)
    out: list[str] = []
    for metric in families:
        mtype = _PLAIN_TYPES.get(metric.type)
        if mtype is None:
            return generate_latest(registry_for(_Families(families)))
        mname = metric.name + (
            "_total" if metric.type == "counter" else "_info" if metric.type == "info" else ""
        )
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {mname} {doc}\n# TYPE {mname} {mtype}\n")
        for sample in metric.samples:
            if sample.timestamp is not None or sample.name.endswith(_OM_SUFFIXES):
                return generate_latest(registry_for(_Families(families)))
            if sample.labels:
                labels = ",".join(f'{k}="{_label_value(v)}"' for k, v in sorted(sample.labels.items()))
                out.append(f"{sample.name}{{{labels}}} {_go_float(sample.value)}\n")
            else:
                out.append(f"{sample.name} {_go_float(sample.value)}\n")
    return "".join(out).encode("utf-8")


def write_textfile(path: str | os.PathLike[str], snapshot: DaemonSnapshot) -> None:
    """Write the snapshot's gauges for node_exporter's textfile collector, atomically.

    The temporary file is made in the target's directory so ``os.replace`` is a rename on one
    filesystem: node_exporter never reads half a file.
    """
    target = Path(path)
    data = render(registry_for(SnapshotCollector(snapshot)))
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
