"""The control loop: observe -> plan -> act, with a cheap ``/api/ps`` watch in between.

Only this thread talks to systemd, and it pings the watchdog on every wake-up, so a hung loop is
caught while a long load (in an executor thread) is not. Signal handlers only set lock-free flags
and wake the loop through a self-pipe (see wakeup.py: an Event could deadlock its own thread); the
loop waits on that with a deadline and never sleeps blindly.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from types import FrameType

from gpu_router.api import ApiServer
from gpu_router.config import Config, ConfigError, load_config
from gpu_router.executor import ActionResult, Backoff, Executor
from gpu_router.listen import parse_listen
from gpu_router.observe import NodeLinks, Observer
from gpu_router.ollama import OllamaError
from gpu_router.planner import Action, ActionKind, Plan, is_pinned, plan, priority_on_gpu
from gpu_router.pull import PullManager, PullResult
from gpu_router.records import field, record
from gpu_router.sizing import Sizer
from gpu_router.snapshot import OptimizeTicket, Telemetry
from gpu_router.state import ClusterState, LoadedModel, NodeState, Processor
from gpu_router.store import InfoCache, SizeStore, info_cache_for, store_for
from gpu_router.systemd import Notifier, set_level
from gpu_router.wakeup import Flag, Wakeup

log = logging.getLogger(__name__)

# How long SIGTERM waits for a load in flight before leaving it to Ollama: well inside the
# unit's TimeoutStopSec, and under the 10 s a stop may take.
STOP_GRACE_S = 7.0


@record(frozen=False)
class _Expect:
    """What the last reconcile left in place, for the watch to compare against."""

    node_up: dict[str, bool]
    pinned: dict[str, set[str]]  # node -> priority models fully on GPU there
    # node -> those of them held with keep_alive -1: a client request with a finite keep_alive
    # turns that into an expiry the next reconcile may come too late for (check_interval 300 s).
    forever: dict[str, set[str]] = field(default_factory=dict)


class Daemon:
    """One gpu-router service instance."""

    def __init__(
        self,
        config: Config,
        *,
        notifier: Notifier | None = None,
        dry_run: bool = False,
        observer_factory: Callable[..., Observer] = Observer,
        links_factory: Callable[[Config], NodeLinks] = NodeLinks,
        store: SizeStore | None = None,
        info_cache: InfoCache | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.dry_run = dry_run
        self._observer_factory = observer_factory
        self._links_factory = links_factory
        self._clock = clock
        self.store = store or store_for(config)
        self.store.load()
        self.info_cache = info_cache if info_cache is not None else info_cache_for(config)
        self.links = links_factory(config)
        self.observer = self._new_observer()
        self.backoff = Backoff(clock=clock)
        self._wake = Wakeup()
        # Pulls run apart from the executors and outlive a reload (they hold their own client).
        self.pulls = PullManager(
            max_concurrent=config.max_concurrent_pulls,
            timeout_s=config.pull_timeout_s,
            on_done=self._wake.set,
        )
        self.executor = self._new_executor()
        # After a reload, the previous executor (and the links its clients belong to) stays until
        # its sequences finish: its nodes count as busy, and its results are still read.
        self._retiring: list[tuple[Executor, NodeLinks]] = []
        self._stop = Flag()
        self._reload = Flag()
        self._reconcile_now = Flag()
        self.reconciles = 0
        self._expect = _Expect({}, {})
        self._status = "starting"
        self._last: tuple[ClusterState, Sizer] | None = None  # the last observation and its sizer
        self._repins: dict[str, dict[int, int]] = {}  # model -> context clients reloaded it at -> count
        self._repin_warned: set[str] = set()
        # What the API serves (see snapshot.py); the hooks that feed it are at the end of the class.
        self.telemetry = Telemetry(config, dry_run=dry_run, clock=clock, pulls=self.pulls.in_flight)
        self.api: ApiServer | None = None
        self._tickets: list[OptimizeTicket] = []
        self._tickets_lock = threading.Lock()
        self._started_this_cycle: list[Action] = []
        self._saved_wakeup_fd: int | None = None

    # Signals: set flags, wake the loop, nothing else.

    def request_stop(self, *_: object) -> None:
        """SIGTERM/SIGINT."""
        self._stop.set()
        self._wake.set()

    def request_reload(self, *_: object) -> None:
        """SIGHUP."""
        self._reload.set()
        self._wake.set()

    def request_reconcile(self, *_: object) -> None:
        """SIGUSR1: reconcile now."""
        self._reconcile_now.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        """Route SIGTERM, SIGINT, SIGHUP and SIGUSR1 (reconcile now) to the flags above."""

        def stop(_signum: int, _frame: FrameType | None) -> None:
            self.request_stop()

        def reload(_signum: int, _frame: FrameType | None) -> None:
            self.request_reload()

        def reconcile_now(_signum: int, _frame: FrameType | None) -> None:
            self.request_reconcile()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)
        signal.signal(signal.SIGUSR1, reconcile_now)
        self._saved_wakeup_fd = self._wake.wake_on_signals()

    def release_wakeup_fd(self) -> None:
        """Give the interpreter back its previous wake-up fd once the loop is done.

        The handlers stay (a late SIGTERM or SIGHUP still only sets a flag, never kills the
        process mid-exit), but the fd must not outlive this daemon's pipe: once handlers are
        replaced and the pipe closed, a later file could take its number and get the bytes.
        """
        if self._saved_wakeup_fd is not None:
            signal.set_wakeup_fd(self._saved_wakeup_fd)
            self._saved_wakeup_fd = None

    def _new_observer(self) -> Observer:
        return self._observer_factory(
            self.config, links=self.links, info_cache=self.info_cache, monotonic=self._clock
        )

    def _new_executor(self) -> Executor:
        return Executor(
            self.links.clients,
            load_timeout_s=self.config.load_timeout_s,
            on_done=self._wake.set,
            clock=self._clock,
        )

    def _tick(self) -> None:
        """Called while waiting on nodes: keep the watchdog fed whatever they do."""
        if self.notifier.watchdog_due():
            self.notifier.watchdog()

    # The loop.

    def run(self, once: bool = False) -> int:
        """Run until stopped (or one reconcile with ``once``); returns the exit code."""
        c = self.config
        self.notifier.ready(f"watching {len(c.nodes)} nodes every {c.check_interval_s:g}s")
        log.info(
            "gpu-router started: %d nodes, %d priority models, check every %gs, watch every %gs%s%s",
            len(c.nodes),
            len(c.priority_models),
            c.check_interval_s,
            c.watch_interval_s,
            "" if c.auto_optimize else ", monitor only (auto_optimize: false)",
            ", dry run" if self.dry_run else "",
        )
        self.telemetry.loop_started()
        if not once:
            self._start_api()
        next_reconcile = self._clock()
        next_watch = next_reconcile + self._watch_interval()
        rc = 0
        try:
            while not self._stop.is_set():
                self.notifier.watchdog()
                self.collect_results()
                if self._reload.is_set():
                    self._do_reload()
                    next_reconcile = self._clock()
                now = self._clock()
                if now >= next_reconcile or self._reconcile_now.is_set():
                    self._reconcile_now.clear()
                    ok = self._guarded_reconcile()
                    if once:
                        self.executor.wait_idle(self.config.load_timeout_s + 5)
                        # One cycle is all there is: a pull it started is seen through, not cut.
                        self.pulls.wait_idle(self.config.pull_timeout_s + 5, tick=self._tick)
                        self.collect_results()
                        rc = 0 if ok else 1
                        break
                    now = self._clock()
                    next_reconcile = now + self.config.check_interval_s
                    next_watch = now + self._watch_interval()
                elif now >= next_watch:
                    if self.watch():
                        self._reconcile_now.set()
                        continue
                    next_watch = now + self._watch_interval()
                deadline = min(next_reconcile, next_watch)
                timeout = max(0.0, deadline - self._clock())
                if self.notifier.watchdog_interval_s is not None:
                    timeout = min(timeout, self.notifier.watchdog_interval_s)
                self._wake.wait(timeout)
        finally:
            self._shutdown()
        return rc

    def _watch_interval(self) -> float:
        w = self.config.watch_interval_s
        return w if w > 0 else float("inf")

    def _executors(self) -> list[Executor]:
        return [self.executor, *(e for e, _ in self._retiring)]

    def busy_nodes(self) -> set[str]:
        """Nodes with an action sequence in flight, under this config or the one before a reload."""
        return set().union(*(e.busy_nodes() for e in self._executors()))

    def _shutdown(self) -> None:
        self.notifier.stopping("stopping")
        self._stop_api()
        cut = self.pulls.stop(min(1.0, STOP_GRACE_S))
        if cut:
            # Ollama keeps the parts it has: the next pull of the model resumes there.
            log.info("abandoning pulls in flight: %s", ", ".join(cut))
        busy = self.busy_nodes()
        if busy:
            log.info("waiting up to %gs for actions in flight on %s", STOP_GRACE_S, ", ".join(sorted(busy)))
        for e in self._executors():
            e.begin_stop()
        deadline = self._clock() + STOP_GRACE_S
        for e in self._executors():
            e.wait_idle(max(0.0, deadline - self._clock()))
        left = self.busy_nodes()
        if left:
            log.warning(
                "leaving actions in flight on %s; the next start will see to them", ", ".join(sorted(left))
            )
        self.collect_results()
        self._settle_tickets(self.busy_nodes(), error="the daemon stopped before this finished")
        self.store.save()
        for _, links in self._retiring:
            links.close()
        self.observer.close()
        self.links.close()
        log.info("gpu-router stopped")

    def _guarded_reconcile(self) -> bool:
        # Node faults never raise out of a reconcile; anything that does is a bug. Log it with its
        # traceback and say so in STATUS, but keep the service (and the pins it holds) running.
        try:
            self.reconcile()
        except Exception as exc:
            log.exception("reconcile #%d failed; trying again next cycle", self.reconciles)
            self._status = f"reconcile #{self.reconciles} failed: {exc.__class__.__name__}: {exc}"
            self.notifier.status(self._status)
            self._reconcile_failed(self._status)
            return False
        return True

    def reconcile(self) -> Plan:
        """One observe -> plan -> act pass."""
        self.reconciles += 1
        start = self._clock()
        self._started_this_cycle = []
        state = self.observer.observe(cancel=self._stop, tick=self._tick)
        sizer = Sizer(state, self.config, self.store.sizes)
        if self._learn(state, sizer):
            self.store.save()
        self._last = (state, sizer)
        # A sequence that failed after the loop last took results in (while this one observed) has
        # its failure in the backoff before anything is planned: else it is planned, and sent, again.
        self.collect_results()
        blocked = self.backoff.blocked()
        pulling = self.pulls.pulling()
        # Only the priority models: they are all the daemon acts on (the report's full plan of
        # this observation is made by the snapshot if someone asks for it).
        p = plan(state, self.config, backoff=blocked, sizer=sizer, full=False, pulling=pulling)
        self._remember(state, p)
        acted = 0 if self._stop.is_set() else self._act(p, observed_from=start)
        self._set_status(state, p, acted)
        log.debug("reconcile #%d took %.2fs", self.reconciles, self._clock() - start)
        config = self.config
        self._publish_reconcile(
            state,
            p,
            self._clock() - start,
            lambda: plan(state, config, backoff=blocked, sizer=sizer, pulling=pulling),
        )
        return p

    def _learn(self, state: ClusterState, sizer: Sizer) -> bool:
        """File every size /api/ps shows that can be learned, under its full key; True if any changed."""
        changed = False
        for node in state.nodes:
            if node.up:
                for m in node.loaded:
                    changed |= self._learn_one(node, m, sizer)
        return changed

    def _learn_one(self, node: NodeState, m: LoadedModel, sizer: Sizer) -> bool:
        key = sizer.learnable(node, m)
        if key is None:
            return False
        total = node.gpu.total_bytes if node.gpu.gpus else None
        return self.store.learn(
            key, m.size_bytes, model=m.name, file_bytes=sizer.file_size(m.name), total_vram_bytes=total
        )

    def _act(self, p: Plan, *, observed_from: float) -> int:
        if not p.actions:
            return 0
        if not self.config.auto_optimize or self.dry_run:
            why = "dry run" if self.dry_run else "auto_optimize is off"
            for a in p.actions:
                log.info("would %s %s on %s (%s): %s", a.kind.value, a.model, a.node, why, a.reason)
            return 0
        busy = self.busy_nodes()
        loading = set().union(*(e.loading_models() for e in self._executors()))
        by_node: dict[str, list[Action]] = defaultdict(list)
        started = 0
        for a in p.actions:
            if a.kind is ActionKind.PULL:
                started += self._start_pull(a)
                continue
            target = a.for_model or a.model
            if a.node in busy or target in loading:
                log.debug("deferring %s %s on %s: an action is in flight", a.kind.value, a.model, a.node)
                continue
            if any(e.finished_since(a.node, observed_from) for e in self._executors()):
                # A sequence there ended after this plan's observation began: the plan may be stale
                # on that node (a load it does not know about). The next reconcile looks again.
                log.debug(
                    "deferring %s %s on %s: the node changed since it was observed",
                    a.kind.value,
                    a.model,
                    a.node,
                )
                self._reconcile_now.set()
                continue
            by_node[a.node].append(a)
        for node, actions in by_node.items():
            if self.executor.submit(node, actions):
                started += len(actions)
                self._actions_started(actions)
                for a in actions:
                    log.info("%s %s on %s: %s", a.kind.value, a.model, node, a.reason)
        return started

    def _start_pull(self, a: Action) -> int:
        """Hand a pull to the pull manager (not to the node's executor: a load there must not wait)."""
        client = self.links.clients.get(a.node)
        if client is None:
            return 0
        why_not = self.pulls.start(a, client)
        if why_not is not None:
            log.debug("deferring pull %s on %s: %s", a.model, a.node, why_not)
            return 0
        log.info("pull %s on %s: %s", a.model, a.node, a.reason)
        self._actions_started([a])
        return 1

    def collect_results(self) -> None:
        """Log and learn from finished actions; close what a reload left once it is idle."""
        # Busy first, results second: a sequence appends its results before it leaves the busy
        # set, so a node not busy here has all its results in the collect below.
        busy = self.busy_nodes()
        for e in self._executors():
            for r in e.collect():
                self._log_result(r)
                self._action_finished(r)
        for pr in self.pulls.collect():
            self._pull_finished(pr)
        self._settle_tickets(busy)
        still = []
        for e, links in self._retiring:
            if e.busy_nodes():
                still.append((e, links))
            else:
                links.close()
        self._retiring = still

    def _log_result(self, r: ActionResult) -> None:
        a = r.action
        level = logging.INFO if r.ok else logging.WARNING
        log.log(
            level,
            "action %s node=%s model=%s result=%s duration=%.1fs: %s",
            a.kind.value,
            a.node,
            a.model,
            "ok" if r.ok else "failed",
            r.duration_s,
            r.detail,
        )
        if not r.skipped:
            self.observer.refresh_tags({a.node})  # what is on disk may have moved too
        if a.kind is ActionKind.UNLOAD:
            return
        if r.observed is not None and self._last is not None:
            # What the load really took, fully on GPU or not, is the best size there is for next time.
            state, sizer = self._last
            node = state.node(a.node)
            if node is not None and self._learn_one(node, r.observed, sizer):
                self.store.save()
        if r.ok:
            self.backoff.succeeded(a.model, a.node)
            if r.observed is not None and r.observed.processor is Processor.GPU:
                # A cpu_fallback load is not on GPU: nothing to watch there.
                self._expect.pinned.setdefault(a.node, set()).add(a.model)
                self._expect.forever.setdefault(a.node, set()).add(a.model)
            if a.kind is ActionKind.PIN:
                self._note_repin(a.model, r.observed.context_length if r.observed else None, a.node)
        else:
            delay = self.backoff.failed(a.model, a.node)
            log.warning("not trying %s on %s again for %.0fs", a.model, a.node, delay)
        # Verify changed the picture; look again soon rather than a full interval later.
        self._reconcile_now.set()

    def _pull_finished(self, r: PullResult) -> None:
        a = r.action
        if r.ok:
            log.info(
                "action pull node=%s model=%s result=ok duration=%.1fs: %s",
                a.node,
                a.model,
                r.duration_s,
                r.detail,
            )
            self.backoff.succeeded(a.model, a.node)
            self.observer.refresh_tags({a.node})
            self._reconcile_now.set()  # place it now rather than a full interval later
            self._wake.set()
        elif r.abandoned:
            log.info("pull %s on %s %s", a.model, a.node, r.detail)
            self.telemetry.action_abandoned(a, r.detail, r.duration_s)
            return
        else:
            log.warning(
                "action pull node=%s model=%s result=failed duration=%.1fs: %s",
                a.node,
                a.model,
                r.duration_s,
                r.detail,
            )
            delay = self.backoff.failed(a.model, a.node)
            log.warning("not trying %s on %s again for %.0fs", a.model, a.node, delay)
            self._reconcile_now.set()  # another node may take it meanwhile
        self._action_finished(ActionResult(a, r.ok, r.detail, r.duration_s))

    def _note_repin(self, model: str, context: int | None, node: str) -> None:
        """Warn once when clients keep reloading a priority model at a context of their own."""
        if context is None:
            return
        counts = self._repins.setdefault(model, {})
        counts[context] = counts.get(context, 0) + 1
        wanted = next((m.num_ctx for m in self.config.priority_models if m.name == model), None)
        if counts[context] >= 2 and model not in self._repin_warned and context != wanted:
            self._repin_warned.add(model)
            log.warning(
                "clients keep reloading %s with num_ctx %d (seen %d times, last on %s); gpu-router re-pins "
                "it each time. Set num_ctx: %d on this priority model so its pin matches them",
                model,
                context,
                counts[context],
                node,
                context,
            )

    def _remember(self, state: ClusterState, p: Plan) -> None:
        priority = {m.model for m in p.models if m.priority}
        pinned: dict[str, set[str]] = {}
        forever: dict[str, set[str]] = {}
        for n in state.nodes:
            if n.up:
                on_gpu = [m for m in n.loaded if m.name in priority and m.processor is Processor.GPU]
                pinned[n.name] = {m.name for m in on_gpu}
                forever[n.name] = {m.name for m in on_gpu if is_pinned(m, state.observed_at)}
        self._expect = _Expect({n.name: n.up for n in state.nodes}, pinned, forever)

    def watch(self) -> bool:
        """Cheap drift check; True when something changed that a reconcile should fix."""
        seen = self.observer.watch(cancel=self._stop, tick=self._tick)
        for node, result in seen.items():
            was_up = self._expect.node_up.get(node)
            if isinstance(result, OllamaError):
                self.telemetry.poll_error(node, result.status.value, result.message)
                if was_up:
                    log.warning("watch: node %s went %s: %s", node, result.status.value, result.message)
                    self.telemetry.drift(node, "node_down")
                    return True
                continue
            if was_up is False:
                log.info("watch: node %s is back", node)
                self.telemetry.drift(node, "node_back")
                return True
            on_gpu = {m.name for m in result if m.processor is Processor.GPU}
            lost = self._expect.pinned.get(node, set()) - on_gpu
            if lost:
                log.warning("watch: %s no longer fully on GPU on %s", ", ".join(sorted(lost)), node)
                self.telemetry.drift(node, "model_lost")
                return True
            now = datetime.now(timezone.utc)
            forever = self._expect.forever.get(node, set())
            unpinned = {m.name for m in result if m.name in forever and not is_pinned(m, now)}
            if unpinned:
                # A client's finite keep_alive replaced the pin: re-pin it before it expires. Once
                # (forgotten until a reconcile sees it pinned again), so a pin that fails is left
                # to the backoff, not retried at every watch.
                names = ", ".join(sorted(unpinned))
                log.warning("watch: %s no longer pinned on %s (a client's keep_alive)", names, node)
                forever -= unpinned
                self.telemetry.drift(node, "model_unpinned")
                return True
        return False

    def _set_status(self, state: ClusterState, p: Plan, acted: int) -> None:
        placed, priority = priority_on_gpu(p)
        down = sum(1 for n in state.nodes if not n.up)
        parts = [f"reconcile #{self.reconciles}: {placed}/{priority} priority models on GPU"]
        if down:
            parts.append(f"{down} node{'s' if down > 1 else ''} down")
        if acted:
            parts.append(f"{acted} action{'s' if acted > 1 else ''} started")
        pulls = self.pulls.in_flight()
        if pulls:
            parts.append(", ".join(f"pulling {pr.model} on {pr.node}" for pr in pulls))
        elif p.actions and (self.dry_run or not self.config.auto_optimize):
            parts.append(
                f"{len(p.actions)} actions not taken ({'dry run' if self.dry_run else 'monitor only'})"
            )
        self._status = ", ".join(parts)
        self.notifier.status(self._status)
        log.info("%s", self._status)

    def _do_reload(self) -> None:
        self._reload.clear()
        self.notifier.reloading()
        path = self.config.path
        try:
            new = load_config(path)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
        else:
            # Sequences in flight finish on the old clients; nothing waits for them here.
            self.executor.begin_stop()
            self._retiring.append((self.executor, self.links))
            self.observer.close()
            self.collect_results()
            old = self.config
            self.config = new
            self.links = self._links_factory(new)
            self.observer = self._new_observer()
            self.executor = self._new_executor()
            self.pulls.configure(max_concurrent=new.max_concurrent_pulls, timeout_s=new.pull_timeout_s)
            gone = self.pulls.abandon({n.name for n in old.nodes} - {n.name for n in new.nodes})
            if gone:
                log.info("abandoning pulls to nodes no longer configured: %s", ", ".join(gone))
            set_level(new.log_level)
            self._reloaded(old, new)
            log.info(
                "configuration reloaded from %s: %d nodes, %d priority models",
                path,
                len(new.nodes),
                len(new.priority_models),
            )
        self.notifier.ready(self._status)

    # Telemetry and API hooks: what the listener serves. Called from the main loop only.

    def _start_api(self) -> None:
        c = self.config
        if c.listen is None:
            return
        try:
            host, port = parse_listen(c.listen)
            api = ApiServer(
                self.telemetry,
                host,
                port,
                token=c.api_token,
                optimize=self.request_optimize,
                clock=self._clock,
            )
            api.start()
        except (OSError, ValueError) as exc:
            # The pins matter more than the window onto them: keep running without the listener.
            log.error("cannot listen on %s, running without the API and /metrics: %s", c.listen, exc)
            return
        self.api = api
        log.info("API and /metrics on %s%s", api.url, " (token required)" if c.api_token else "")

    def _stop_api(self) -> None:
        api, self.api = self.api, None
        if api is not None:
            api.stop()

    def request_optimize(self) -> OptimizeTicket:
        """Ask for a reconcile now (from an API thread); the ticket is filled in as it runs."""
        ticket = OptimizeTicket(after=self.reconciles)
        with self._tickets_lock:
            self._tickets.append(ticket)
        self.request_reconcile()
        return ticket

    def _publish_reconcile(
        self, state: ClusterState, p: Plan, duration_s: float, full_plan: Callable[[], Plan]
    ) -> None:
        self.telemetry.reconciled(
            state,
            p,
            reconcile=self.reconciles,
            duration_s=duration_s,
            next_in_s=self.config.check_interval_s,
            backoffs=self.backoff.entries(),
            full_plan=full_plan,
        )
        if self.api is not None:
            self.api.prime()
        with self._tickets_lock:
            tickets = [t for t in self._tickets if t.reconcile is None and t.after < self.reconciles]
        for t in tickets:
            t.attach(self.reconciles, p.actions, self._started_this_cycle, self._status)
        # Not a bare settle: a load may have finished since the last collect, and a ticket settled
        # on "nothing busy" without its result would report that load as still in flight.
        self.collect_results()

    def _reconcile_failed(self, error: str) -> None:
        self.telemetry.reconcile_failed(self.reconciles, error)
        with self._tickets_lock:
            tickets = [t for t in self._tickets if t.reconcile is None and t.after < self.reconciles]
            self._tickets = [t for t in self._tickets if t not in tickets]
        for t in tickets:
            t.finish(error)

    def _actions_started(self, actions: list[Action]) -> None:
        self._started_this_cycle.extend(actions)
        self.telemetry.actions_started(self.reconciles, actions)

    def _action_finished(self, r: ActionResult) -> None:
        self.telemetry.action_finished(r)
        with self._tickets_lock:
            tickets = list(self._tickets)
        for t in tickets:
            t.add_result(r)

    def _settle_tickets(self, busy: set[str], error: str | None = None) -> None:
        """Finish the tickets whose reconcile ran, once nothing is in flight (or with ``error``)."""
        with self._tickets_lock:
            done = [t for t in self._tickets if error is not None or (t.reconcile is not None and not busy)]
            self._tickets = [t for t in self._tickets if t not in done]
        for t in done:
            unfinished = t.reconcile is None or bool(busy)
            t.finish(error if unfinished else None)

    def _reloaded(self, old: Config, new: Config) -> None:
        self.telemetry.reloaded(new)
        if (old.listen, old.api_token) != (new.listen, new.api_token):
            self._stop_api()
            self._start_api()


def run_daemon(config: Config, *, once: bool = False, dry_run: bool = False) -> int:
    """Run the service in the foreground (systemd supervises it)."""
    with Notifier() as notifier:
        daemon = Daemon(config, notifier=notifier, dry_run=dry_run)
        daemon.install_signal_handlers()
        try:
            return daemon.run(once=once)
        finally:
            daemon.release_wakeup_fd()
