"""Pulls of missing priority models, run apart from the nodes' unload/load sequences.

A pull can take an hour, and a load on the same node must not wait for it, so pulls do not go
through the executor: each runs in a thread of its own, at most one per node and at most
``max_concurrent_pulls`` in the cluster, with ``pull_timeout`` as its whole deadline and
:data:`PULL_IDLE_TIMEOUT_S` as the longest silence allowed in its stream. Progress comes from the
NDJSON status lines (``total``/``completed`` per digest, summed over the blobs seen so far), is
logged at most every 10%, and is read by the status API while the pull runs.

Stopping abandons the pulls in flight at once (their connections are cut): Ollama cancels a
download when its last client goes and keeps the parts it has (``blobDownload.release`` in
server/download.go@v0.30.0), so the next pull of that model resumes where this one stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from datetime import datetime, timezone
from typing import Any

from gpu_router.executor import wait_for_threads
from gpu_router.ollama import OllamaClient, OllamaError, PullStatus, PullStream
from gpu_router.planner import Action, ActionKind
from gpu_router.records import record
from gpu_router.state import GIB, MIB

log = logging.getLogger(__name__)

# The longest silence a pull stream may keep. Ollama sends a line every 60 ms while it downloads
# (blobDownload.Wait, server/download.go@v0.30.0), but nothing while it checks the digests of what
# it downloaded (PullModel, server/images.go@v0.30.0): minutes for the largest models on slow disks.
PULL_IDLE_TIMEOUT_S = 600.0


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def size_label(n: int) -> str:
    """Bytes as GiB (or MiB below one GiB), as the report shows sizes."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


@record
class PullProgress:
    """A pull in flight, as of its last status line."""

    node: str
    model: str
    reason: str
    started_at: datetime
    status: str  # Ollama's last status line ("pulling manifest", "pulling 6a0746a1ec1a", ...)
    completed_bytes: int
    total_bytes: int  # of the blobs announced so far; 0 before the first one

    @property
    def ratio(self) -> float | None:
        """Completed over total, None before the first blob is announced."""
        return min(1.0, self.completed_bytes / self.total_bytes) if self.total_bytes else None

    @property
    def label(self) -> str:
        """``pulling 42% of 4.4 GiB``, or Ollama's status before any size is known."""
        if not self.total_bytes:
            return self.status or "starting"
        return (
            f"pulling {_percent(self.completed_bytes, self.total_bytes)}% of {size_label(self.total_bytes)}"
        )

    def to_json(self, now: datetime) -> dict[str, Any]:
        """JSON-ready fields for the status API."""
        ratio = self.ratio
        return {
            "node": self.node,
            "model": self.model,
            "reason": self.reason,
            "started_at": self.started_at.isoformat(),
            "for_s": round(max(0.0, (now - self.started_at).total_seconds()), 1),
            "status": self.status,
            "completed_bytes": self.completed_bytes,
            "total_bytes": self.total_bytes,
            "completed_ratio": None if ratio is None else round(ratio, 4),
            "label": self.label,
        }


@record
class PullResult:
    """How one pull ended."""

    action: Action
    ok: bool
    detail: str  # "pulled 4.4 GiB", or Ollama's message / the transport's reason
    duration_s: float
    total_bytes: int = 0
    abandoned: bool = False  # cut short by a stop or a reload: not the node's fault, no backoff


class _Pull:
    """One pull's moving parts; its fields change under the manager's lock only."""

    def __init__(self, action: Action, started_at: datetime) -> None:
        self.action = action
        self.started_at = started_at
        self.status = "starting"
        self.blobs: dict[str, tuple[int, int]] = {}  # digest -> (total, completed)
        self.stream: PullStream | None = None
        self.aborted = False
        self.next_log_ratio = 0.1  # progress is logged at most once per 10%

    def totals(self) -> tuple[int, int]:
        """(completed, total) over the blobs seen so far."""
        return sum(c for _, c in self.blobs.values()), sum(t for t, _ in self.blobs.values())


class PullManager:
    """Runs pulls in threads of their own: one per node at a time, ``max_concurrent`` in all.

    The main loop starts pulls, takes in their results (``collect``) and reads their progress
    (``in_flight``, also from API threads); ``on_done`` is called from a pull's thread as it ends.
    """

    def __init__(
        self,
        *,
        max_concurrent: int,
        timeout_s: float,
        idle_timeout_s: float = PULL_IDLE_TIMEOUT_S,
        on_done: Callable[[], None] = lambda: None,
        wall_clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.max_concurrent = max_concurrent
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._on_done = on_done
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._pulls: dict[str, _Pull] = {}  # node -> its pull in flight
        self._threads: dict[str, threading.Thread] = {}
        self._results: list[PullResult] = []
        self._stopping = False

    def configure(self, *, max_concurrent: int, timeout_s: float) -> None:
        """New limits after a reload; pulls in flight keep the deadline they started with."""
        with self._lock:
            self.max_concurrent = max_concurrent
            self.timeout_s = timeout_s

    def start(self, action: Action, client: OllamaClient) -> str | None:
        """Start pulling ``action.model`` on ``action.node``; None when started, else why not."""
        if action.kind is not ActionKind.PULL:
            raise ValueError(f"not a pull: {action.kind.value}")
        with self._lock:
            if self._stopping:
                return "stopping"
            if action.node in self._pulls:
                busy = self._pulls[action.node].action.model
                return f"a pull of {busy} is in flight on {action.node}"
            if len(self._pulls) >= self.max_concurrent:
                return f"max_concurrent_pulls ({self.max_concurrent}) pulls are in flight"
            pull = _Pull(action, self._wall())
            t = threading.Thread(
                target=self._run,
                args=(pull, client, self.timeout_s),
                name=f"pull-{action.node}",
                daemon=True,
            )
            self._pulls[action.node] = pull
            self._threads[action.node] = t
        t.start()
        return None

    def pulling(self) -> frozenset[tuple[str, str]]:
        """(model, node) of every pull in flight, as the planner takes them."""
        with self._lock:
            return frozenset((p.action.model, node) for node, p in self._pulls.items())

    def in_flight(self) -> tuple[PullProgress, ...]:
        """Every pull in flight with its progress, in the order they started."""
        with self._lock:
            pulls = sorted(self._pulls.items(), key=lambda kv: kv[1].started_at)
            out = []
            for node, p in pulls:
                completed, total = p.totals()
                out.append(
                    PullProgress(
                        node, p.action.model, p.action.reason, p.started_at, p.status, completed, total
                    )
                )
            return tuple(out)

    def collect(self) -> list[PullResult]:
        """Results finished since the last call."""
        with self._lock:
            out, self._results = self._results, []
        return out

    def abandon(self, nodes: Collection[str] | None = None) -> list[str]:
        """Cut the pulls in flight on ``nodes`` (all when None); returns ``model on node`` of each."""
        cut = []
        with self._lock:
            for node, p in self._pulls.items():
                if nodes is not None and node not in nodes:
                    continue
                p.aborted = True
                if p.stream is not None:
                    p.stream.abort()
                cut.append(f"{p.action.model} on {node}")
        return cut

    def wait_idle(self, timeout_s: float, tick: Callable[[], object] = lambda: None) -> bool:
        """Wait for every pull in flight (calling ``tick`` between short waits); True when none is left."""
        return wait_for_threads(self._lock, self._threads, timeout_s, tick)

    def stop(self, grace_s: float) -> list[str]:
        """Start nothing new, abandon every pull in flight, and give their threads ``grace_s`` to end."""
        with self._lock:
            self._stopping = True
        cut = self.abandon()
        self.wait_idle(grace_s)
        return cut

    # -- one pull, in its thread

    def _run(self, pull: _Pull, client: OllamaClient, timeout_s: float) -> None:
        a = pull.action
        start = time.monotonic()
        ok, detail = False, ""
        try:
            stream = client.pull(
                a.model, timeout_s=timeout_s, idle_timeout_s=min(self.idle_timeout_s, timeout_s)
            )
            with self._lock:
                pull.stream = stream
                if pull.aborted:
                    stream.abort()
            for line in stream:
                self._progress(pull, line)
            ok = True
            detail = f"pulled {size_label(pull.totals()[1])}"
        except OllamaError as exc:
            detail = exc.message
        except Exception as exc:  # a bug here must end this pull, never the daemon
            log.exception("pull %s on %s: unexpected error", a.model, a.node)
            detail = f"{exc.__class__.__name__}: {exc}"
        finally:
            with self._lock:
                abandoned = pull.aborted and not ok
                if abandoned:
                    detail = "abandoned (the daemon is stopping, or the node left the configuration)"
                self._results.append(
                    PullResult(a, ok, detail, time.monotonic() - start, pull.totals()[1], abandoned)
                )
                self._pulls.pop(a.node, None)
                self._threads.pop(a.node, None)
            self._on_done()

    def _progress(self, pull: _Pull, line: PullStatus) -> None:
        with self._lock:
            pull.status = line.status or pull.status
            if line.digest and line.total_bytes:
                # Per digest: Ollama repeats a blob's line every 60 ms, with completed omitted while 0.
                pull.blobs[line.digest] = (line.total_bytes, min(line.completed_bytes or 0, line.total_bytes))
            completed, total = pull.totals()
            if not total or completed / total < pull.next_log_ratio or completed >= total:
                return
            percent = _percent(completed, total)
            # The next step above where it is now: a resumed pull that starts at 63% logs 63% once.
            pull.next_log_ratio = (percent // 10 + 1) / 10
        a = pull.action
        log.info("pull %s on %s: %d%% of %s", a.model, a.node, percent, size_label(total))


def _percent(completed: int, total: int) -> int:
    """Whole percent done, rounded down: 100 only when it is all there."""
    return min(100, completed * 100 // total) if total else 0
