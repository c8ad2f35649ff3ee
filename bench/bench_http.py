"""Client CPU per HTTP call: gpu_router.transport against a bare http.client connection (and requests).

Run: .venv/bin/python bench/bench_http.py [--calls 1000] [--runs 5]

One emulated Ollama node (gpu_router.emulator.EmulatedNode with three models loaded, so /api/ps
answers ~1.5 KB) runs in a child process, so this process's CPU time (time.process_time) is the
client's alone. Each run makes --calls GET /api/ps with each client in turn, on the same server in
the same run; the figure is the median over --runs of CPU time per call, with the best run beside it.

Two server modes:

* keep-alive: the emulator as shipped, HTTP/1.1 with kept-alive connections, as real Ollama (a Go
  net/http server) behaves. This is the figure for the target: client CPU per call < 1 ms.
* connection per call: the emulator's handler switched to HTTP/1.0 in the child process, so every
  call pays connect + close.

``requests`` is not a dependency any more; its column appears only when it is importable.
Target (from the issue): transport < 1 ms client CPU per call, close to the bare socket's.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from gpu_router.transport import HttpClient, ProxyConfig

SERVER = """
import sys
from gpu_router.emulator import EmulatedNode
from gpu_router.emulator import server as server_module

# The emulator speaks HTTP/1.1 with keep-alive, as Ollama's Go server does; HTTP/1.0 makes every call
# open and close its own connection.
if sys.argv[1] != "keep-alive":
    server_module._Handler.protocol_version = "HTTP/1.0"
node = EmulatedNode("bench", (24576,), ("llama3.2", "nomic-embed-text", "all-minilm"))
for model in ("llama3.2", "nomic-embed-text", "all-minilm"):
    node.load(model, keep_alive=-1)
node.start()
print(node.url, flush=True)
sys.stdin.read()  # until the parent closes our stdin
node.stop()
"""

Call = Callable[[], bytes]


def transport_client(url: str) -> tuple[Call, Callable[[], None]]:
    client = HttpClient(url, timeout_s=5.0, proxies=ProxyConfig())

    def call() -> bytes:
        return client.request("GET", "/api/ps").body

    return call, client.close


def bare_client(url: str) -> tuple[Call, Callable[[], None]]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5.0)

    def call() -> bytes:
        try:
            conn.request("GET", "/api/ps")
            return conn.getresponse().read()
        except http.client.RemoteDisconnected:  # the server closed an idle connection: once more
            conn.close()
            conn.request("GET", "/api/ps")
            return conn.getresponse().read()

    return call, conn.close


def requests_client(url: str) -> tuple[Call, Callable[[], None]] | None:
    try:
        import requests
    except ImportError:
        return None
    session = requests.Session()

    def call() -> bytes:
        body: bytes = session.get(url + "/api/ps", timeout=5.0).content
        return body

    return call, session.close


def cpu_per_call_ms(call: Call, calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        call()
    return (time.process_time() - start) / calls * 1000


def measure(mode: str, calls: int, runs: int) -> dict[str, list[float]]:
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        makers: list[tuple[str, Any]] = [
            ("bare http.client", bare_client),
            ("gpu_router.transport", transport_client),
            ("requests.Session", requests_client),
        ]
        clients: dict[str, tuple[Call, Callable[[], None]]] = {}
        for name, make in makers:
            made = make(url)
            if made is not None:
                clients[name] = made
        sample = {name: call() for name, (call, _) in clients.items()}
        assert len(set(sample.values())) == 1, "the clients read different bodies"
        print(f"  /api/ps body: {len(next(iter(sample.values())))} bytes")
        for call, _ in clients.values():  # warm up: connections, caches, lazy imports
            cpu_per_call_ms(call, max(50, calls // 20))
        figures: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(runs):
            for name, (call, _) in clients.items():
                figures[name].append(cpu_per_call_ms(call, calls))
        for _, close in clients.values():
            close()
        return figures
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(10)


def report(mode: str, figures: dict[str, list[float]]) -> dict[str, float]:
    medians = {name: statistics.median(values) for name, values in figures.items()}
    bare = medians["bare http.client"]
    print(f"  {'client':<22} {'median ms/call':>14} {'best':>7} {'vs bare':>8}")
    for name, values in figures.items():
        print(f"  {name:<22} {medians[name]:>14.3f} {min(values):>7.3f} {medians[name] / bare:>7.2f}x")
    if "requests.Session" in medians:
        ratio = medians["requests.Session"] / medians["gpu_router.transport"]
        print(f"  requests.Session / transport: {ratio:.2f}x")
    return medians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000, help="calls per client per run")
    ap.add_argument("--runs", type=int, default=5, help="runs; the median is reported")
    args = ap.parse_args()
    print(
        f"HTTP client CPU per GET /api/ps, {args.runs} runs x {args.calls} calls per client "
        "(time.process_time)"
    )
    results = {}
    for mode in ("keep-alive", "connection-per-call"):
        print(f"{mode}:")
        results[mode] = report(mode, measure(mode, args.calls, args.runs))
    transport_ms = results["keep-alive"]["gpu_router.transport"]
    verdict = "PASS" if transport_ms < 1.0 else "FAIL"
    print(
        f"{verdict} against the target: transport {transport_ms:.3f} ms client CPU per call "
        "(keep-alive) < 1 ms"
    )


if __name__ == "__main__":
    main()
