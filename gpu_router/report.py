"""The report: built once as typed data from (state, plan), then rendered.

:func:`build_report` gives a :class:`Report` of frozen records, the single source of every
rendering: rich tables on a terminal, aligned plain text in a pipe, or :meth:`Report.to_json` for
scripts (the ``--json`` contract). ``route``, ``check``, ``models`` and ``explain`` read it typed;
``status`` turns the daemon's JSON back into the same records with :meth:`Report.from_json`.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

from gpu_router import __version__, records
from gpu_router.gpus.kinds import source_label
from gpu_router.planner import ActionKind, Fit, ModelPlan, Plan, Verdict, is_pinned, priority_on_gpu
from gpu_router.records import record
from gpu_router.state import GIB, MIB, ClusterState

Json = dict[str, Any]


@record
class GpuRow:
    """One GPU of a node."""

    index: int
    name: str
    uuid: str
    total_bytes: int
    used_bytes: int | None
    free_bytes: int | None
    usable_bytes: int | None
    pci_bus_id: str = ""
    integrated: bool = False
    utilization_ratio: float | None = None
    temperature_c: float | None = None
    healthy: bool = True
    health_reason: str = ""


@record
class LoadedRow:
    """One /api/ps entry of a node."""

    model: str
    size_bytes: int
    vram_bytes: int
    processor: str
    processor_label: str
    context_length: int | None
    expires_at: datetime | None
    pinned: bool


@record
class NodeRow:
    """One node: its state, its GPUs, what is loaded and installed."""

    name: str
    url: str
    status: str
    error: str | None
    version: str | None
    vram_source: str
    vram_source_detail: str
    vram_error: str | None
    gpus: tuple[GpuRow, ...]
    usable_vram_bytes: int | None
    free_vram_bytes: int | None
    loaded: tuple[LoadedRow, ...]
    installed: tuple[str, ...]
    poll_s: float


@record
class FitRow:
    """One node's verdict on one model, with the need there."""

    node: str
    fits: bool
    verdict: str
    reason: str
    gpus: tuple[int, ...]
    evict: tuple[str, ...]
    need_bytes: int | None
    size_source: str
    context_length: int | None
    era: str | None


@record
class DecisionRow:
    """Where a model should run and why."""

    placement: str
    node: str | None
    nodes: tuple[str, ...]
    reason: str


@record
class ModelRow:
    """Everything decided about one model."""

    model: str
    priority: bool
    need_bytes: int | None
    size_source: str
    size_detail: str
    context_length: int | None
    capabilities: tuple[str, ...] | None
    file_bytes: int | None
    installed_on: tuple[str, ...]
    decision: DecisionRow
    era: str | None
    fits: tuple[FitRow, ...]
    replicas_wanted: int | None = None  # priority models only (absent from the JSON otherwise)
    replicas_on_gpu: int | None = None

    def fit(self, node: str) -> FitRow | None:
        """The verdict of ``node``."""
        return next((f for f in self.fits if f.node == node), None)


@record
class ActionRow:
    """One request acting on the plan would send."""

    action: str
    node: str
    model: str
    reason: str
    endpoint: str


@record
class Summary:
    """The counts of the report's footer and of ``systemctl status``."""

    nodes: int
    nodes_up: int
    nodes_down: tuple[str, ...]
    priority_models: int
    priority_models_on_gpu: int


@record
class Report:
    """The whole report, typed."""

    version: str
    observed_at: datetime | None
    summary: Summary
    nodes: tuple[NodeRow, ...]
    models: tuple[ModelRow, ...]
    actions: tuple[ActionRow, ...]

    def model(self, name: str) -> ModelRow | None:
        """The row of ``name``."""
        return next((m for m in self.models if m.model == name), None)

    def node(self, name: str) -> NodeRow | None:
        """The row of node ``name``."""
        return next((n for n in self.nodes if n.name == name), None)

    def to_json(self) -> Json:
        """The ``--json`` document."""
        out = _to_json(self)
        assert isinstance(out, dict)
        return out

    @classmethod
    def from_json(cls, data: Json) -> Report:
        """The records back from :meth:`to_json`'s document (the daemon's ``/api/v1/status``).

        Raises ValueError when the document does not have the report's shape.
        """
        try:
            out = _from_json(cls, data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a gpu-router report: {exc}") from None
        assert isinstance(out, Report)
        return out


def to_json(row: object) -> Json:
    """One record (a model row, say) as its part of the ``--json`` document."""
    out = _to_json(row)
    assert isinstance(out, dict)
    return out


_ATOMS = frozenset({str, int, float, bool, type(None)})
_PRIORITY_ONLY = frozenset({"replicas_wanted", "replicas_on_gpu"})


def _to_json(value: object) -> object:
    cls = type(value)
    if cls in _ATOMS:
        return value
    names = records.field_names(cls)
    if names is None:
        if isinstance(value, tuple):
            return [_to_json(v) for v in value]
        if isinstance(value, datetime):
            return value.isoformat()
        return value
    out = {}
    for name in names:
        v = getattr(value, name)
        if v is None and name in _PRIORITY_ONLY:
            continue  # only priority models have them
        out[name] = v if type(v) in _ATOMS else _to_json(v)
    return out


def _from_json(hint: Any, data: object) -> object:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _from_json(inner, data)
    if origin is tuple:
        if not isinstance(data, list):
            raise TypeError(f"expected a list, got {type(data).__name__}")
        return tuple(_from_json(args[0], v) for v in data)
    if records.is_record(hint) and isinstance(hint, type):
        if not isinstance(data, dict):
            raise TypeError(f"expected an object for {hint.__name__}, got {type(data).__name__}")
        hints = typing.get_type_hints(hint)
        fields = {f.name: f for f in records.fields(hint)}
        kwargs = {}
        for name, f in fields.items():
            if name in data:
                kwargs[name] = _from_json(hints[name], data[name])
            elif f.default is records.MISSING:
                raise KeyError(f"{hint.__name__}.{name}")
        return hint(**kwargs)
    if hint is datetime:
        if not isinstance(data, str):
            raise TypeError("expected a timestamp")
        return datetime.fromisoformat(data)
    if hint is float and isinstance(data, int) and not isinstance(data, bool):
        return float(data)
    if isinstance(hint, type) and not isinstance(data, hint):
        raise TypeError(f"expected {hint.__name__}, got {type(data).__name__}")
    return data


def _fit_row(f: Fit, m: ModelPlan) -> FitRow:
    need = m.need_on(f.node)
    return FitRow(
        node=f.node,
        fits=f.fits,
        verdict=f.verdict.value,
        reason=f.reason,
        gpus=tuple(f.gpus),
        evict=tuple(f.evict),
        need_bytes=need.need_bytes,
        size_source=need.source.value,
        context_length=need.context_length,
        era=need.era,
    )


def _model_row(m: ModelPlan, state: ClusterState) -> ModelRow:
    installed = {}
    for n in state.nodes:
        inst = n.installed_model(m.model)
        if inst is not None:
            installed[n.name] = inst.size_bytes
    info = state.model_info(m.model)
    d = m.decision
    return ModelRow(
        model=m.model,
        priority=m.priority,
        need_bytes=m.need.need_bytes,
        size_source=m.need.source.value,
        size_detail=m.need.detail,
        context_length=m.need.context_length,
        capabilities=tuple(info.capabilities) if info else None,
        file_bytes=max(installed.values()) if installed else None,
        installed_on=tuple(sorted(installed)),
        decision=DecisionRow(d.placement.value, d.node, tuple(d.nodes), d.reason),
        era=m.need.era,
        fits=tuple(_fit_row(f, m) for f in m.fits),
        replicas_wanted=m.replicas_wanted if m.priority else None,
        replicas_on_gpu=m.replicas_on_gpu if m.priority else None,
    )


def _node_row(n: Any, cap: Any, observed_at: datetime | None) -> NodeRow:
    usable = {g.index: g for g in cap.gpus}
    return NodeRow(
        name=n.name,
        url=n.url,
        status=n.status.value,
        error=n.error,
        version=n.version,
        vram_source=n.gpu.source.value,
        vram_source_detail=source_label(n.gpu.source, n.gpu.detail),
        vram_error=n.gpu.error,
        gpus=tuple(
            GpuRow(
                index=g.index,
                name=g.name,
                uuid=g.uuid,
                total_bytes=g.total_bytes,
                used_bytes=g.used_bytes,
                free_bytes=g.free_bytes,
                usable_bytes=usable[g.index].usable_bytes if g.index in usable else None,
                pci_bus_id=g.pci_bus_id,
                integrated=g.integrated,
                utilization_ratio=g.utilization_ratio,
                temperature_c=g.temperature_c,
                healthy=g.healthy,
                health_reason=g.health_reason,
            )
            for g in n.gpu.gpus
        ),
        usable_vram_bytes=cap.usable_bytes,
        free_vram_bytes=cap.free_bytes,
        loaded=tuple(
            LoadedRow(
                model=m.name,
                size_bytes=m.size_bytes,
                vram_bytes=m.vram_bytes,
                processor=m.processor.value,
                processor_label=m.processor_label,
                context_length=m.context_length,
                expires_at=m.expires_at,
                pinned=is_pinned(m, observed_at),
            )
            for m in n.loaded
        ),
        installed=tuple(m.name for m in n.installed),
        poll_s=round(n.poll_s, 4),
    )


def _endpoint(kind: ActionKind, embedding: bool) -> str:
    if kind is ActionKind.PULL:
        return "/api/pull"
    if kind is ActionKind.UNLOAD:
        return "/api/generate"
    return "/api/embed" if embedding else "/api/generate"


def build_report(state: ClusterState, plan: Plan) -> Report:
    """Everything the report shows, typed."""
    caps = {c.node: c for c in plan.nodes}
    on_gpu, priority = priority_on_gpu(plan)
    return Report(
        version=__version__,
        observed_at=state.observed_at,
        summary=Summary(
            nodes=len(state.nodes),
            nodes_up=sum(1 for n in state.nodes if n.up),
            nodes_down=tuple(n.name for n in state.nodes if not n.up),
            priority_models=priority,
            priority_models_on_gpu=on_gpu,
        ),
        nodes=tuple(_node_row(n, caps[n.name], state.observed_at) for n in state.nodes),
        models=tuple(_model_row(m, state) for m in plan.models),
        actions=tuple(
            ActionRow(a.kind.value, a.node, a.model, a.reason, _endpoint(a.kind, a.embedding))
            for a in plan.actions
        ),
    )


# Rendering


def gib(n: int | None) -> str:
    """Bytes as GiB with one decimal, or '?' when unknown."""
    if n is None:
        return "?"
    if n < GIB:
        return f"{n / MIB:.0f} MiB"
    return f"{n / GIB:.1f} GiB"


@record
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
    Verdict.PULL.value: "would pull",
    Verdict.PULLING.value: "pulling",
}

MATRIX_MAX_NODES = 8


def _gpu_cell(g: GpuRow) -> str:
    """``0: NVIDIA L4 22.5 GiB (37% busy, 61 C)``; an unhealthy GPU says so and why."""
    size = "?" if not g.healthy and not g.total_bytes else gib(g.total_bytes)
    extras = []
    if not g.healthy:
        extras.append(f"UNHEALTHY: {g.health_reason or 'no reason given'}")
    if g.integrated:
        extras.append("integrated")
    if g.utilization_ratio is not None:
        extras.append(f"{g.utilization_ratio * 100:.0f}% busy")
    if g.temperature_c is not None:
        extras.append(f"{g.temperature_c:.0f} C")
    return f"{g.index}: {g.name} {size}" + (f" ({', '.join(extras)})" if extras else "")


def node_tables(report: Report) -> list[Table]:
    """The nodes, their GPUs and what is loaded on them."""
    rows = []
    for n in report.nodes:
        if n.status != "up":
            gpus = "-"
        elif n.gpus:
            gpus = "; ".join(_gpu_cell(g) for g in n.gpus)
        else:
            gpus = "none" if n.vram_source == "none" else f"unknown ({n.vram_error or 'no source'})"
        rows.append(
            (
                n.name,
                n.status if n.status == "up" else f"{n.status}: {n.error}",
                n.vram_source_detail,
                gpus,
                gib(n.usable_vram_bytes) if n.vram_source != "none" else "-",
                gib(n.free_vram_bytes) if n.vram_source != "none" else "-",
                str(len(n.loaded)) if n.status == "up" else "-",
            )
        )
    nodes = Table("Nodes", ("NODE", "STATUS", "SOURCE", "GPUS", "USABLE", "FREE", "LOADED"), tuple(rows))
    loaded = []
    for n in report.nodes:
        for m in n.loaded:
            until = (
                "forever"
                if m.pinned
                else (m.expires_at.isoformat() if m.expires_at else "?")[:19].replace("T", " ")
            )
            loaded.append(
                (n.name, m.model, gib(m.size_bytes), m.processor_label, str(m.context_length or "-"), until)
            )
    tables = [nodes]
    if loaded:
        tables.append(
            Table("Loaded models", ("NODE", "MODEL", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"), tuple(loaded))
        )
    return tables


def model_table(report: Report, models: Sequence[ModelRow] | None = None) -> Table:
    """One row per model: need, source, decision; a verdict column per node in small clusters."""
    rows_of = report.models if models is None else models
    node_names = [n.name for n in report.nodes]
    matrix = len(node_names) <= MATRIX_MAX_NODES
    headers = ["MODEL", "PRIO", "NEEDS", "SOURCE", "DECISION"]
    if matrix:
        headers += node_names
    headers.append("REASON")
    rows = []
    for m in rows_of:
        d = m.decision
        where = d.placement.upper() + (f" {','.join(d.nodes)}" if d.nodes else "")
        row = [m.model, "yes" if m.priority else "", gib(m.need_bytes), m.size_source, where]
        if matrix:
            by_node = {f.node: f for f in m.fits}
            row += [
                _VERDICT_SHORT.get(by_node[n].verdict, by_node[n].verdict) if n in by_node else "?"
                for n in node_names
            ]
        row.append(d.reason)
        rows.append(tuple(row))
    note = "fits* = fits after unloading models that policy allows" if matrix else ""
    return Table("Models", tuple(headers), tuple(rows), note)


def action_table(report: Report, title: str = "Actions the daemon would take") -> Table | None:
    """What acting on the plan would send, or None when nothing."""
    if not report.actions:
        return None
    rows = tuple((a.node, a.action, a.model, a.endpoint, a.reason) for a in report.actions)
    return Table(title, ("NODE", "ACTION", "MODEL", "VIA", "REASON"), rows)


def summary_line(report: Report) -> str:
    """One line: what ``systemctl status`` and the report's footer say."""
    s = report.summary
    parts = [f"{s.nodes_up}/{s.nodes} nodes up"]
    if s.priority_models:
        parts.append(f"{s.priority_models_on_gpu}/{s.priority_models} priority models on GPU")
    if s.nodes_down:
        parts.append("down: " + ", ".join(s.nodes_down))
    return ", ".join(parts)


def report_tables(report: Report) -> list[Table]:
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
    """The report as one JSON document on ``out``: each top-level key on a line of its own, and each
    record of a top-level list (a node, a model, an action) on one line of its own.

    A record per line reads well in a pager and in ``grep``, and it is encoded by the C encoder:
    ``json.dumps`` with an indent runs the pure-Python one (0.11 s against 0.02 s at 500 nodes).
    """
    encode = _JSON_LINE.encode
    lines = ["{"]
    for i, (key, value) in enumerate(data.items()):
        comma = "," if i < len(data) - 1 else ""
        if isinstance(value, list) and value:
            records = ",\n".join("    " + encode(v) for v in value)
            lines.append(f"  {encode(key)}: [\n{records}\n  ]{comma}")
        else:
            lines.append(f"  {encode(key)}: {encode(value)}{comma}")
    lines.append("}")
    out.write("\n".join(lines) + "\n")  # one write: a pipe's reader sees the whole document at once


_JSON_LINE = json.JSONEncoder(separators=(", ", ": "))
