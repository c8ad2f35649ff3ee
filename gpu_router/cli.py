"""Command line: the daemon, the one-shot report, and the inspection sub-commands.

Exit codes: 0 ok, 1 other failure, 2 usage, 78 bad configuration (EX_CONFIG). ``status`` says 0
when every priority model is on GPU, 1 when some are not, and 3 when no daemon answers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from gpu_router import __version__

# Only argparse is imported here: --help and --version exit while the arguments are parsed and load
# nothing else; --check-config loads the config module (and YAML) alone, never an HTTP client, rich,
# psutil or NVML. Commands import what they use.
if TYPE_CHECKING:
    from gpu_router.config import Config
    from gpu_router.report import Json, ModelRow, Report, Table
    from gpu_router.state import ClusterState

EX_OK, EX_FAIL, EX_USAGE = 0, 1, 2
EX_NO_DAEMON = 3  # ``status``: no daemon answered (like systemctl's "unit is not active")


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise argparse.ArgumentTypeError(f"{text!r} is not one of DEBUG, INFO, WARNING, ERROR")
    return level


def _common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # Sub-commands repeat the common options so they work on either side of the command name;
    # SUPPRESS keeps a sub-parser's unset option from overwriting the value given before it.
    d = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "-c", "--config", default=d, metavar="PATH", help="config file (default: search order)"
    )
    parser.add_argument("--json", action="store_true", default=d or False, help="print JSON for scripts")
    parser.add_argument(
        "--log-level",
        default=d,
        type=_log_level,
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR (default: config)",
    )


def _columns() -> int:
    """The terminal width as shutil.get_terminal_size() finds it ($COLUMNS, the terminal, 80)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter without its ``import shutil``.

    Every add_argument builds a formatter, and HelpFormatter imports shutil (which imports bz2 and
    lzma) for the terminal width: a few milliseconds of every command's start for nothing.
    """

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None
    ) -> None:
        columns = _columns() - 2 if width is None else width
        super().__init__(prog, indent_increment, max_help_position, columns)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and --help)."""
    p = _Parser(
        prog="gpu-router",
        description="Keep priority Ollama models on the GPU nodes of a cluster.",
        epilog="Config search order: --config, $GPU_ROUTER_CONFIG, $CONFIGURATION_DIRECTORY/config.yaml, "
        "/etc/gpu-router/config.yaml.",
    )
    p.add_argument("--version", action="version", version=f"gpu-router {__version__}")
    _common(p, suppress=False)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--report-only", action="store_true", help="print the cluster and fit decisions; change nothing"
    )
    mode.add_argument(
        "--check-config", action="store_true", help="validate the config: exit 0, or 78 with the error"
    )
    mode.add_argument("--once", action="store_true", help="run one reconcile and exit")
    p.add_argument("--dry-run", action="store_true", help="log the actions the daemon would take; send none")
    p.add_argument(
        "--textfile",
        metavar="PATH",
        help="with --report-only: also write the metrics to PATH (node_exporter textfile collector)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in (
        ("route", "where MODEL should run and why"),
        ("check", "which nodes can fit MODEL on GPU, with numbers"),
    ):
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("model", metavar="MODEL")
        _common(sp, suppress=True)
    sp = sub.add_parser(
        "explain",
        help="how much VRAM MODEL needs on each node, and why",
        description="Per node: the context Ollama will use and why, the parts of the need (weights, KV "
        "cache, graph, projector, reserve), Ollama's own pre-load check, the total against usable and "
        "free VRAM, the engine era and version, and where the figure came from.",
    )
    sp.add_argument("model", metavar="MODEL")
    sp.add_argument("--node", metavar="NAME", default=argparse.SUPPRESS, help="only this node")
    _common(sp, suppress=True)
    sp = sub.add_parser("models", help="every model in the cluster: where, size on disk, VRAM needed")
    _common(sp, suppress=True)
    sp = sub.add_parser(
        "status",
        help="ask the running daemon what it sees (exit 0 all priority models on GPU, 1 not, 3 no daemon)",
    )
    _common(sp, suppress=True)
    sp = sub.add_parser(
        "optimize", help="one reconcile now: by the running daemon, else here in the foreground"
    )
    sp.add_argument(
        "--dry-run", action="store_true", default=argparse.SUPPRESS, help="plan only; send nothing"
    )
    _common(sp, suppress=True)
    sp = sub.add_parser("demo", help="run a simulated 3-node cluster on 127.0.0.1 and report on it")
    sp.add_argument("--serve", action="store_true", help="keep the cluster running and print a config for it")
    _common(sp, suppress=True)
    return p


def _load(args: argparse.Namespace) -> Config:
    from gpu_router.config import find_config_path, load_config

    # An explicit path is passed as typed, so messages name the file the way the user wrote it.
    return load_config(args.config or find_config_path(None))


def _is_tty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


def _emit(
    tables: Callable[[], list[Table]], data: Json, args: argparse.Namespace, out: TextIO, footer: str = ""
) -> None:
    """Print the JSON document, or the tables (built only then: ``tables`` makes them)."""
    from gpu_router.report import render, write_json

    if args.json:
        write_json(data, out)
    else:
        render(tables(), out, rich=_is_tty(out), footer=footer)


def _observe(config: Config) -> ClusterState:
    """One observation; the planner and the report are imported while the nodes are asked.

    Those imports cost about 0.1 s of CPU: paid while the requests are out (a hung node's for a
    whole ``request_timeout``), they add nothing to the command's time.
    """
    from gpu_router.observe import observe_once
    from gpu_router.store import info_cache_for

    def imports() -> None:
        import gpu_router.planner
        import gpu_router.report  # noqa: F401

    return observe_once(config, info_cache=info_cache_for(config), meanwhile=imports)


def _report(config: Config) -> Report:
    state = _observe(config)
    from gpu_router.planner import plan
    from gpu_router.report import build_report
    from gpu_router.store import load_learned

    return build_report(state, plan(state, config, learned=load_learned(config)))


def cmd_report(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """``--report-only``: observe, plan, print; never change anything."""
    if args.textfile:
        return cmd_report_textfile(config, args, out)
    report = _report(config)
    from gpu_router.report import report_tables, summary_line

    _emit(lambda: report_tables(report), report.to_json(), args, out, footer=summary_line(report))
    return EX_OK


def cmd_report_textfile(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """``--report-only --textfile PATH``: the report, plus its gauges written once for node_exporter."""
    state = _observe(config)
    from gpu_router.metrics import write_textfile
    from gpu_router.planner import plan
    from gpu_router.report import report_tables, summary_line
    from gpu_router.snapshot import static_snapshot
    from gpu_router.store import load_learned

    snap = static_snapshot(config, state, plan(state, config, learned=load_learned(config)))
    try:
        write_textfile(args.textfile, snap)
    except OSError as exc:
        print(f"gpu-router: cannot write {args.textfile}: {exc.strerror or exc}", file=sys.stderr)
        return EX_FAIL
    report = snap.report
    _emit(lambda: report_tables(report), report.to_json(), args, out, footer=summary_line(report))
    return EX_OK


def _find_model(report: Report, model: str) -> ModelRow | None:
    """The report's row for ``model``, or None after saying so on stderr."""
    from gpu_router.config import normalize_model_name

    name = normalize_model_name(model)
    found = report.model(name)
    if found is None:
        print(f"gpu-router: model {name!r} is not installed on any node that is up", file=sys.stderr)
    return found


def cmd_route(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """``route MODEL``: the decision and every node's verdict."""
    from gpu_router.report import Table, gib, to_json

    m = _find_model(_report(config), args.model)
    if m is None:
        return EX_FAIL
    d = m.decision
    rows = tuple((f.node, "yes" if f.fits else "no", f.verdict, f.reason) for f in m.fits)
    title = f"{m.model}: {d.placement.upper()}" + (f" on {d.node}" if d.node else "")
    table = Table(
        title,
        ("NODE", "FITS", "VERDICT", "REASON"),
        rows,
        note=f"needs {gib(m.need_bytes)} ({m.size_source}: {m.size_detail}); {d.reason}",
    )
    _emit(lambda: [table], to_json(m), args, out)
    return EX_OK


def cmd_check(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """``check MODEL``: which nodes fit it on GPU, with the numbers."""
    from gpu_router.report import Table, gib

    report = _report(config)
    m = _find_model(report, args.model)
    if m is None:
        return EX_FAIL
    nodes = {n.name: n for n in report.nodes}
    rows = tuple(
        (
            f.node,
            "yes" if f.fits else "no",
            gib(f.need_bytes),
            gib(nodes[f.node].usable_vram_bytes),
            gib(nodes[f.node].free_vram_bytes),
            f.reason,
        )
        for f in m.fits
    )
    fitting = [f.node for f in m.fits if f.fits]
    result = {
        "model": m.model,
        "need_bytes": m.need_bytes,
        "size_source": m.size_source,
        "fits_on": fitting,
        "nodes": [
            {
                "node": f.node,
                "fits": f.fits,
                "verdict": f.verdict,
                "reason": f.reason,
                "need_bytes": f.need_bytes,
                "context_length": f.context_length,
                "era": f.era,
                "usable_vram_bytes": nodes[f.node].usable_vram_bytes,
                "free_vram_bytes": nodes[f.node].free_vram_bytes,
            }
            for f in m.fits
        ],
    }
    table = Table(
        f"{m.model} fits on GPU on: {', '.join(fitting) or 'no node'}",
        ("NODE", "FITS", "NEEDS", "USABLE", "FREE", "REASON"),
        rows,
    )
    _emit(lambda: [table], result, args, out)
    return EX_OK


def cmd_explain(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """``explain MODEL [--node NAME]``: the need on each node, part by part, and why."""
    from gpu_router.config import normalize_model_name

    name = normalize_model_name(args.model)
    node = getattr(args, "node", None)
    if node is not None and node not in {n.name for n in config.nodes}:
        print(f"gpu-router: no node is named {node!r}", file=sys.stderr)
        return EX_USAGE
    state = _observe(config)
    from gpu_router.explain import NodeExplanation, explain
    from gpu_router.planner import plan
    from gpu_router.report import Table, gib
    from gpu_router.store import load_learned

    rows = explain(state, plan(state, config, learned=load_learned(config)), name, node)
    if not rows:
        print(f"gpu-router: model {name!r} is not installed on any node that is up", file=sys.stderr)
        return EX_FAIL
    if args.json:
        from gpu_router.report import write_json

        write_json({"model": name, "nodes": [r.as_json() for r in rows]}, out)
        return EX_OK

    def size(n: int | None) -> str:
        return "-" if n is None else gib(n)

    def slots(r: NodeExplanation) -> str:
        if r.context_length is None:
            return "-"
        par = r.num_parallel or 1
        text = f"{r.context_length} x {par} slots" if par > 1 else str(r.context_length)
        if r.ps_context_length and r.ps_context_length != r.context_length:
            text += f" (/api/ps will say {r.ps_context_length})"
        return text

    def origin(r: NodeExplanation) -> str:
        if r.source == "estimated":
            return "the estimate above, from /api/show metadata and the file size"
        return r.source_detail or "-"

    def kv(r: NodeExplanation) -> str:
        if r.kv_cache_type is None:
            return "-"
        return f"{r.kv_cache_type}, flash attention {'on' if r.flash_attention else 'off'}"

    def check(r: NodeExplanation) -> str:
        if r.preload_bytes is None:
            return "none in this era"
        if r.preload_passes is None:
            return f"{gib(r.preload_bytes)} against 80% of free VRAM (free unknown)"
        verdict = "passes" if r.preload_passes else "fails: Ollama would evict other models first"
        return f"{gib(r.preload_bytes)} against 80% of free VRAM: {verdict}"

    fields: list[tuple[str, Callable[[NodeExplanation], str]]] = [
        ("status", lambda r: r.status),
        ("Ollama", lambda r: f"{r.version or '?'} ({r.era or '?'}, {r.engine or '?'} engine)"),
        ("context", slots),
        ("why that context", lambda r: r.context_reason or "-"),
        ("KV cache", kv),
        ("weights", lambda r: size(r.weights_bytes)),
        ("KV", lambda r: size(r.kv_bytes)),
        ("graph", lambda r: size(r.graph_bytes)),
        ("projector", lambda r: size(r.projector_bytes)),
        ("reserve", lambda r: size(r.reserve_bytes)),
        ("buffer", lambda r: size(r.buffer_bytes)),
        ("NEED", lambda r: f"{size(r.need_bytes)} ({r.source})"),
        ("from", origin),
        ("/api/ps will show", lambda r: size(r.ps_size_bytes)),
        ("pre-load check", check),
        ("usable / free", lambda r: f"{size(r.usable_bytes)} / {size(r.free_bytes)}"),
        ("verdict", lambda r: f"{r.verdict}: {r.reason}" if r.verdict else "-"),
    ]
    table = Table(
        f"{name}: VRAM needed per node",
        ("", *(r.node for r in rows)),
        tuple((label, *(fn(r) for r in rows)) for label, fn in fields),
    )
    notes = sorted({f"{r.node}: {note}" for r in rows for note in r.notes})
    _emit(lambda: [table], {}, args, out, footer="\n".join(notes))
    return EX_OK


def cmd_models(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """``models``: every model known in the cluster."""
    from gpu_router.report import Table, gib, model_table, to_json

    report = _report(config)
    rows = tuple(
        (
            m.model,
            "yes" if m.priority else "",
            ",".join(m.installed_on) or "-",
            gib(m.file_bytes),
            gib(m.need_bytes),
            m.size_source,
            ",".join(m.capabilities or ()) or "?",
        )
        for m in report.models
    )
    table = Table(
        "Models", ("MODEL", "PRIO", "INSTALLED ON", "ON DISK", "VRAM NEEDED", "SOURCE", "CAPABILITIES"), rows
    )
    _emit(lambda: [table, model_table(report)], {"models": [to_json(m) for m in report.models]}, args, out)
    return EX_OK


ACTION_COLUMNS = ("NODE", "ACTION", "MODEL", "RESULT", "TOOK", "DETAIL")


def _action_cells(a: Json) -> tuple[str, ...]:
    """One action's row (an API action record), in ACTION_COLUMNS order."""
    took = "-" if a["duration_s"] is None else f"{a['duration_s']:.1f}s"
    return (a["node"], a["action"], a["model"], a["result"], took, a["detail"] or a["reason"])


def daemon_tables(d: Json) -> list[Table]:
    """The daemon's own fields from ``/api/v1/status``: timings, node states, actions, backoffs."""
    from gpu_router.report import Table

    def when(iso: str | None) -> str:
        if not iso:
            return "-"
        from datetime import datetime

        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")

    facts = [
        ("pid", str(d["pid"])),
        ("started", f"{when(d['started_at'])} (up {d['uptime_s']:.0f}s)"),
        ("reconciles", str(d["reconciles"])),
        (
            "last reconcile",
            f"{when(d['last_reconcile_at'])}, took {d['last_reconcile_duration_s'] or 0:.2f}s",
        ),
        ("next reconcile", when(d["next_reconcile_at"])),
    ]
    if d.get("last_error"):
        facts.append(("last error", d["last_error"]))
    if d.get("dry_run") or not d.get("auto_optimize", True):
        facts.append(("mode", "monitor only: actions are logged, not taken"))
    tables = [Table("Daemon", ("FIELD", "VALUE"), tuple(facts))]
    states = tuple(
        (n["node"], n["state"], when(n["since"]), "-" if n["for_s"] is None else f"{n['for_s']:.0f}s")
        for n in d["nodes"]
    )
    tables.append(Table("Node states", ("NODE", "STATE", "SINCE", "FOR"), states))
    actions = [*d["in_flight"], *d["actions"]]
    if actions:
        rows = tuple((when(a["started_at"]), *_action_cells(a)) for a in actions)
        tables.append(Table("Last actions", ("STARTED", *ACTION_COLUMNS), rows))
    if d.get("pulls"):
        pulls = tuple(
            (p["node"], p["model"], p["label"], when(p["started_at"]), f"{p['for_s']:.0f}s", p["reason"])
            for p in d["pulls"]
        )
        tables.append(
            Table("Pulls in flight", ("NODE", "MODEL", "PROGRESS", "STARTED", "FOR", "REASON"), pulls)
        )
    if d["backoffs"]:
        waits = tuple(
            (b["model"], b["node"], str(b["failures"]), f"{b['retry_in_s']:.0f}s") for b in d["backoffs"]
        )
        tables.append(Table("Backing off", ("MODEL", "NODE", "FAILURES", "RETRY IN"), waits))
    return tables


def cmd_status(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """``status``: the running daemon's view. 0 all priority models on GPU, 1 some not, 3 no daemon."""
    from gpu_router.apiclient import DaemonUnreachable, call_daemon
    from gpu_router.report import (
        Report,
        action_table,
        model_table,
        node_tables,
        render,
        summary_line,
        write_json,
    )

    try:
        code, data = call_daemon(config, "GET", "/api/v1/status", timeout_s=config.request_timeout_s)
    except DaemonUnreachable as exc:
        print(f"gpu-router: {exc}", file=sys.stderr)
        print(
            "gpu-router: is the daemon running? `gpu-router --report-only` polls the nodes itself",
            file=sys.stderr,
        )
        return EX_NO_DAEMON
    if code != 200 or "daemon" not in data:
        print(f"gpu-router: the daemon answered HTTP {code}: {data.get('error', data)}", file=sys.stderr)
        return EX_NO_DAEMON
    if args.json:
        write_json(data, out)
    else:
        try:
            report = Report.from_json(data)
        except ValueError as exc:
            print(f"gpu-router: the daemon's answer is not a status report ({exc})", file=sys.stderr)
            return EX_NO_DAEMON
        tables = [*daemon_tables(data["daemon"]), *node_tables(report), model_table(report)]
        planned = action_table(report, "Actions planned at the last reconcile")
        if planned is not None:
            tables.append(planned)
        footer = summary_line(report)
        if not data["daemon"]["reconciles"]:
            footer = "no reconcile has finished yet"
        render(tables, out, rich=_is_tty(out), footer=footer)
    placed, wanted = data["daemon"]["priority_models_on_gpu"], data["daemon"]["priority_models"]
    return EX_OK if placed >= wanted else EX_FAIL


def cmd_optimize(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """``optimize``: one reconcile now, by the running daemon through its API, else here in the foreground."""
    from gpu_router.apiclient import DaemonUnreachable, call_daemon

    dry_run = bool(getattr(args, "dry_run", False))
    if not dry_run:
        wait_s = config.load_timeout_s + 30
        try:
            code, body = call_daemon(
                config, "POST", f"/api/v1/optimize?wait={wait_s:g}", timeout_s=wait_s + 10
            )
        except DaemonUnreachable as exc:
            print(f"gpu-router: {exc}; running one reconcile here", file=sys.stderr)
        else:
            if code not in (200, 202):
                print(
                    f"gpu-router: the daemon answered HTTP {code}: {body.get('error', body)}", file=sys.stderr
                )
                return EX_FAIL
            return _print_optimized(body, args, out, by="the daemon")
    return _optimize_here(config, args, out, dry_run=dry_run)


def _optimize_here(config: Config, args: argparse.Namespace, out: TextIO, *, dry_run: bool) -> int:
    from gpu_router.daemon import Daemon
    from gpu_router.report import summary_line

    daemon = Daemon(config, dry_run=dry_run)
    rc = daemon.run(once=True)
    snap = daemon.telemetry.snapshot
    actions = [
        {
            "action": a.action,
            "node": a.node,
            "model": a.model,
            "reason": a.reason,
            "result": a.result,
            "detail": a.detail,
            "duration_s": a.duration_s,
        }
        for a in (*snap.recent_actions, *snap.in_flight)
    ]
    plan_actions = snap.plan.actions if snap.plan else ()
    body = {
        "done": rc == 0,
        "reconcile": snap.reconciles,
        "error": snap.last_error,
        "summary": summary_line(snap.report) if snap.plan else "",
        "planned": [
            {"action": a.kind.value, "node": a.node, "model": a.model, "reason": a.reason}
            for a in plan_actions
        ],
        "actions": actions,
    }
    return _print_optimized(body, args, out, by="this process" + (" (dry run)" if dry_run else ""))


def _print_optimized(body: Json, args: argparse.Namespace, out: TextIO, *, by: str) -> int:
    from gpu_router.report import Table, render, write_json

    # A pull goes on in the background for up to pull_timeout: in flight is not a failure.
    failed = [
        a
        for a in body["actions"]
        if a["result"] != "ok" and (a["action"], a["result"]) != ("pull", "in_flight")
    ]
    if args.json:
        write_json(body, out)
    else:
        tables = []
        if body["actions"]:
            rows = tuple(_action_cells(a) for a in body["actions"])
            tables.append(Table(f"Actions taken by {by}", ACTION_COLUMNS, rows))
        elif body["planned"]:
            planned = tuple((a["node"], a["action"], a["model"], a["reason"]) for a in body["planned"])
            tables.append(Table("Planned, not taken", ("NODE", "ACTION", "MODEL", "REASON"), planned))
        footer = f"reconcile #{body['reconcile']} by {by}: "
        if body.get("error"):
            footer += f"failed: {body['error']}"
        elif not body["actions"] and not body["planned"]:
            footer += "nothing to do"
        else:
            pulling = sum(1 for a in body["actions"] if (a["action"], a["result"]) == ("pull", "in_flight"))
            done = len(body["actions"]) - pulling
            footer += f"{done - len(failed)}/{done} actions ok"
            if pulling:
                footer += f", {pulling} pull{'s' if pulling > 1 else ''} in the background"
        if body.get("summary"):
            footer += f"\n{body['summary']}"
        if not body["done"]:
            footer += "\nstill running when the wait ended; `gpu-router status` shows how it ends"
        render(tables, out, rich=_is_tty(out), footer=footer)
    return EX_OK if body["done"] and not failed and not body.get("error") else EX_FAIL


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    """``demo``: start the emulated cluster and show the report against it."""
    from gpu_router.demo import run_demo

    return run_demo(serve=args.serve, as_json=args.json, out=out, rich=_is_tty(out))


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; returns the exit code."""
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    from gpu_router.config import EX_CONFIG, ConfigError

    if not args.check_config:  # which logs nothing: its answer is its output and exit code
        from gpu_router.systemd import setup_logging

        setup_logging(args.log_level or "WARNING" if _one_shot(args) else args.log_level or "INFO")
    try:
        if args.command == "demo":
            return cmd_demo(args, out)
        config = _load(args)
        if args.log_level is None and not _one_shot(args):
            setup_logging(config.log_level)
        if args.check_config:
            print(
                f"{config.path}: OK ({len(config.nodes)} nodes,"
                f" {len(config.priority_models)} priority models)",
                file=out,
            )
            for where in config.unused_env():
                print(f"{config.path}: {where} is not used for sizing (accepted, ignored)", file=out)
            return EX_OK
        if args.textfile and not args.report_only:
            print("gpu-router: --textfile works with --report-only", file=sys.stderr)
            return EX_USAGE
        commands = {
            "route": cmd_route,
            "check": cmd_check,
            "models": cmd_models,
            "explain": cmd_explain,
            "status": cmd_status,
            "optimize": cmd_optimize,
        }
        if args.command in commands:
            return commands[args.command](config, args, out)
        if args.report_only:
            return cmd_report(config, args, out)
        from gpu_router.daemon import run_daemon

        return run_daemon(config, once=args.once, dry_run=args.dry_run)
    except ConfigError as exc:
        print(f"gpu-router: {exc}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `gpu-router --report-only | head` closes the pipe early: not an error worth a traceback.
        return EX_OK


def _one_shot(args: argparse.Namespace) -> bool:
    return bool(args.report_only or args.check_config or args.command)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
