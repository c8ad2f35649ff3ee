"""Shared helpers for the daemon integration tests: configs for emulated nodes, waits, sd_notify."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from gpu_router.daemon import Daemon
from gpu_router.emulator import EmulatedNode

REPO_ROOT = Path(__file__).resolve().parent.parent
# Builds, starts and registers an emulated node; the make_node fixture (conftest.py) stops them all.
MakeNode = Callable[..., EmulatedNode]
# Writes a config for emulated nodes and builds a Daemon on it (the make_daemon fixture, conftest.py).
MakeDaemon = Callable[..., "Daemon"]

WAIT_S = 15.0  # generous: only there so a broken daemon fails the test instead of hanging it


def node_yaml(node: EmulatedNode, *, cpu_only: bool = False) -> dict[str, Any]:
    """The ``nodes:`` entry for an emulated node: its GPUs read from its dcgm-exporter endpoint."""
    if cpu_only or not node.gpus_mib:
        return {"name": node.name, "url": node.url, "gpu": "none"}
    if not node.metrics:
        raise ValueError(f"node {node.name}: create it with metrics=True so the daemon can read its GPUs")
    return {"name": node.name, "url": node.url, "gpu": {"exporter": node.metrics_url}}


def write_config(
    path: Path,
    nodes: Iterable[EmulatedNode],
    priority: Sequence[str | Mapping[str, Any]],
    state_dir: Path,
    **settings: Any,
) -> Path:
    """Write a config for ``nodes`` as block YAML and return its path.

    Defaults suit tests: no safety margin (the emulator's figures are exact), short timeouts, long
    intervals (tests drive cycles themselves unless they set ``check_interval``/``watch_interval``).
    """
    data: dict[str, Any] = {
        "nodes": [node_yaml(n) for n in nodes],
        "priority_models": list(priority),
        "state_dir": str(state_dir),
        "vram_safety_margin": 1.0,
        "request_timeout": "2s",
        "load_timeout": "20s",
        "check_interval": "300s",
        "watch_interval": "300s",
        "log_level": "DEBUG",
    }
    data.update(settings)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def wait_until(predicate: Callable[[], object], timeout_s: float = WAIT_S, what: str = "condition") -> None:
    """Poll ``predicate`` until it is true; fail with ``what`` after ``timeout_s`` (never a timing check)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.02)


def ps_entry(node: EmulatedNode, model: str) -> dict[str, Any] | None:
    """The node's ``/api/ps`` entry for ``model``, or None."""
    return next((m for m in node.loaded() if m["name"] == model), None)


def expires_year(entry: Mapping[str, Any]) -> int:
    """The year of an ``expires_at`` (RFC 3339 with up to 9 fraction digits)."""
    return int(datetime.fromisoformat(str(entry["expires_at"])[:19]).year)


def fully_on_gpu(node: EmulatedNode, model: str) -> bool:
    """True when ``model`` is loaded on ``node`` with all of it in VRAM."""
    e = ps_entry(node, model)
    return e is not None and e["size_vram"] == e["size"] and e["size"] > 0


def pinned_on_gpu(node: EmulatedNode, model: str) -> bool:
    """Fully on GPU and pinned (Ollama's "Forever": an expiry centuries ahead)."""
    e = ps_entry(node, model)
    return fully_on_gpu(node, model) and e is not None and expires_year(e) > 2300


def load_requests(node: EmulatedNode, model: str | None = None) -> list[dict[str, Any]]:
    """Bodies of mutating requests that load (keep_alive not 0), optionally for one model."""
    out = []
    for r in node.mutating_requests():
        body = r.body or {}
        if body.get("keep_alive") != 0 and (model is None or body.get("model") == model):
            out.append(body)
    return out


def unload_requests(node: EmulatedNode, model: str | None = None) -> list[dict[str, Any]]:
    """Bodies of ``keep_alive: 0`` requests, optionally for one model."""
    out = []
    for r in node.mutating_requests():
        body = r.body or {}
        if body.get("keep_alive") == 0 and (model is None or body.get("model") == model):
            out.append(body)
    return out


# --------------------------------------------------------------------------- sd_notify


@dataclass(frozen=True)
class Datagram:
    """One sd_notify message as received."""

    fields: dict[str, str]
    at_monotonic_s: float
    raw: str


class NotifyListener:
    """A real AF_UNIX datagram socket in the abstract namespace, standing in for systemd.

    A thread receives every datagram into :attr:`messages`; ``NOTIFY_SOCKET`` is :attr:`address`.
    """

    def __init__(self) -> None:
        self.name = f"gpu-router-test-{os.getpid()}-{uuid.uuid4().hex}"
        self.address = "@" + self.name
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.name)
        self._sock.settimeout(0.1)
        self._lock = threading.Lock()
        self._messages: list[Datagram] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            text = data.decode("utf-8")
            fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
            with self._lock:
                self._messages.append(Datagram(fields, time.monotonic(), text))

    @property
    def messages(self) -> list[Datagram]:
        """Every datagram so far, oldest first (a copy)."""
        with self._lock:
            return list(self._messages)

    def wait_for(
        self,
        predicate: Callable[[Datagram], bool],
        *,
        after: int = 0,
        timeout_s: float = WAIT_S,
        what: str = "",
    ) -> int:
        """Index of the first message from ``after`` on that matches; fails after ``timeout_s``."""
        found: list[int] = []

        def check() -> bool:
            msgs = self.messages
            for i in range(after, len(msgs)):
                if predicate(msgs[i]):
                    found.append(i)
                    return True
            return False

        try:
            wait_until(check, timeout_s, what or "an sd_notify message")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; got {[m.raw for m in self.messages[after:]]}") from None
        return found[0]

    def close(self) -> None:
        """Stop receiving and close the socket."""
        self._closed.set()
        self._thread.join(2.0)
        self._sock.close()


# --------------------------------------------------------------------------- the daemon as a process


def daemon_env(**extra: str | None) -> dict[str, str]:
    """The test's environment without systemd variables, plus ``extra`` (None removes a key)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "GPU_ROUTER_CONFIG")
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def start_daemon(
    args: Sequence[str], stderr_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``python -m gpu_router ARGS`` with stderr to ``stderr_path`` (a file, so it never blocks on a pipe)."""
    with open(stderr_path, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "gpu_router", *args],
            cwd=REPO_ROOT,
            env=dict(env) if env is not None else daemon_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def kill(proc: subprocess.Popen[bytes]) -> None:
    """Make sure a daemon process is gone (for ``finally`` blocks)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def run_cli(args: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m gpu_router ARGS`` to completion, capturing both streams."""
    return subprocess.run(
        [sys.executable, "-m", "gpu_router", *args],
        cwd=REPO_ROOT,
        env=dict(env) if env is not None else daemon_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def settle(daemon: Daemon, cycles: int = 1) -> None:
    """Run ``cycles`` reconciles, each waiting for the actions it started and taking in their results.

    The run loop takes results in on every wake-up; in-process tests have no loop, hence the one
    private call, which also records failures in the backoff.
    """
    for _ in range(cycles):
        daemon.reconcile()
        assert daemon.executor.wait_idle(WAIT_S), "actions still in flight"
        daemon.collect_results()
