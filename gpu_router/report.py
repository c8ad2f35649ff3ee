"""The report: built as plain data from (state, plan), then rendered.

``build_report`` gives one JSON-ready dict, the single source of every rendering: rich tables on
a terminal, aligned plain text in a pipe, or the dict itself as JSON for scripts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from gpu_router import __version__
from gpu_router.gpus.kinds import source_label
from gpu_router.planner import Fit, ModelPlan, Plan, Verdict, is_pinned, priority_on_gpu
from gpu_router.state import GIB, MIB, ClusterState

Json = dict[str, Any]


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts is not None else None


def _fit_json(f: Fit, m: ModelPlan) -> Json:
    need = m.need_on(f.node)
    return {
        "node": f.node,
        "fits": f.fits,
        "verdict": f.verdict.value,
        "reason": f.reason,
        "gpus": list(f.gpus),
        "evict": list(f.evict),
        "need_bytes": need.need_bytes,
        "size_source": need.source.value,
        "context_length": need.context_length,
        "era": need.era,
    }


def _model_json(m: ModelPlan, state: ClusterState) -> Json:
    installed = {}
    for n in state.nodes:
        inst = n.installed_model(m.model)
        if inst is not None:
            installed[n.name] = inst.size_bytes
    info = state.model_info(m.model)
    out: Json = {
        "model": m.model,
        "priority": m.priority,
        "need_bytes": m.need.need_bytes,
        "size_source": m.need.source.value,
        "size_detail": m.need.detail,
        "context_length": m.need.context_length,
        "capabilities": list(info.capabilities) if info else None,
        "file_bytes": max(installed.values()) if installed else None,
        "installed_on": sorted(installed),
        "decision": {
            "placement": m.decision.placement.value,
            "node": m.decision.node,
            "nodes": list(m.decision.nodes),
            "reason": m.decision.reason,
        },
        "era": m.need.era,
        "fits": [_fit_json(f, m) for f in m.fits],
    }
    if m.priority:
        out["replicas_wanted"] = m.replicas_wanted
        out["replicas_on_gpu"] = m.replicas_on_gpu
    return out


def build_report(state: ClusterState, plan: Plan) -> Json:
    """Everything the report shows, as JSON-ready data."""
    caps = {c.node: c for c in plan.nodes}
    nodes = []
    for n in state.nodes:
        cap = caps[n.name]
        usable = {g.index: g for g in cap.gpus}
        nodes.append(
            {
                "name": n.name,
                "url": n.url,
                "status": n.status.value,
                "error": n.error,
                "version": n.version,
                "vram_source": n.gpu.source.value,
                "vram_source_detail": source_label(n.gpu.source, n.gpu.detail),
                "vram_error": n.gpu.error,
                "gpus": [
                    {
                        "index": g.index,
                        "name": g.name,
                        "uuid": g.uuid,
                        "total_bytes": g.total_bytes,
                        "used_bytes": g.used_bytes,
                        "free_bytes": g.free_bytes,
                        "usable_bytes": usable[g.index].usable_bytes if g.index in usable else None,
                        "pci_bus_id": g.pci_bus_id,
                        "integrated": g.integrated,
                        "utilization_ratio": g.utilization_ratio,
                        "temperature_c": g.temperature_c,
                        "healthy": g.healthy,
                        "health_reason": g.health_reason,
                    }
                    for g in n.gpu.gpus
                ],
                "usable_vram_bytes": cap.usable_bytes,
                "free_vram_bytes": cap.free_bytes,
                "loaded": [
                    {
                        "model": m.name,
                        "size_bytes": m.size_bytes,
                        "vram_bytes": m.vram_bytes,
                        "processor": m.processor.value,
                        "processor_label": m.processor_label,
                        "context_length": m.context_length,
                        "expires_at": _iso(m.expires_at),
                        "pinned": is_pinned(m, state.observed_at),
                    }
                    for m in n.loaded
                ],
                "installed": [m.name for m in n.installed],
                "poll_s": round(n.poll_s, 4),
            }
        )
    models = [_model_json(m, state) for m in plan.models]
    on_gpu, priority = priority_on_gpu(plan)
    return {
        "version": __version__,
        "observed_at": _iso(state.observed_at),
        "summary": {
            "nodes": len(state.nodes),
            "nodes_up": sum(1 for n in state.nodes if n.up),
            "nodes_down": [n.name for n in state.nodes if not n.up],
            "priority_models": priority,
            "priority_models_on_gpu": on_gpu,
        },
        "nodes": nodes,
        "models": models,
        "actions": [
            {
                "action": a.kind.value,
                "node": a.node,
                "model": a.model,
                "reason": a.reason,
                "endpoint": ("/api/embed" if a.embedding else "/api/generate")
                if a.kind.value == "load"
                else "/api/generate",
            }
            for a in plan.actions
        ],
    }


# Rendering


def gib(n: int | None) -> str:
    """Bytes as GiB with one decimal, or '?' when unknown."""
    if n is None:
        return "?"
    if n < GIB:
        return f"{n / MIB:.0f} MiB"
    return f"{n / GIB:.1f} GiB"


@dataclass(frozen=True)
class Table:
    """A titled table of strings, rendered by rich or as plain text."""

    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""


_VERDICT_SHORT = {
    Verdict.RESIDENT.value: "on GPU",
    Verdict.FITS.value: "fits",
    Verdict.FITS_AFTER_EVICTION.value: "fits*",
    Verdict.NO_ROOM.value: "no room",
    Verdict.TOO_LARGE.value: "too large",
    Verdict.NO_GPU.value: "no GPU",
    Verdict.VRAM_UNKNOWN.value: "VRAM ?",
    Verdict.SIZE_UNKNOWN.value: "size ?",
    Verdict.NOT_INSTALLED.value: "-",
    Verdict.NOT_ALLOWED.value: "excluded",
    Verdict.NODE_DOWN.value: "down",
    Verdict.BACKOFF.value: "backoff",
    Verdict.UNCLEAR.value: "unclear",
    Verdict.GPU_UNHEALTHY.value: "GPU sick",
}

MATRIX_MAX_NODES = 8


def _gpu_cell(g: Json) -> str:
    """``0: NVIDIA L4 22.5 GiB (37% busy, 61 C)``; an unhealthy GPU says so and why."""
    size = "?" if not g["healthy"] and not g["total_bytes"] else gib(g["total_bytes"])
    extras = []
    if not g["healthy"]:
        extras.append(f"UNHEALTHY: {g['health_reason'] or 'no reason given'}")
    if g["integrated"]:
        extras.append("integrated")
    if g["utilization_ratio"] is not None:
        extras.append(f"{g['utilization_ratio'] * 100:.0f}% busy")
    if g["temperature_c"] is not None:
        extras.append(f"{g['temperature_c']:.0f} C")
    return f"{g['index']}: {g['name']} {size}" + (f" ({', '.join(extras)})" if extras else "")


def node_tables(report: Json) -> list[Table]:
    """The nodes, their GPUs and what is loaded on them."""
    rows = []
    for n in report["nodes"]:
        if n["status"] != "up":
            gpus = "-"
        elif n["gpus"]:
            gpus = "; ".join(_gpu_cell(g) for g in n["gpus"])
        else:
            gpus = "none" if n["vram_source"] == "none" else f"unknown ({n['vram_error'] or 'no source'})"
        rows.append(
            (
                n["name"],
                n["status"] if n["status"] == "up" else f"{n['status']}: {n['error']}",
                n["vram_source_detail"],
                gpus,
                gib(n["usable_vram_bytes"]) if n["vram_source"] != "none" else "-",
                gib(n["free_vram_bytes"]) if n["vram_source"] != "none" else "-",
                str(len(n["loaded"])) if n["status"] == "up" else "-",
            )
        )
    nodes = Table("Nodes", ("NODE", "STATUS", "SOURCE", "GPUS", "USABLE", "FREE", "LOADED"), tuple(rows))
    loaded = []
    for n in report["nodes"]:
        for m in n["loaded"]:
            until = "forever" if m["pinned"] else (m["expires_at"] or "?")[:19].replace("T", " ")
            loaded.append(
                (
                    n["name"],
                    m["model"],
                    gib(m["size_bytes"]),
                    m["processor_label"],
                    str(m["context_length"] or "-"),
                    until,
                )
            )
    tables = [nodes]
    if loaded:
        tables.append(
            Table("Loaded models", ("NODE", "MODEL", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"), tuple(loaded))
        )
    return tables


def model_table(report: Json, models: Sequence[Json] | None = None) -> Table:
    """One row per model: need, source, decision; a verdict column per node in small clusters."""
    models = report["models"] if models is None else models
    node_names = [n["name"] for n in report["nodes"]]
    matrix = len(node_names) <= MATRIX_MAX_NODES
    headers = ["MODEL", "PRIO", "NEEDS", "SOURCE", "DECISION"]
    if matrix:
        headers += node_names
    headers.append("REASON")
    rows = []
    for m in models:
        d = m["decision"]
        where = d["placement"].upper() + (f" {','.join(d['nodes'])}" if d["nodes"] else "")
        row = [m["model"], "yes" if m["priority"] else "", gib(m["need_bytes"]), m["size_source"], where]
        if matrix:
            by_node = {f["node"]: f for f in m["fits"]}
            row += [_VERDICT_SHORT.get(by_node[n]["verdict"], by_node[n]["verdict"]) for n in node_names]
        row.append(d["reason"])
        rows.append(tuple(row))
    note = "fits* = fits after unloading models that policy allows" if matrix else ""
    return Table("Models", tuple(headers), tuple(rows), note)


def action_table(report: Json, title: str = "Actions the daemon would take") -> Table | None:
    """What acting on the plan would send, or None when nothing."""
    if not report["actions"]:
        return None
    rows = tuple((a["node"], a["action"], a["model"], a["endpoint"], a["reason"]) for a in report["actions"])
    return Table(title, ("NODE", "ACTION", "MODEL", "VIA", "REASON"), rows)


def summary_line(report: Json) -> str:
    """One line: what ``systemctl status`` and the report's footer say."""
    s = report["summary"]
    parts = [f"{s['nodes_up']}/{s['nodes']} nodes up"]
    if s["priority_models"]:
        parts.append(f"{s['priority_models_on_gpu']}/{s['priority_models']} priority models on GPU")
    if s["nodes_down"]:
        parts.append("down: " + ", ".join(s["nodes_down"]))
    return ", ".join(parts)


def report_tables(report: Json) -> list[Table]:
    """Every table of the full report, in order."""
    tables = [*node_tables(report), model_table(report)]
    actions = action_table(report)
    if actions is not None:
        tables.append(actions)
    return tables


def render_plain(tables: Sequence[Table], out: TextIO, footer: str = "") -> None:
    """Aligned columns, no colour or box characters: for pipes, grep and logs."""
    for i, t in enumerate(tables):
        if i:
            out.write("\n")
        out.write(f"{t.title}\n")
        widths = [len(h) for h in t.headers]
        for row in t.rows:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
        for row in (t.headers, *t.rows):
            cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
            out.write("  ".join(cells).rstrip() + "\n")
        if t.note:
            out.write(f"({t.note})\n")
    if footer:
        out.write(f"\n{footer}\n")


def render_rich(tables: Sequence[Table], out: TextIO, footer: str = "") -> None:
    """rich tables for a terminal."""
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console(file=out)
    styles = {
        "on GPU": "green",
        "fits": "green",
        "fits*": "yellow",
        "no room": "yellow",
        "down": "red",
        "too large": "red",
        "GPU": "green",
        "CPU": "red",
        "NONE": "red",
    }
    for t in tables:
        rt = RichTable(title=t.title, title_justify="left", caption=t.note or None, caption_justify="left")
        for h in t.headers:
            rt.add_column(h, overflow="fold")
        for row in t.rows:
            rt.add_row(*(_styled(c, styles) for c in row))
        console.print(rt)
    if footer:
        console.print(footer)


def _styled(cell: str, styles: dict[str, str]) -> str:
    from rich.markup import escape

    first = cell.split(" ", 1)[0]
    style = styles.get(cell) or styles.get(first)
    if cell.startswith(("down:", "error:")):
        style = "red"
    text = escape(cell)
    return f"[{style}]{text}[/]" if style else text


def render(tables: Sequence[Table], out: TextIO, *, rich: bool, footer: str = "") -> None:
    """Render for a terminal (rich) or a pipe (plain)."""
    if rich:
        render_rich(tables, out, footer)
    else:
        render_plain(tables, out, footer)


def write_json(data: Json, out: TextIO) -> None:
    """The report as one JSON document on ``out``."""
    # One write: json.dump with an indent writes every token separately (a third slower at 500 nodes).
    out.write(json.dumps(data, indent=2) + "\n")
