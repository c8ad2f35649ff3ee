"""Gather a :class:`ClusterState` from every node at once, within one deadline.

Every call of a pass starts at once, and each ends one ``request_timeout`` after it began: a node
that has not answered by then counts as failed for this cycle, so one hung host (or a hundred) costs
one timeout and never holds up the loop, the watchdog or the other nodes. A small pass gives each
call a worker thread; a large one, and the watch, run on one selector (:class:`Loop`): each node's
reads go out without waiting, on its kept-alive connection or a new one, and are read once their
answer is whole, so a hung node costs a socket, not a thread. The pass waits for calls that began
late on a machine short of CPU, up to a second timeout. A node whose previous poll is still running
is not polled again, so threads never pile up.

A node's state is judged over its recent polls (:class:`NodeHealth`): ``up``; ``degraded`` when it
answers badly, or has missed fewer polls in a row than ``down_after`` (its last good picture is kept
meanwhile, marked stale); ``down`` after ``down_after`` polls without an answer, then polled with a
backoff that doubles up to ``check_interval``, so a dead host costs almost nothing.

Requests per node and cycle are kept to what is needed: ``/api/ps`` always; ``/api/tags`` when the
loaded set changed, after the daemon acted, and at least every ``TAGS_EVERY`` cycles; ``/api/version``
once (again after the node was down); ``/api/show`` once per model digest, ever (cached in the state
directory). A node's tags and version go out together with its ``/api/ps`` in a small pass (after it,
on the same connection, in a large one), and its ``/api/show`` calls as soon as its tags arrive.
"""

from __future__ import annotations

import _thread
import collections
import contextlib
import heapq
import itertools
import logging
import queue
import selectors
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from gpu_router.config import Config, NodeConfig
from gpu_router.gpus import GpuSource, make_gpu_source
from gpu_router.gpus.static import NoGpuSource, StaticSource, UnknownSource
from gpu_router.ollama import PS, TAGS, VERSION, NodeUnreachable, OllamaClient, OllamaError
from gpu_router.records import field, record, replace
from gpu_router.state import (
    ClusterState,
    GpuReading,
    InstalledModel,
    LoadedModel,
    ModelInfo,
    NodeState,
    NodeStatus,
    VramSource,
)
from gpu_router.store import InfoCache
from gpu_router.transport import Pending, StaleConnection
from gpu_router.wakeup import Cancel

if TYPE_CHECKING:
    from gpu_router.gpus.exporter import ExporterSource

log = logging.getLogger(__name__)

ClientFactory = Callable[[NodeConfig, float], OllamaClient]
GpuSourceFactory = Callable[[NodeConfig, float], GpuSource]

# Slack on top of request_timeout for the whole observation: thread hand-offs and parsing.
DEADLINE_SLACK_S = 0.5
# /api/tags is asked again at least this often (in observations) even when nothing seems to change,
# so a model pulled by hand onto a node is seen within TAGS_EVERY reconciles.
TAGS_EVERY = 10
# Up to this many calls in a pass, a node's tags and version go out beside its ps, each on its own
# connection and thread (one round trip). Beyond it, the pass runs on one selector (Loop) and asks them
# after the ps on the same kept-alive connection: from a few dozen nodes on, starting a thread per call
# costs more than a round trip on a LAN (50 nodes, 5 hung: 2.34 s against 2.43 s with threads, on 2
# cores), and a dead node is found by its ps alone.
SIDE_BY_SIDE_MAX_CALLS = 64
# Waiting on the nodes is cut into slices this long, so a stop request and the watchdog are served.
WAIT_SLICE_S = 0.25
# A loaded model can never hold more than this, whatever a node says (a sanity bound, 1 PiB).
ABSURD_BYTES = 2**50
# From this many calls in a pass the interpreter's switch interval is raised to COARSE_SWITCH_S
# while they run (see coarse_switching).
COARSE_SWITCH_FROM_CALLS = 64
COARSE_SWITCH_S = 0.05


@contextmanager
def coarse_switching(calls: int) -> Iterator[None]:
    """Raise the interpreter's thread switch interval while a pass of ``calls`` calls runs.

    With the default 5 ms, every thread waiting for the GIL asks the one holding it to let go each
    5 ms. Hundreds of threads reading answers at once then spend the machine's CPU handing the GIL
    around in the kernel: a 500-node report on 2 cores took 4 s of CPU instead of 2 (most of it
    system time), and answers that had arrived were read after the timeout, so healthy nodes came
    out down. A thread still lets go of the GIL whenever it waits on a socket, which is most of
    what these threads do. Process-wide, so set for the pass only, and put back after.
    """
    if calls < COARSE_SWITCH_FROM_CALLS:
        yield
        return
    before = sys.getswitchinterval()
    sys.setswitchinterval(max(before, COARSE_SWITCH_S))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


class Workers:
    """The threads that make one observer's calls: every call of a pass starts at once.

    ``ThreadPoolExecutor`` starts a thread inside ``submit`` and waits for it to run, behind the
    threads already parsing answers for the GIL: with hundreds of nodes the last node's first request
    left seconds after the first. Here a pass first makes sure there is an idle thread for each call
    it is about to queue (started without waiting for each to run), then queues them all. Threads stay
    for the next pass; they never outlive the process (a hung call must not hold up its exit).
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for a call
        self._queued = 0  # calls no thread has taken yet
        self._closed = False

    @property
    def threads(self) -> int:
        """Threads started and not stopped."""
        return self._threads

    def reserve(self, calls: int) -> None:
        """Start threads so that ``calls`` more calls queued now each find one idle."""
        with self._lock:
            missing = calls - (self._idle - self._queued)
            if self._closed or missing <= 0:
                return
            self._threads += missing
            self._idle += missing
        for _ in range(missing):
            _thread.start_new_thread(self._work, ())

    def submit(self, fn: Callable[..., Any], *args: Any, into: Future[Any] | None = None) -> Future[Any]:
        """Run ``fn(*args)`` on an idle thread (one is started if none is free); cancelled once closed.

        ``into``: a future handed out before the call was queued, to carry its outcome.
        """
        future: Future[Any] = Future() if into is None else into
        with self._lock:
            if self._closed:
                future.cancel()
                return future
            self._queued += 1
            short = self._queued > self._idle
            if short:
                self._threads += 1
                self._idle += 1
        if short:
            _thread.start_new_thread(self._work, ())
        self._queue.put((future, fn, args))
        return future

    def close(self) -> None:
        """Let every thread end once its call (if any) is done; calls still queued are cancelled."""
        with self._lock:
            self._closed = True
            threads = self._threads
        for _ in range(threads):
            self._queue.put(None)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            with self._lock:
                if item is None:
                    self._threads -= 1
                    self._idle -= 1
                    return
                self._queued -= 1
                self._idle -= 1
                closed = self._closed
            future, fn, args = item
            if closed:
                future.cancel()
            elif future.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, fn, args, item
            with self._lock:
                self._idle += 1


def _client(node: NodeConfig, timeout_s: float) -> OllamaClient:
    return OllamaClient(
        node.name,
        node.url,
        timeout_s=timeout_s,
        headers=node.headers,
        ca_file=node.ca_file,
        tls_verify=node.tls_verify,
    )


class NodeLinks:
    """The HTTP clients and GPU sources of one configuration.

    One owner for everything that talks to the nodes: the observer and the executor both use it,
    and a reload swaps it as one thing (the old one is closed once nothing in flight uses it).
    """

    def __init__(
        self,
        config: Config,
        *,
        client_factory: ClientFactory = _client,
        gpu_source_factory: GpuSourceFactory = make_gpu_source,
    ) -> None:
        timeout = config.request_timeout_s
        self.clients: dict[str, OllamaClient] = {n.name: client_factory(n, timeout) for n in config.nodes}
        self.gpu_sources: dict[str, GpuSource] = {
            n.name: gpu_source_factory(n, timeout) for n in config.nodes
        }

    def close(self) -> None:
        """Close every connection and GPU library handle."""
        for c in self.clients.values():
            c.close()
        for g in self.gpu_sources.values():
            g.close()


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


@record(frozen=False)
class _Track:
    """What :class:`NodeHealth` remembers about one node."""

    status: NodeStatus | None = None
    since_mono: float = 0.0
    since: datetime | None = None
    failures: int = 0  # consecutive failed polls
    next_poll: float = 0.0  # monotonic; only used while down
    backoff_s: float = 0.0
    last_good: NodeState | None = None


@record
class Judged:
    """One node's state after a poll, and whether it changed."""

    state: NodeState
    changed: bool
    recovered: bool  # was degraded or down, is up now


class NodeHealth:
    """The up/degraded/down state machine, with a grace before down and a backoff while down.

    Pure bookkeeping over poll results and a clock, so it is tested with a fake clock.
    """

    def __init__(
        self,
        *,
        down_after: int,
        backoff_start_s: float,
        backoff_cap_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.down_after = down_after
        self.backoff_start_s = max(0.1, min(backoff_start_s, backoff_cap_s))
        self.backoff_cap_s = max(self.backoff_start_s, backoff_cap_s)
        self._clock = clock
        self._wall = wall_clock
        self._tracks: dict[str, _Track] = {}

    def due(self, node: str) -> bool:
        """False while a down node waits out its backoff."""
        t = self._tracks.get(node)
        return t is None or t.status is not NodeStatus.DOWN or self._clock() >= t.next_poll

    def last(self, node: str) -> NodeState | None:
        """The node's last judged state (for nodes skipped by backoff)."""
        t = self._tracks.get(node)
        return t.last_good if t is not None and t.status is NodeStatus.UP else None

    def status(self, node: str) -> NodeStatus | None:
        """The node's current status, None before its first poll."""
        t = self._tracks.get(node)
        return t.status if t is not None else None

    def forget(self, keep: set[str]) -> None:
        """Drop nodes that left the configuration."""
        for name in list(self._tracks):
            if name not in keep:
                del self._tracks[name]

    def record(self, polled: NodeState, failure: OllamaError | None) -> Judged:
        """Judge a poll: ``polled`` is the fresh state (status UP) or, with ``failure``, a bare one."""
        t = self._tracks.setdefault(polled.name, _Track())
        now = self._clock()
        before = t.status
        if failure is None:
            t.failures = 0
            t.backoff_s = 0.0
            t.last_good = polled
            new_status, error, out = NodeStatus.UP, None, polled
        else:
            t.failures += 1
            unreachable = isinstance(failure, NodeUnreachable)
            error = failure.message
            if unreachable and t.failures >= self.down_after:
                new_status = NodeStatus.DOWN
                t.backoff_s = (
                    self.backoff_start_s
                    if before is not NodeStatus.DOWN
                    else min(self.backoff_cap_s, t.backoff_s * 2)
                )
                t.next_poll = now + t.backoff_s
            else:
                new_status = NodeStatus.DEGRADED
            if new_status is NodeStatus.DEGRADED and t.failures < self.down_after and t.last_good is not None:
                # Within the grace: keep the last good picture, marked stale, so one lost answer
                # neither hides the models there nor makes the planner fail them over.
                g = t.last_good
                out = replace(g, status=new_status, error=error, stale=True, poll_s=polled.poll_s)
                if unreachable:
                    left = self.down_after - t.failures
                    out = replace(
                        out, error=f"{error} (down after {left} more failed poll{'s' * (left > 1)})"
                    )
            else:
                out = replace(polled, status=new_status, error=error)
        changed = before is not new_status
        if changed:
            self._log_change(polled.name, before, new_status, out.error, now - t.since_mono, t.failures)
            t.status, t.since_mono, t.since = new_status, now, self._wall()
        out = replace(out, state_since=t.since)
        if new_status is not NodeStatus.UP:
            t.last_good = t.last_good if t.failures < self.down_after else None
        return Judged(out, changed, changed and new_status is NodeStatus.UP and before is not None)

    def skipped(self, node: NodeConfig) -> NodeState:
        """The state of a down node not polled this time (backoff)."""
        t = self._tracks[node.name]
        wait = max(0.0, t.next_poll - self._clock())
        return NodeState(
            node.name,
            node.url,
            NodeStatus.DOWN,
            error=f"no answer; next try in {_duration(wait)}",
            state_since=t.since,
        )

    @staticmethod
    def _log_change(
        name: str,
        before: NodeStatus | None,
        after: NodeStatus,
        error: str | None,
        lasted_s: float,
        failures: int,
    ) -> None:
        if before is None:
            if after is not NodeStatus.UP:
                log.warning("node %s is %s: %s", name, after.value, error)
            return
        was = f"was {before.value} for {_duration(lasted_s)}"
        if after is NodeStatus.UP:
            log.warning("node %s is up again (%s)", name, was)
        elif after is NodeStatus.DOWN:
            log.warning("node %s is down after %d failed polls: %s (%s)", name, failures, error, was)
        else:
            log.warning("node %s is degraded: %s (%s)", name, error, was)


@record(frozen=False)
class _Polled:
    """A node's raw answers, as its worker gathered them."""

    loaded: tuple[LoadedModel, ...]
    installed: tuple[InstalledModel, ...]
    version: str | None
    shows: dict[tuple[str, str], Future[ModelInfo | None]] = field(default_factory=dict)


def sanitize_loaded(
    loaded: tuple[LoadedModel, ...], total_vram_bytes: int | None
) -> tuple[tuple[LoadedModel, ...], tuple[str, ...], frozenset[str]]:
    """Reject /api/ps entries that cannot be true and merge duplicates.

    Returns the entries kept, one warning per problem, and the models whose entries could not be
    believed (the planner takes no action on those there, and nothing is learned from them).
    Duplicates (one model listed twice) are merged by keeping the entry that expires last, as the
    one Ollama would keep serving.
    """
    kept: dict[str, LoadedModel] = {}
    warnings: list[str] = []
    suspect: set[str] = set()
    counts: dict[str, int] = {}
    far = datetime.max.replace(tzinfo=timezone.utc)
    for m in loaded:
        problem = None
        if m.size_bytes < 0 or m.vram_bytes < 0:
            problem = "a negative size"
        elif m.vram_bytes > m.size_bytes:
            problem = "size_vram larger than size"
        elif m.size_bytes > ABSURD_BYTES or (
            total_vram_bytes is not None and m.vram_bytes > total_vram_bytes
        ):
            problem = "more VRAM than the node has" if m.size_bytes <= ABSURD_BYTES else "an impossible size"
        if problem is not None:
            warnings.append(f"/api/ps entry for {m.name} ignored: {problem}")
            suspect.add(m.name)
            continue
        counts[m.name] = counts.get(m.name, 0) + 1
        other = kept.get(m.name)
        if other is None or (m.expires_at or far) > (other.expires_at or far):
            kept[m.name] = m
    for name, n in counts.items():
        if n > 1:
            warnings.append(f"/api/ps lists {name} {n} times; kept the entry that expires last")
    return tuple(kept.values()), tuple(warnings), frozenset(suspect)


class Observer:
    """Polls the nodes of one configuration; build a new one when the config changes."""

    def __init__(
        self,
        config: Config,
        *,
        links: NodeLinks | None = None,
        client_factory: ClientFactory = _client,
        gpu_source_factory: GpuSourceFactory = make_gpu_source,
        info_cache: InfoCache | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._clock = clock
        self._mono = monotonic
        self._own_links = links is None
        self.links = links or NodeLinks(
            config, client_factory=client_factory, gpu_source_factory=gpu_source_factory
        )
        self.clients = self.links.clients
        self.gpu_sources = self.links.gpu_sources
        # A thread for every call of a pass, so no node waits for a free one whatever the others do.
        self._pool = Workers()
        self._info = info_cache if info_cache is not None else InfoCache(None)
        self._shows: dict[tuple[str, str], Future[ModelInfo | None]] = {}
        self._lock = threading.Lock()
        # Asked once per node and again only after the node was unreachable (it may have been upgraded).
        self._versions: dict[str, str] = {}
        self._tags: dict[str, tuple[InstalledModel, ...]] = {}
        self._tags_age: dict[str, int] = {}
        self._ps_seen: dict[str, frozenset[tuple[str, str]]] = {}
        self._refresh_tags: set[str] = set()
        self._busy: dict[str, Future[_Polled]] = {}  # node -> a poll still running past its deadline
        watch = config.watch_interval_s if config.watch_interval_s > 0 else config.check_interval_s
        self.health = NodeHealth(
            down_after=config.down_after,
            backoff_start_s=watch,
            backoff_cap_s=config.check_interval_s,
            clock=monotonic,
            wall_clock=clock,
        )

    @property
    def deadline_s(self) -> float:
        """How long one observation (or watch) may take, whatever the nodes do."""
        return self.config.request_timeout_s + DEADLINE_SLACK_S

    def close(self) -> None:
        """Stop the workers; close the connections when this observer made them."""
        self._pool.close()
        if self._own_links:
            self.links.close()
        self._info.save()

    def refresh_tags(self, nodes: set[str] | None = None) -> None:
        """Ask ``/api/tags`` of these nodes (all when None) in the next observation: the daemon acted."""
        self._refresh_tags |= set(self.clients) if nodes is None else nodes

    # ------------------------------------------------------------------ observe

    def observe(
        self, *, cancel: Cancel | None = None, tick: Callable[[], object] | None = None
    ) -> ClusterState:
        """Poll every node and GPU source concurrently; never raises for a node's failure.

        Returns one ``request_timeout`` (plus slack) after the last poll began, and never later than
        two, whatever the nodes do; or soon after ``cancel`` is set. ``tick`` is called while
        waiting (the daemon pings the systemd watchdog from it).
        """
        start = self._mono()
        deadline = start + self.deadline_s
        # When each poll's latest call began (it ends one request_timeout later, see _poll_steps). A poll
        # that got its thread late, on a machine short of CPU, is waited for, up to a second
        # timeout: slow here is not down there.
        ends: dict[str, float] = {}
        cap = deadline + self.config.request_timeout_s

        def until() -> float:
            return min(cap, max(deadline, max(ends.values(), default=start) + DEADLINE_SLACK_S))

        polls: dict[str, Future[_Polled] | None] = {}
        gpus: dict[str, Future[GpuReading] | GpuReading | None] = {}
        # Every call of the pass goes out at once: count them, have a thread ready for each, queue.
        fresh: list[tuple[NodeConfig, bool, bool]] = []
        calls = 0
        for n in self.config.nodes:
            if not self.health.due(n.name):
                polls[n.name] = gpus[n.name] = None  # down and backing off: costs nothing this time
                continue
            if _no_io(self.gpu_sources[n.name]):
                gpus[n.name] = self._read_gpu(n.name)
            else:
                calls += 1
            busy = self._busy.get(n.name)
            if busy is not None and not busy.done():
                polls[n.name] = busy  # still running from last time: wait for it, start nothing new
                continue
            need_tags = self._tags_due(n.name)
            need_version = n.name not in self._versions
            fresh.append((n, need_tags, need_version))
            calls += 1 + need_tags + need_version
        side_by_side = calls <= SIDE_BY_SIDE_MAX_CALLS
        # A large pass runs its polls and exporter scrapes on one selector (Loop); threads only for
        # the other GPU sources, the shows, and what the loop cannot do without waiting (TLS, names).
        loop = None if side_by_side else Loop(self._pool)
        threaded = calls
        # Each GPU source read in this pass (the due nodes' with I/O, not yet in ``gpus``): the exporters
        # the loop scrapes itself, None for those read in a worker.
        scrapes: dict[str, _Scrape | None] = {}
        if loop is not None:
            reads = [n.name for n in self.config.nodes if n.name not in gpus]
            scrapes = {name: _Scrape.of(name, self.gpu_sources[name]) for name in reads}
            # Only the calls that end up in threads make the switch interval matter.
            threaded = sum(not self.clients[n.name].selectable for n, _, _ in fresh)
            threaded += sum(s is None for s in scrapes.values())
        with coarse_switching(threaded):
            try:
                if loop is None:
                    self._pool.reserve(calls)
                # Every node's ps goes out first, its tags and version after: a hung node is found by
                # its ps, whose timeout runs from when it starts, so a late start is a late answer.
                beside: list[tuple[Future[Any], Callable[..., Any], str | None]] = []
                for n, need_tags, need_version in fresh:
                    if loop is not None:
                        steps = self._poll_steps(n, ends, None, None, need_tags, need_version)
                        polls[n.name] = self._busy[n.name] = loop.add(
                            n.name, self.clients[n.name], steps, late=self._late
                        )
                        continue
                    tags_f: Future[Any] | None = None
                    version_f: Future[Any] | None = None
                    if need_tags:
                        tags_f = Future()
                        beside.append((tags_f, self._tags_and_shows, n.name))
                    if need_version:
                        version_f = Future()
                        beside.append((version_f, self.clients[n.name].version, None))
                    # The poll's reads one after another in a worker (its first runs there too).
                    steps = self._poll_steps(n, ends, tags_f, version_f)
                    polls[n.name] = self._busy[n.name] = self._pool.submit(
                        _drive, self.clients[n.name], steps
                    )
                for carrier, fn, arg in beside:
                    self._pool.submit(fn, *(() if arg is None else (arg,)), into=carrier)
                for n in self.config.nodes:
                    if polls.get(n.name) is not None and n.name not in gpus:
                        scrape = scrapes.get(n.name)
                        if loop is not None and scrape is not None:
                            gpus[n.name] = loop.add(n.name, scrape, _one("/metrics"))
                        else:
                            gpus[n.name] = self._pool.submit(self._read_gpu, n.name)
                waited = [f for f in polls.values() if f is not None]
                if loop is not None:
                    loop.run(waited, until, self._mono, cancel, tick)
                self._wait(waited, until, cancel, tick)
                # Then, within what is left, the GPU readings of the nodes that answered (a dead node's
                # exporter is no use) and the /api/show calls each node started as soon as its tags came.
                answered = [
                    name for name, p in polls.items() if p is not None and p.done() and p.exception() is None
                ]
                rest: list[Future[Any]] = [f for name in answered if isinstance(f := gpus[name], Future)]
                for name in answered:
                    p = polls[name]
                    assert p is not None
                    rest.extend(p.result().shows.values())
                if loop is not None:
                    loop.run(rest, until, self._mono, cancel, tick)
                if rest:
                    self._wait(rest, until, cancel, tick)
            finally:
                if loop is not None:
                    loop.close()
        nodes = []
        for n in self.config.nodes:
            future, gpu_future = polls[n.name], gpus[n.name]
            if future is None or gpu_future is None:
                nodes.append(self.health.skipped(n))
                continue
            gpu = (
                gpu_future
                if isinstance(gpu_future, GpuReading)
                else self._gpu_result(gpu_future, waited=n.name in answered)
            )
            nodes.append(self._judge(n, future, gpu, self._mono() - start).state)
        self.health.forget({n.name for n in self.config.nodes})
        self._info.save()
        return ClusterState(tuple(nodes), observed_at=self._clock())

    def _wait(
        self,
        futures: Sequence[Future[Any]],
        deadline: float | Callable[[], float],
        cancel: Cancel | None,
        tick: Callable[[], object] | None,
    ) -> None:
        """Wait for ``futures`` until the deadline (or what it says now), in short slices so cancel
        and tick are served."""
        pending = list(futures)
        while pending:
            # Before each slice, not after: the first call comes while the nodes are first asked
            # (a one-shot command does its own imports there; see cli._observe).
            if tick is not None:
                tick()
            left = (deadline() if callable(deadline) else deadline) - self._mono()
            if left <= 0 or (cancel is not None and cancel.is_set()):
                return
            _, not_done = wait_futures(pending, timeout=min(left, WAIT_SLICE_S))
            pending = list(not_done)

    def _late(self, node: str) -> NodeUnreachable:
        return NodeUnreachable(node, f"no answer within the observation deadline of {self.deadline_s:g}s")

    def _judge(self, node: NodeConfig, future: Future[_Polled], gpu: GpuReading, took_s: float) -> Judged:
        bare = NodeState(node.name, node.url, NodeStatus.UP, gpu=gpu, poll_s=took_s)
        failure: OllamaError | None = None
        polled: _Polled | None = None
        if not future.done():
            failure = self._late(node.name)
        elif (exc := future.exception()) is not None:
            failure = exc if isinstance(exc, OllamaError) else OllamaError(node.name, _bug(exc))
        else:
            polled = future.result()
        if failure is not None:
            judged = self.health.record(bare, failure)
            if judged.state.status is NodeStatus.DOWN:
                self._versions.pop(node.name, None)  # it may come back upgraded
            return replace(judged, state=replace(judged.state, gpu=gpu))
        assert polled is not None
        total = gpu.total_bytes if gpu.gpus else None
        loaded, warnings, suspect = sanitize_loaded(polled.loaded, total)
        for w in warnings:
            log.warning("node %s: %s", node.name, w)
        infos: dict[str, ModelInfo] = {}
        digests = {m.name: m.digest for m in polled.installed}
        for m in loaded:
            digests.setdefault(m.name, m.digest)
        for name, digest in digests.items():
            found = self._info.get(digest) if digest else None
            if found is not None:
                infos[name] = found if found.name == name else replace(found, name=name)
        fresh = replace(
            bare,
            version=polled.version,
            loaded=loaded,
            installed=polled.installed,
            info=MappingProxyType(infos),
            warnings=warnings,
            suspect=suspect,
        )
        return self.health.record(fresh, None)

    def _tags_due(self, node: str) -> bool:
        return (
            node in self._refresh_tags
            or node not in self._tags
            or self._tags_age.get(node, 0) >= TAGS_EVERY - 1
        )

    def _poll_steps(
        self,
        node: NodeConfig,
        ends: dict[str, float],
        tags_f: Future[tuple[tuple[InstalledModel, ...], dict[tuple[str, str], Future[ModelInfo | None]]]]
        | None,
        version_f: Future[str] | None,
        tags_here: bool = False,
        version_here: bool = False,
    ) -> Steps:
        """One node's answers: ps, its tags and version when due, and its shows.

        Yields each read it needs (``OllamaClient.get``'s path) and is sent its answer; a read's
        failure ends the poll. Tags and version come as futures already asked beside the ps, or
        (``*_here``, in a large pass) are read after it on the same connection.
        """
        timeout = self.config.request_timeout_s

        def begins() -> None:
            # Each call has request_timeout from its own start; the pass waits for the last one.
            ends[node.name] = self._mono() + timeout

        begins()
        loaded: tuple[LoadedModel, ...] = yield PS
        seen = frozenset((m.name, m.digest) for m in loaded)
        moved = seen != self._ps_seen.get(node.name)
        shows: dict[tuple[str, str], Future[ModelInfo | None]] = {}
        found = None
        if tags_here or (tags_f is None and moved):
            # Due, or the loaded set moved (the disk may have too).
            begins()
            listed: tuple[InstalledModel, ...] = yield TAGS
            found = listed, self._shows_for(node.name, listed)
        elif tags_f is not None:
            found = tags_f.result()
        if found is not None:
            installed, shows = found
            self._tags[node.name] = installed
            self._tags_age[node.name] = 0
            self._refresh_tags.discard(node.name)
        else:
            installed = self._tags[node.name]
            self._tags_age[node.name] = self._tags_age.get(node.name, 0) + 1
        self._ps_seen[node.name] = seen
        if version_here:
            begins()
            self._versions[node.name] = yield VERSION
        elif version_f is not None:
            self._versions[node.name] = version_f.result()
        polled = _Polled(loaded, installed, self._versions.get(node.name), shows)
        # A loaded model missing from the tags (a cloud model, a tags answer from before its pull).
        on_disk = {m.name for m in installed}
        self._ask_shows(node.name, [(m.name, m.digest) for m in loaded if m.name not in on_disk], shows)
        return polled

    def _tags_and_shows(
        self, node: str
    ) -> tuple[tuple[InstalledModel, ...], dict[tuple[str, str], Future[ModelInfo | None]]]:
        """The node's tags, and a show for each model not in the cache, sent as soon as the tags arrive.

        The shows keep their own timeout: what they bring is cached for later passes too.
        """
        installed = self.clients[node].tags()
        return installed, self._shows_for(node, installed)

    def _shows_for(
        self, node: str, installed: Sequence[InstalledModel]
    ) -> dict[tuple[str, str], Future[ModelInfo | None]]:
        shows: dict[tuple[str, str], Future[ModelInfo | None]] = {}
        self._ask_shows(node, [(m.name, m.digest) for m in installed], shows)
        return shows

    def _ask_shows(
        self,
        node: str,
        models: Sequence[tuple[str, str]],
        into: dict[tuple[str, str], Future[ModelInfo | None]],
    ) -> None:
        """Ask /api/show for models whose digest is not cached (once per digest across the cluster)."""
        for key in models:
            name, digest = key
            if not digest or self._info.get(digest) is not None or key in into:
                continue
            with self._lock:
                f = self._shows.get(key)
                if f is None or (f.done() and f.result() is None):
                    f = self._shows[key] = self._pool.submit(self._show, node, name, digest)
            into[key] = f

    def _show(self, node: str, model: str, digest: str) -> ModelInfo | None:
        try:
            info = self.clients[node].show(model)
        except OllamaError as exc:
            # Sizing falls back to the file size; the next cycle asks again.
            log.warning("node %s: /api/show %s failed: %s", node, model, exc.message)
            return None
        self._info.put(digest, info)
        return info

    def _read_gpu(self, name: str) -> GpuReading:
        return _reading(name, self.gpu_sources[name].read)

    def _gpu_result(self, future: Future[GpuReading], *, waited: bool) -> GpuReading:
        if not future.done():
            # Only a node that answered is waited for: say which of the two this is, so a
            # refused node is not reported with an exporter that "timed out" in a tenth of a second.
            why = f"did not answer within {self.deadline_s:g}s" if waited else "not waited for (node failed)"
            return GpuReading(VramSource.UNKNOWN, (), error=f"GPU source {why}")
        return future.result()  # _read_gpu never raises

    # ------------------------------------------------------------------ watch

    def watch(
        self, *, cancel: Cancel | None = None, tick: Callable[[], object] | None = None
    ) -> dict[str, tuple[LoadedModel, ...] | OllamaError]:
        """Only ``/api/ps`` of every due node, within one deadline: the cheap check between reconciles.

        Nodes skipped by their down backoff are left out of the result.
        """
        deadline = self._mono() + self.deadline_s
        loop = Loop(self._pool)
        futures: dict[str, Future[tuple[LoadedModel, ...]]] = {}

        def late(name: str) -> NodeUnreachable:
            return NodeUnreachable(name, f"GET /api/ps: no answer within {self.deadline_s:g}s")

        try:
            for name, client in self.clients.items():
                if self.health.due(name):
                    futures[name] = loop.add(name, client, _one(PS), late=late)
            loop.run(list(futures.values()), lambda: deadline, self._mono, cancel, tick)
        finally:
            loop.close()
        out: dict[str, tuple[LoadedModel, ...] | OllamaError] = {}
        urls = {n.name: n.url for n in self.config.nodes}
        for name, fut in futures.items():
            result: tuple[LoadedModel, ...] | OllamaError
            if (exc := fut.exception()) is not None:
                result = exc if isinstance(exc, OllamaError) else OllamaError(name, _bug(exc))
            else:
                result = fut.result()
            if isinstance(result, OllamaError):
                # Counted like a failed poll: enough in a row and the node is down (then polled with
                # backoff). A good answer is judged by the reconcile the watch then asks for.
                judged = self.health.record(NodeState(name, urls[name], NodeStatus.UP), result)
                if judged.state.status is NodeStatus.DOWN:
                    self._versions.pop(name, None)
            out[name] = result
        return out


Steps = Generator[str, Any, Any]


class Reads(Protocol):
    """What a :class:`Loop` polls: an :class:`OllamaClient`, or a GPU exporter (:class:`_Scrape`)."""

    def get(self, path: str) -> Any: ...

    def start_get(self, path: str, *, connect: bool = False) -> Pending | None: ...

    def finish_get(self, path: str, pending: Pending) -> Any: ...


def _drive(client: Reads, steps: Steps) -> Any:
    """Run a poll's reads one after another in this thread; what the poll returns (or raises)."""
    path = next(steps)
    while True:
        try:
            path = steps.send(client.get(path))
        except StopIteration as stop:
            return stop.value


def _one(path: str) -> Steps:
    """A poll of one read: the watch's ps, an exporter's scrape."""
    answer = yield path
    return answer


class _Scrape:
    """A GPU exporter as :class:`Reads`: its one read is the scrape, its answer a GpuReading."""

    def __init__(self, node: str, source: ExporterSource) -> None:
        self.node = node
        self.source = source

    @staticmethod
    def of(node: str, source: GpuSource) -> _Scrape | None:
        """The node's source as a scrape, when it is an exporter the loop can ask (the rest read in
        a worker)."""
        from gpu_router.gpus.exporter import ExporterSource

        return _Scrape(node, source) if isinstance(source, ExporterSource) and source.selectable else None

    def get(self, path: str) -> GpuReading:
        return _reading(self.node, self.source.read)

    def start_get(self, path: str, *, connect: bool = False) -> Pending | None:
        return self.source.start(connect=connect)

    def finish_get(self, path: str, pending: Pending) -> GpuReading:
        return _reading(self.node, partial(self.source.finish, pending))


def _reading(node: str, read: Callable[[], GpuReading]) -> GpuReading:
    """``read()``, or what a source's bug comes to: no figures, and why (it must not take the node down)."""
    try:
        return read()
    except StaleConnection:
        raise  # not a bug: the loop asks again
    except Exception as exc:  # noqa: BLE001
        log.warning("node %s: GPU source failed: %s", node, exc)
        return GpuReading(VramSource.UNKNOWN, (), error=f"GPU source failed: {exc}")


class _Run:
    """One poll in a :class:`Loop`: its reads, the one under way, where its result goes."""

    __slots__ = ("client", "future", "late", "name", "path", "pending", "steps")

    def __init__(
        self, name: str, client: Reads, steps: Steps, late: Callable[[str], Exception] | None
    ) -> None:
        self.name = name
        self.client = client
        self.steps = steps
        self.late = late
        self.future: Future[Any] = Future()
        self.path = ""
        self.pending: Pending | None = None


class Loop:
    """Many polls driven from one thread: each read goes out at once, on a kept-alive connection or
    a new one connecting without waiting, and its answer is read here once it has arrived whole.

    Hundreds of threads each blocked on one node cost a 2-core machine more than the answers do:
    starting them, and handing the interpreter's lock around while they parse. Here a hung node
    costs a registered socket until its read's deadline, and every read of a pass starts within
    milliseconds of the first. What cannot be read without waiting goes to a worker thread and comes
    back when done: a connection that needs TLS or a name lookup, an answer arriving in pieces, a
    kept-alive connection the node had closed.
    """

    def __init__(self, pool: Workers) -> None:
        import socket

        self._pool = pool
        self._selector = selectors.DefaultSelector()
        self._runs: set[_Run] = set()
        self._dues: list[tuple[float, int, _Run, Pending]] = []
        self._order = itertools.count()
        # Workers hand their results back through this, and wake the selector with a byte.
        self._back: collections.deque[tuple[_Run, Future[Any]]] = collections.deque()
        self._wake_in, self._wake_out = socket.socketpair()
        for end in (self._wake_in, self._wake_out):
            end.setblocking(False)
        self._selector.register(self._wake_in, selectors.EVENT_READ, None)

    def add(
        self, name: str, client: Reads, steps: Steps, *, late: Callable[[str], Exception] | None = None
    ) -> Future[Any]:
        """Start a poll; its future gets what it returns or raises.

        One still running at :meth:`close` ends with ``late(name)``, or stays not done without it.
        """
        run = _Run(name, client, steps, late)
        self._runs.add(run)
        self._advance(run, None)
        return run.future

    def run(
        self,
        futures: Sequence[Future[Any]],
        until: Callable[[], float],
        mono: Callable[[], float],
        cancel: Cancel | None,
        tick: Callable[[], object] | None,
    ) -> None:
        """Drive the polls until ``futures`` are done, ``until()`` (by ``mono``) has passed, or cancel.

        Polls not in ``futures`` go on meanwhile (and in a later call).
        """
        waiting = [f for f in futures if not f.done()]
        while waiting:
            if tick is not None:
                tick()
            left = until() - mono()
            if left <= 0 or (cancel is not None and cancel.is_set()):
                return
            self._expire()
            if self._dues:
                left = min(left, self._dues[0][0] - time.monotonic())
            for key, _ in self._selector.select(max(0.0, min(left, WAIT_SLICE_S))):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        self._wake_in.recv(4096)
                else:
                    self._ready(key.data, key.fileobj)  # type: ignore[arg-type]
            while self._back:
                run, done = self._back.popleft()
                if run in self._runs:
                    try:
                        answer = done.result()
                    except BaseException as exc:  # noqa: BLE001 - cancelled too (the workers closed)
                        self._end(run, exc)
                    else:
                        self._advance(run, answer)
            waiting = [f for f in waiting if not f.done()]

    def close(self) -> None:
        """End the polls still running (see :meth:`add`), close their connections and the selector."""
        for run in list(self._runs):
            if run.pending is not None:
                # Also after a bug left it half-registered: close must not raise over the bug's traceback.
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(run.pending)
                run.pending.abandon()
            self._runs.discard(run)
            run.steps.close()
            if run.late is not None:
                run.future.set_exception(run.late(run.name))
        self._selector.close()
        self._wake_in.close()
        self._wake_out.close()

    # -- one read at a time per poll -------------------------------------------------------------------

    def _advance(self, run: _Run, answer: Any) -> None:
        try:
            run.path = run.steps.send(answer)
        except StopIteration as stop:
            self._runs.discard(run)
            run.future.set_result(stop.value)
            return
        except Exception as exc:  # noqa: BLE001 - the poll's own failure, for whoever reads the future
            self._end(run, exc)
            return
        pending = run.client.start_get(run.path, connect=True)
        if pending is None:
            self._hand(run, partial(run.client.get, run.path))
            return
        run.pending = pending
        self._selector.register(pending, pending.events, run)
        heapq.heappush(self._dues, (pending.due, next(self._order), run, pending))

    def _ready(self, run: _Run, pending: Pending) -> None:
        if pending.connecting:
            pending.connected()
            if not pending.complete():
                self._selector.modify(pending, pending.events, run)
                return
        elif not pending.complete():
            # Part of an answer: a worker reads the rest, where waiting is fine.
            self._selector.unregister(pending)
            self._hand(run, partial(_finish, run.client, run.path, pending))
            return
        self._selector.unregister(pending)
        self._take(run, pending)

    def _expire(self) -> None:
        """Finish the reads past their deadline: they time out without waiting."""
        now = time.monotonic()
        while self._dues and self._dues[0][0] <= now:
            _, _, run, pending = heapq.heappop(self._dues)
            if run.pending is not pending:
                continue  # answered already
            if pending.due > now:  # connected since: its request's own deadline now
                heapq.heappush(self._dues, (pending.due, next(self._order), run, pending))
                continue
            self._selector.unregister(pending)
            self._take(run, pending)

    def _take(self, run: _Run, pending: Pending) -> None:
        run.pending = None
        try:
            answer = run.client.finish_get(run.path, pending)
        except StaleConnection:
            self._hand(run, partial(run.client.get, run.path))  # connects: not in this thread
            return
        except Exception as exc:  # noqa: BLE001 - the node's failure, read like a worker's
            self._end(run, exc)
            return
        self._advance(run, answer)

    def _hand(self, run: _Run, call: Callable[[], Any]) -> None:
        run.pending = None
        self._pool.submit(call).add_done_callback(partial(self._handed_back, run))

    def _handed_back(self, run: _Run, done: Future[Any]) -> None:
        # In the worker's thread.
        self._back.append((run, done))
        with contextlib.suppress(OSError):  # full: the loop is awake anyway; closed: it is over
            self._wake_out.send(b"\0")

    def _end(self, run: _Run, exc: BaseException) -> None:
        self._runs.discard(run)
        run.steps.close()
        run.future.set_exception(exc)


def _finish(client: Reads, path: str, pending: Pending) -> Any:
    """Read a started call's answer where waiting is fine; a stale connection is asked again."""
    try:
        return client.finish_get(path, pending)
    except StaleConnection:
        return client.get(path)


def _no_io(source: GpuSource) -> bool:
    """A source that answers from the config: read in the pass itself, no thread needed."""
    return isinstance(source, (StaticSource, NoGpuSource, UnknownSource))


def _bug(exc: BaseException) -> str:
    """A one-line reason for an exception an adapter should have turned into a typed error."""
    log.error("unexpected %s while polling: %s", type(exc).__name__, exc, exc_info=exc)
    return f"unexpected {type(exc).__name__} while reading its answer"


def observe_once(
    config: Config,
    *,
    info_cache: InfoCache | None = None,
    meanwhile: Callable[[], object] | None = None,
    **kwargs: object,
) -> ClusterState:
    """Observe the cluster one time and release every resource.

    One poll is all a one-shot command has, so a node that does not answer it is down, not in grace.
    ``meanwhile`` is called once, in this thread, while the nodes are first asked.
    """
    observer = Observer(replace(config, down_after=1), info_cache=info_cache, **kwargs)  # type: ignore[arg-type]
    pending = [meanwhile] if meanwhile is not None else []

    def tick() -> None:
        while pending:
            pending.pop()()

    try:
        return observer.observe(tick=tick)
    finally:
        observer.close()
