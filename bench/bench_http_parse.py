"""Response parsing CPU and import time: gpu_router.httpread against http.client.HTTPResponse.

Run: .venv/bin/python bench/bench_http_parse.py [--responses 20000] [--runs 7] [--starts 30]
                                                 [--baseline-tree DIR]

Parsing: the same bytes (what Ollama's Go server and a GPU exporter send, built from the test
fixtures) are read from memory by each parser, status line, headers and the whole body, piece by
piece the way the transport reads it (``read1`` of at most 64 KiB until the body ends). The figure
is the median over --runs of CPU time per response (time.process_time), best beside it; "head"
reads only the status line and the header section.

Import time: fresh interpreters import gpu_router.transport and build one http:// client (the old
transport imported http.client there), spawned --starts times each, interleaved with
``python -c pass`` so a change of load hits every column alike. Two figures: the time measured
inside the child (import + client, perf_counter) and spawn to exit. "+ http.client" is the same
child importing http.client too: what the transport cost before it had its own reader.
--baseline-tree DIR adds the same child run against an older source tree, e.g. the commit before
the reader: ``git archive 99a96ff gpu_router | tar -x -C /tmp/old`` then ``--baseline-tree /tmp/old``.
The package (and the baseline) is compiled to bytecode first, as an install does (this environment
sets PYTHONDONTWRITEBYTECODE).
"""

from __future__ import annotations

import argparse
import compileall
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gpu_router import httpread

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
READ = 64 * 1024  # the transport's _READ_CHUNK
DATE = "Date: Mon, 02 Jun 2025 10:00:00 GMT\r\n"


def chunked(body: bytes, size: int) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def samples() -> dict[str, bytes]:
    """Responses as the servers gpu-router polls send them (Go net/http framing and headers)."""
    ps = json.dumps(json.loads((FIXTURES / "ollama" / "ps-docs.json").read_bytes())).encode()
    show = json.dumps(json.loads((FIXTURES / "ollama" / "show-llama.json").read_bytes())).encode()
    prom = (FIXTURES / "exporter" / "nvidia_gpu_exporter_h100_load.prom").read_bytes()
    go_json = "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n" + DATE
    return {
        f"/api/ps, Content-Length ({len(ps)} B)": (
            f"{go_json}Content-Length: {len(ps)}\r\n\r\n".encode() + ps
        ),
        f"/api/show, chunked ({len(show)} B)": (
            f"{go_json}Transfer-Encoding: chunked\r\n\r\n".encode() + chunked(show, 4096)
        ),
        f"/metrics, chunked ({len(prom)} B)": (
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8; "
            f"escaping=underscores\r\n{DATE}Transfer-Encoding: chunked\r\n\r\n".encode()
            + chunked(prom, 4096)
        ),
        "204, no body": f"HTTP/1.1 204 No Content\r\n{DATE}\r\n".encode(),
    }


class _Shim:
    """What http.client.HTTPResponse asks of a socket: makefile()."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(io.BytesIO(self.raw), READ)


def _drain(resp: httpread.Incoming | http.client.HTTPResponse, body: bool) -> int:
    """Read the body as the transport does (``read1`` pieces); its length."""
    n = 0
    if body:
        while resp.length != 0:
            piece = resp.read1(READ)
            if not piece:
                break
            n += len(piece)
    return n


def ours(raw: bytes, body: bool) -> int:
    return _drain(httpread.read_head(io.BufferedReader(io.BytesIO(raw), READ), "GET"), body)


def stdlib(raw: bytes, body: bool) -> int:
    resp = http.client.HTTPResponse(_Shim(raw))  # type: ignore[arg-type]
    resp.begin()
    return _drain(resp, body)


def cpu_us(parse: Callable[[bytes, bool], int], raw: bytes, body: bool, count: int) -> float:
    start = time.process_time()
    for _ in range(count):
        parse(raw, body)
    return (time.process_time() - start) / count * 1e6


def bench_parse(responses: int, runs: int) -> None:
    print(f"parse CPU per response, {runs} runs x {responses} responses (time.process_time), µs:")
    head = f"{'response':<36} {'part':<5} {'httpread':>9} {'best':>7} {'http.client':>12} {'best':>7}"
    print(f"  {head} {'ratio':>6}")
    for name, raw in samples().items():
        assert ours(raw, True) == stdlib(raw, True), name  # the same body length from both
        for body, part in ((False, "head"), (True, "all")):
            figures: dict[str, list[float]] = {"ours": [], "stdlib": []}
            for parse in (ours, stdlib):
                cpu_us(parse, raw, body, max(100, responses // 20))  # warm up
            for _ in range(runs):
                figures["ours"].append(cpu_us(ours, raw, body, responses))
                figures["stdlib"].append(cpu_us(stdlib, raw, body, responses))
            a, b = statistics.median(figures["ours"]), statistics.median(figures["stdlib"])
            print(
                f"  {name:<36} {part:<5} {a:>9.2f} {min(figures['ours']):>7.2f} "
                f"{b:>12.2f} {min(figures['stdlib']):>7.2f} {b / a:>5.1f}x"
            )


CHILD = (
    "import time; t = time.perf_counter(); {extra}"
    "import gpu_router.transport as m; m.HttpClient('http://127.0.0.1:9', proxies=m.ProxyConfig()); "
    "print((time.perf_counter() - t) * 1e3)"
)


def bench_import(starts: int, baseline: str | None) -> None:
    py = sys.executable
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    compileall.compile_dir(str(ROOT / "gpu_router"), quiet=1)
    cases: dict[str, tuple[list[str], dict[str, str]]] = {
        "python -c pass": ([py, "-c", "pass"], env),
        "transport now": ([py, "-c", CHILD.format(extra="")], env),
        "transport now + http.client": ([py, "-c", CHILD.format(extra="import http.client; ")], env),
    }
    if baseline:
        compileall.compile_dir(baseline, quiet=1)
        old_env = {**env, "PYTHONPATH": baseline}
        cases[f"transport in {baseline}"] = ([py, "-c", CHILD.format(extra="")], old_env)
    inside: dict[str, list[float]] = {name: [] for name in cases}
    spawn: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(starts):
        for name, (cmd, cmd_env) in cases.items():
            t = time.perf_counter()
            # cwd "/": run from the repository, -c would find its gpu_router before PYTHONPATH's
            out = subprocess.run(cmd, env=cmd_env, cwd="/", capture_output=True, text=True, check=True).stdout
            spawn[name].append((time.perf_counter() - t) * 1e3)
            if out.strip():
                inside[name].append(float(out))
    check = "import sys, gpu_router.transport as t; t.HttpClient('http://127.0.0.1:9'); " + (
        "print(sorted(m for m in sys.modules if m.startswith(('http', 'email', 'ssl'))))"
    )
    loaded = subprocess.run([py, "-c", check], env=env, cwd="/", capture_output=True, text=True, check=True)
    print(f"import gpu_router.transport + one http:// client, {starts} fresh interpreters each, ms:")
    print(f"  {'child':<40} {'inside median':>13} {'best':>6} {'spawn-to-exit median':>21} {'best':>6}")
    for name in cases:
        inner = " " * 20
        if inside[name]:
            inner = f"{statistics.median(inside[name]):>13.1f} {min(inside[name]):>6.1f}"
        print(f"  {name:<40} {inner} {statistics.median(spawn[name]):>21.1f} {min(spawn[name]):>6.1f}")
    print(f"  modules http*/email*/ssl* loaded by the transport now: {loaded.stdout.strip()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--responses", type=int, default=20000, help="responses per parser per run")
    ap.add_argument("--runs", type=int, default=7, help="runs; the median is reported")
    ap.add_argument("--starts", type=int, default=30, help="fresh interpreters per import-time column")
    ap.add_argument("--baseline-tree", help="an older source tree (holding gpu_router/) to time as well")
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    bench_parse(args.responses, args.runs)
    bench_import(args.starts, args.baseline_tree)


if __name__ == "__main__":
    main()
