"""Drive the daemon through a fault and check, afterwards, everything the fault suite promises.

A :class:`DaemonRun` is ``python -m gpu_router --config PATH`` under a stand-in for systemd: a real
AF_UNIX datagram ``NOTIFY_SOCKET`` this process reads, with ``WATCHDOG_USEC`` set, so every
``WATCHDOG=1``, ``STATUS=`` and ``STOPPING=1`` the daemon sends is seen with its arrival time.
:class:`InProcessRun` is the same for a ``Daemon`` run in a thread of this process, for faults that
can only be faked at an adapter seam (NVML). Both give the same checks:

- :func:`assert_watchdog_on_time`: no gap between consecutive pings (from ``READY=1`` to the stop)
  longer than the watchdog interval, i.e. systemd would never have killed the service;
- :func:`assert_cadence`: reconciles kept coming, none further apart than a check interval plus
  one observation deadline plus slack;
- :func:`assert_clean_log`: no traceback, no failed reconcile, no unexpected exception;
- :func:`assert_no_priority_unloaded`: no priority model was unloaded to make room (the emulators'
  own request records);
- :func:`assert_no_tight_loop`: no node got the same request more than a handful of times in any
  one second;
- :func:`assert_backed_off`: a failing (model, node) pair was logged as backing off and was not
  retried within the window;
- :func:`restore_pin`: a pin knocked out on a healthy node out-of-band comes back.

Bounds are generous on purpose (these machines are shared and noisy): each is several times what a
healthy run needs and far below what the fault did before it was fixed (a 40 s watchdog gap, a
loop that never returned, hundreds of requests a second).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon_helpers import (
    WAIT_S,
    Datagram,
    NotifyListener,
    daemon_env,
    pinned_on_gpu,
    start_daemon,
    unload_requests,
    wait_until,
)

from gpu_router.daemon import STOP_GRACE_S, Daemon
from gpu_router.emulator import EmulatedNode
from gpu_router.systemd import Notifier

WATCHDOG_USEC = 2_000_000
WATCHDOG_S = WATCHDOG_USEC / 1e6  # the daemon aims at half of it; a gap past it is a kill
# SIGTERM to exit: the stop grace for actions in flight, plus the interpreter's own exit.
STOP_LIMIT_S = STOP_GRACE_S + 3.0
# Slack for a shared 2-core machine on top of any interval the daemon promises.
SLACK_S = 1.5
# A loop retrying a request flat out sends hundreds a second; a healthy daemon with the fast
# settings below sends at most a few of each kind (watch every 0.3 s, reconcile every 0.5 s).
MAX_SAME_REQUESTS_PER_S = 12

# Fast cycles for the fault tests: every fault is met several times within a few seconds.
CHECK_INTERVAL_S = 0.5
FAST: dict[str, Any] = {
    "check_interval": f"{CHECK_INTERVAL_S}s",
    "watch_interval": "0.3s",
    "request_timeout": "1s",
    "load_timeout": "10s",
    "down_after": 2,
}
DEADLINE_S = 1.5  # request_timeout + the observer's 0.5 s slack, with FAST

_RECONCILE = re.compile(r"^reconcile #(\d+):")


def _has(key: str, value: str = "1") -> Callable[[Datagram], bool]:
    return lambda d: d.fields.get(key) == value


@dataclass(frozen=True)
class Stopped:
    """How a run ended."""

    rc: int | None  # None: did not exit (an in-process run that did not return)
    took_s: float


class _Run:
    """What both kinds of run share: the notify socket and the checks on what arrived there."""

    def __init__(self) -> None:
        self.listener = NotifyListener()
        self.ready_at: float | None = None
        self.stop_requested_at: float | None = None
        self.stopped: Stopped | None = None

    # -- what the daemon said ------------------------------------------------------------------

    def pings(self) -> list[float]:
        """Arrival times of every ``WATCHDOG=1``."""
        return [m.at_monotonic_s for m in self.listener.messages if m.fields.get("WATCHDOG") == "1"]

    def reconciles(self) -> list[tuple[int, float]]:
        """``(number, arrival time)`` of every reconcile STATUS."""
        out = []
        for m in self.listener.messages:
            found = _RECONCILE.match(m.fields.get("STATUS", ""))
            if found:
                out.append((int(found.group(1)), m.at_monotonic_s))
        return out

    def last_reconcile(self) -> int:
        """The number of the last reconcile that finished (0 before the first)."""
        done = self.reconciles()
        return done[-1][0] if done else 0

    def wait_reconciles(self, count: int, *, timeout_s: float = WAIT_S) -> int:
        """Wait until ``count`` more reconciles have finished; returns the last one's number."""
        target = self.last_reconcile() + count
        wait_until(lambda: self.last_reconcile() >= target, timeout_s, f"reconcile #{target}")
        return self.last_reconcile()

    def log_text(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()


class DaemonRun(_Run):
    """The daemon as systemd runs it: a process with ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC``."""

    def __init__(self, config: Path, workdir: Path, *, args: Sequence[str] = (), **env: str | None) -> None:
        super().__init__()
        self.config = config
        self.stderr_path = workdir / "daemon.log"
        env_all = daemon_env(
            NOTIFY_SOCKET=self.listener.address,
            WATCHDOG_USEC=str(WATCHDOG_USEC),
            PYTHONFAULTHANDLER="1",
            **env,
        )
        self.proc = start_daemon(["--config", str(config), *args], self.stderr_path, env_all)
        try:
            i = self.listener.wait_for(_has("READY"), what="READY=1")
        except AssertionError:
            self.kill()
            raise AssertionError(f"the daemon never got ready; its log:\n{self.log_text()}") from None
        self.ready_at = self.listener.messages[i].at_monotonic_s

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def peak_rss_bytes(self) -> int:
        """The process's peak resident memory so far (``VmHWM``), read while it runs."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc/PID/status")

    def threads(self) -> int:
        """The process's thread count now."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        raise AssertionError("no Threads in /proc/PID/status")

    def stop(self) -> Stopped:
        """SIGTERM, then the exit code and how long it took (killed after a generous limit)."""
        assert self.running(), f"the daemon exited on its own; its log:\n{self.log_text()}"
        self.stop_requested_at = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc: int | None = self.proc.wait(STOP_LIMIT_S * 3)
        except subprocess.TimeoutExpired:
            # Hung: SIGABRT makes faulthandler write every thread's stack to the log, for the report.
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(10)
            rc = None
        self.stopped = Stopped(rc, time.monotonic() - self.stop_requested_at)
        return self.stopped

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        super().close()


class _LogBuffer(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class InProcessRun(_Run):
    """A :class:`Daemon` run in a thread, for faults faked at an adapter seam in this process.

    Its notifier sends to the same kind of real socket (``WATCHDOG_PID`` is this process); a stop is
    what the SIGTERM handler does, ``request_stop``.
    """

    def __init__(self, make: Callable[[Notifier], Daemon]) -> None:
        super().__init__()
        env = {
            "NOTIFY_SOCKET": self.listener.address,
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "WATCHDOG_PID": str(os.getpid()),
        }
        self.notifier = Notifier(environ=env)
        self._logs = _LogBuffer()
        self._logger = logging.getLogger("gpu_router")
        self._old_level = self._logger.level
        self._logger.setLevel(logging.DEBUG)
        self._logger.addHandler(self._logs)
        self.daemon = make(self.notifier)
        self.rc: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="daemon-under-test", daemon=True)
        self._thread.start()
        i = self.listener.wait_for(_has("READY"), what="READY=1")
        self.ready_at = self.listener.messages[i].at_monotonic_s

    def _main(self) -> None:
        try:
            self.rc = self.daemon.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the checks, not lost in a thread
            self.error = exc

    def log_text(self) -> str:
        return "\n".join(self._logs.lines)

    def stop(self) -> Stopped:
        self.stop_requested_at = time.monotonic()
        self.daemon.request_stop()
        self._thread.join(STOP_LIMIT_S * 3)
        rc = None if self._thread.is_alive() else (1 if self.error is not None else self.rc)
        self.stopped = Stopped(rc, time.monotonic() - self.stop_requested_at)
        return self.stopped

    def close(self) -> None:
        if self._thread.is_alive():
            self.daemon.request_stop()
            self._thread.join(STOP_LIMIT_S * 3)
        self._logger.removeHandler(self._logs)
        self._logger.setLevel(self._old_level)
        self.notifier.close()
        super().close()


# ------------------------------------------------------------------------------------------------ checks


def assert_stopped_cleanly(run: _Run) -> None:
    """SIGTERM (or its handler) ended the daemon with 0 within the stop grace, after ``STOPPING=1``."""
    s = run.stopped if run.stopped is not None else run.stop()
    assert s.rc == 0, f"exit code {s.rc} after SIGTERM; log:\n{_tail(run.log_text(), 150)}"
    assert s.took_s <= STOP_LIMIT_S, f"SIGTERM took {s.took_s:.1f}s, over the {STOP_LIMIT_S:g}s limit"
    assert any(m.fields.get("STOPPING") == "1" for m in run.listener.messages), "no STOPPING=1"


def watchdog_gaps(run: _Run) -> list[float]:
    """Gaps between watchdog pings, from ``READY=1`` to the stop request (or now)."""
    assert run.ready_at is not None
    end = run.stop_requested_at if run.stop_requested_at is not None else time.monotonic()
    times = [run.ready_at, *(t for t in run.pings() if run.ready_at <= t <= end), end]
    return [b - a for a, b in itertools.pairwise(times)]


def assert_watchdog_on_time(run: _Run) -> None:
    """Every gap between pings was under ``WATCHDOG_USEC``: systemd would never have killed it."""
    gaps = watchdog_gaps(run)
    assert len(gaps) >= 3, f"only {len(gaps) - 1} watchdog pings: the run was too short to tell"
    worst = max(gaps)
    assert worst <= WATCHDOG_S, (
        f"a {worst:.2f}s gap between watchdog pings, over WATCHDOG_USEC ({WATCHDOG_S:g}s)"
    )


def assert_cadence(
    run: _Run, *, check_interval_s: float = CHECK_INTERVAL_S, deadline_s: float = DEADLINE_S
) -> None:
    """Reconciles kept coming: none further apart than an interval plus a deadline plus slack."""
    done = [t for _, t in run.reconciles() if run.stop_requested_at is None or t <= run.stop_requested_at]
    assert len(done) >= 2, f"only {len(done)} reconciles finished; log:\n{_tail(run.log_text())}"
    end = run.stop_requested_at if run.stop_requested_at is not None else time.monotonic()
    gaps = [b - a for a, b in itertools.pairwise([*done, end])]
    bound = check_interval_s + deadline_s + SLACK_S
    assert max(gaps) <= bound, f"reconciles {max(gaps):.1f}s apart, over {bound:g}s: the loop was held up"


def assert_clean_log(run: _Run) -> None:
    """No traceback, no failed reconcile, no exception an adapter should have turned into a reason."""
    text = run.log_text()
    for bad in ("Traceback", "unexpected ", "Exception"):
        assert bad not in text, f"{bad!r} in the daemon's log:\n{_around(text, bad)}"
    assert not re.search(r"reconcile #\d+ failed", text), _around(text, "failed;")
    if isinstance(run, InProcessRun):
        assert run.error is None, f"the daemon's run() raised {run.error!r}"


def assert_no_priority_unloaded(nodes: Iterable[EmulatedNode], priority: Iterable[str]) -> None:
    """No ``keep_alive: 0`` for a priority model on any node: never unloaded to make room."""
    wanted = set(priority)
    for n in nodes:
        hit = [b for b in unload_requests(n) if b.get("model") in wanted]
        assert hit == [], f"{n.name}: priority models unloaded: {hit}"


def assert_no_tight_loop(nodes: Iterable[EmulatedNode], per_s: int = MAX_SAME_REQUESTS_PER_S) -> None:
    """No node got the same (method, path) more than ``per_s`` times in any one second."""
    for n in nodes:
        by_kind: dict[tuple[str, str], list[float]] = {}
        for r in n.requests:
            by_kind.setdefault((r.method, r.path), []).append(r.at_monotonic_s)
        for kind, times in by_kind.items():
            worst = _most_in_window(sorted(times), 1.0)
            assert worst <= per_s, f"{n.name}: {worst} x {kind[0]} {kind[1]} within one second"


def assert_backed_off(run: _Run, node: EmulatedNode, model: str, *, most: int = 1) -> None:
    """The failing pair backed off (logged) and got at most ``most`` load attempts meanwhile."""
    text = run.log_text()
    assert f"not trying {model} on {node.name} again for" in text, _tail(text)
    loads = load_attempts(node, model)
    assert len(loads) <= most, f"{len(loads)} loads of {model} on {node.name}: it was not backed off"


def load_attempts(node: EmulatedNode, model: str) -> list[dict[str, Any]]:
    """Load requests (keep_alive not 0) for ``model`` on ``node``, faulted or not."""
    return [
        r.body
        for r in node.requests
        if r.method == "POST"
        and r.path in ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings")
        and (r.body or {}).get("model") == model
        and (r.body or {}).get("keep_alive") != 0
    ]


def restore_pin(run: _Run, node: EmulatedNode, model: str) -> None:
    """Unload a pinned model out-of-band on a healthy node; the daemon must put it back."""
    wait_until(lambda: pinned_on_gpu(node, model), what=f"{model} pinned on {node.name} first")
    node.unload(model)
    assert not pinned_on_gpu(node, model)
    try:
        wait_until(lambda: pinned_on_gpu(node, model), what=f"{model} pinned again on {node.name}")
    except AssertionError:
        text = _tail(run.log_text())
        raise AssertionError(f"the pin on healthy {node.name} was not restored:\n{text}") from None


def common_checks(
    run: _Run,
    nodes: Sequence[EmulatedNode],
    priority: Sequence[str],
    *,
    check_interval_s: float = CHECK_INTERVAL_S,
    deadline_s: float = DEADLINE_S,
) -> None:
    """What every fault test asserts after its fault: cadence, watchdog, log, no unloads, no loops, stop."""
    assert_stopped_cleanly(run)
    assert_watchdog_on_time(run)
    assert_cadence(run, check_interval_s=check_interval_s, deadline_s=deadline_s)
    assert_clean_log(run)
    assert_no_priority_unloaded(nodes, priority)
    assert_no_tight_loop(nodes)


# ------------------------------------------------------------------------------------------------ helpers


def _most_in_window(times: Sequence[float], window_s: float) -> int:
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] > window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _around(text: str, needle: str, lines: int = 8) -> str:
    all_lines = text.splitlines()
    for i, line in enumerate(all_lines):
        if needle in line:
            return "\n".join(all_lines[max(0, i - 2) : i + lines])
    return _tail(text)


def request_counts(node: EmulatedNode) -> Counter[str]:
    """How many requests of each path a node received."""
    return Counter(r.path for r in node.requests)
