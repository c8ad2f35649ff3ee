"""No secret ever leaves in an output: every command, the daemon at DEBUG through faults, its API.

Three secrets: a header value written in the file, a header value from ``${VAR}``, and the
``api_token`` (from ``${VAR}`` too). The cluster has a healthy node, one that redirects every request
to another host, one whose loads fail, one that answers with deeply nested JSON, and an ``https://``
node whose certificate does not verify. Every command's stdout and stderr, the daemon's whole log,
the report files, every file in the state directory and every API answer is searched for each
secret and for a distinctive part of it: zero occurrences.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import yaml
from conftest import GEMMA, LLAMA32
from daemon_helpers import MakeNode, daemon_env, pinned_on_gpu, run_cli, wait_until, write_config
from harness import DaemonRun, _Run, assert_clean_log, assert_stopped_cleanly
from rawserver import RawServer, serve_requests, server_tls_context

from gpu_router.emulator import Fault
from gpu_router.transport import HttpClient, ProxyConfig

IN_FILE = "hdr-Sx7Qw3Lk9Zp2"  # written in the config as a header value
FROM_VAR = "var-Rt5Mn8Bv1Xc4"  # a header value through ${GPU_ROUTER_TEST_VAR}
API_TOKEN = "api-Jh6Gf2Dd8Ss0Aa4Q"  # the API token through ${GPU_ROUTER_TEST_API}
SECRETS = (IN_FILE, FROM_VAR, API_TOKEN)
# A distinctive middle part of each: a secret cut, quoted or escaped still shows one of these.
PARTS = ("Sx7Qw3", "Rt5Mn8", "Jh6Gf2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _leaks(where: str, text: str | bytes) -> list[str]:
    data = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return [f"{where}: {s}" for s in (*SECRETS, *PARTS) if s in data]


def test_no_secret_in_any_output(make_node: MakeNode, tmp_path: Path, runs: list[_Run]) -> None:
    ok = make_node("ok", models=(LLAMA32,))
    redirecting = make_node("redirecting", models=(LLAMA32,))
    failing = make_node("failing", models=(GEMMA,))
    garbled = make_node("garbled", models=(LLAMA32,))
    other = make_node("other", models=(LLAMA32,))  # where the redirect points
    redirecting.set_fault(Fault.REDIRECT, status=307, location=f"{other.url}/steal")
    failing.set_fault(Fault.LOAD_ERROR, message="llama runner process has terminated: exit status 2")
    garbled.set_fault(Fault.DEEP_JSON, paths=("/api/ps", "/api/tags"))
    # A server whose certificate (the test CA's) this config does not trust: no ca_file given.
    tls = RawServer(serve_requests(lambda req: b""), tls=server_tls_context())
    try:
        port = _free_port()
        config = write_config(
            tmp_path / "config.yaml",
            [ok, redirecting, failing, garbled],
            [LLAMA32, GEMMA],
            tmp_path / "state",
            check_interval="1s",
            watch_interval="0.3s",
            request_timeout="1s",
            listen=f"127.0.0.1:{port}",
            api_token="${GPU_ROUTER_TEST_API}",
            log_level="DEBUG",
        )
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
        untrusted = tls.url.replace("127.0.0.1", "localhost")
        data["nodes"].append({"name": "untrusted", "url": untrusted, "gpu": "none"})
        for n in data["nodes"]:
            n["headers"] = {"X-Api-Key": IN_FILE, "Authorization": "Bearer ${GPU_ROUTER_TEST_VAR}"}
        config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        env = daemon_env(GPU_ROUTER_TEST_VAR=FROM_VAR, GPU_ROUTER_TEST_API=API_TOKEN)
        leaks: list[str] = []
        outputs: list[str] = []

        def cli(*args: str) -> None:
            result = run_cli(["--config", str(config), *args], env)
            assert "Traceback" not in result.stderr, (args, result.stderr)
            outputs.append(" ".join(args))
            leaks.extend(_leaks(f"{' '.join(args)} stdout", result.stdout))
            leaks.extend(_leaks(f"{' '.join(args)} stderr", result.stderr))

        # Every command, before a daemon runs (status and optimize then find none).
        textfile = tmp_path / "gpu_router.prom"
        for args in (
            ("--check-config",),
            ("--report-only",),
            ("--report-only", "--json"),
            ("--report-only", "--textfile", str(textfile)),
            ("--log-level", "DEBUG", "--report-only"),
            ("route", LLAMA32),
            ("check", LLAMA32),
            ("models",),
            ("explain", LLAMA32),
            ("status",),
            ("optimize", "--dry-run"),
            ("--once", "--dry-run", "--log-level", "DEBUG"),
        ):
            cli(*args)
        leaks.extend(_leaks("the textfile", textfile.read_bytes()))

        # The daemon at DEBUG, through all of it, with its API.
        run = DaemonRun(
            config,
            tmp_path,
            args=("--log-level", "DEBUG"),
            GPU_ROUTER_TEST_VAR=FROM_VAR,
            GPU_ROUTER_TEST_API=API_TOKEN,
        )
        runs.append(run)
        wait_until(lambda: pinned_on_gpu(ok, LLAMA32), what="the healthy node's pin")
        wait_until(lambda: f"not trying {GEMMA} on failing again" in run.log_text(), what="the failed load")
        run.wait_reconciles(2)
        bearer = {"Authorization": f"Bearer {API_TOKEN}"}
        api = HttpClient(f"http://127.0.0.1:{port}", headers=bearer, proxies=ProxyConfig())
        try:
            for path in ("/metrics", "/healthz", "/api/v1/status", f"/api/v1/route?model={LLAMA32}", "/"):
                reply = api.request("GET", path)
                assert reply.status == 200, (path, reply.status)
                leaks.extend(_leaks(f"GET {path}", reply.body))
            status = json.loads(api.request("GET", "/api/v1/status").body)
        finally:
            api.close()
        nodes = {n["name"]: n for n in status["nodes"]}
        assert "redirect refused" in str(nodes["redirecting"]["error"])  # the faults did happen
        assert "certificate" in str(nodes["untrusted"]["error"]).lower()
        for args in (("status",), ("status", "--json"), ("optimize",)):
            cli(*args)
        assert_stopped_cleanly(run)
        assert_clean_log(run)
        leaks.extend(_leaks("the daemon's log", run.log_text()))
        for f in sorted((tmp_path / "state").rglob("*")):
            if f.is_file():
                leaks.extend(_leaks(str(f), f.read_bytes()))
        assert other.requests == [], "a request followed the redirect"
        assert leaks == [], f"secrets found in: {leaks}"
        assert len(outputs) == 15
    finally:
        tls.close()
