"""The PullManager and ``OllamaClient.pull`` against emulated nodes and raw servers on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterator

import pytest
from daemon_helpers import MakeNode, wait_until
from rawserver import Conn, RawServer, chunked

from gpu_router.emulator import CATALOGUE, EmulatedNode, Fault
from gpu_router.ollama import ApiError, BadResponse, NodeUnreachable, OllamaClient, PullFailed, PullStatus
from gpu_router.planner import Action, ActionKind
from gpu_router.pull import PullManager, PullResult

SMALL = "llama3.2:1b"  # 1.2 GiB on disk
OTHER = "gemma3:1b"

MakeManager = Callable[..., PullManager]


@pytest.fixture
def make_manager() -> Iterator[MakeManager]:
    """PullManagers that are stopped (their pulls cut) at the end of the test."""
    made: list[PullManager] = []

    def make(**kw: object) -> PullManager:
        args: dict[str, object] = {"max_concurrent": 1, "timeout_s": 30.0}
        args.update(kw)
        m = PullManager(**args)  # type: ignore[arg-type]
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop(5.0)


def client(node: EmulatedNode | RawServer, name: str = "n") -> OllamaClient:
    return OllamaClient(getattr(node, "name", name), node.url, timeout_s=5.0)


def pull(node: EmulatedNode, model: str = SMALL) -> Action:
    return Action(ActionKind.PULL, node.name, model, "priority model not on GPU anywhere")


def finished(m: PullManager, count: int = 1) -> list[PullResult]:
    """Wait for ``count`` results and return them."""
    got: list[PullResult] = []

    def done() -> bool:
        got.extend(m.collect())
        return len(got) >= count

    wait_until(done, what=f"{count} pull result(s)")
    return got


def installed(node: EmulatedNode) -> set[str]:
    return {s.name for s in node.installed()}


# --------------------------------------------------------------------------- progress and success


def test_a_pull_reports_progress_logs_every_tenth_and_installs(
    make_node: MakeNode, make_manager: MakeManager, caplog: pytest.LogCaptureFixture
) -> None:
    size = CATALOGUE[SMALL].file_size_bytes
    node = make_node("n", (8192,), (), pull_speed_bps=size / 1.5)  # about 25 progress lines
    done = threading.Event()
    m = make_manager(on_done=done.set)
    caplog.set_level(logging.INFO, logger="gpu_router.pull")

    assert m.start(pull(node), client(node)) is None
    assert m.pulling() == {(SMALL, "n")}
    labels: list[str] = []

    def midway() -> bool:
        now = m.in_flight()
        labels.extend(p.label for p in now)
        return any(p.total_bytes and 0 < p.completed_bytes < p.total_bytes for p in now)

    wait_until(midway, what="a pull part-way")
    progress = m.in_flight()[0]
    assert (progress.node, progress.model) == ("n", SMALL)
    assert progress.reason == "priority model not on GPU anywhere"
    assert re.fullmatch(r"pulling \d{1,2}% of 1\.\d GiB", progress.label), progress.label

    [result] = finished(m)
    assert done.is_set()
    assert result.ok, result.detail
    assert result.total_bytes == size  # every blob of the manifest, summed
    assert result.detail == "pulled 1.2 GiB"
    assert m.in_flight() == ()
    assert m.pulling() == frozenset()
    assert SMALL in installed(node)
    assert [(r.path, r.body) for r in node.mutating_requests()] == [("/api/pull", {"model": SMALL})]

    percents = [
        int(p) for p in re.findall(rf"pull {re.escape(SMALL)} on n: (\d+)% of 1\.\d GiB", caplog.text)
    ]
    assert percents, caplog.text
    # At most one line per tenth: each logged figure is in a later tenth than the one before.
    tenths = [p // 10 for p in percents]
    assert tenths == sorted(set(tenths)), percents
    assert all(1 <= t <= 9 for t in tenths), percents


def test_a_pull_of_an_installed_model_succeeds_at_once(
    make_node: MakeNode, make_manager: MakeManager
) -> None:
    node = make_node("n", (8192,), (SMALL,))
    m = make_manager()
    assert m.start(pull(node), client(node)) is None
    [result] = finished(m)
    assert result.ok
    assert result.total_bytes == CATALOGUE[SMALL].file_size_bytes


# --------------------------------------------------------------------------- limits


def test_one_pull_per_node_and_max_concurrent_pulls_in_all(
    make_node: MakeNode, make_manager: MakeManager
) -> None:
    a, b, c = (make_node(name, (8192,), ()) for name in ("a", "b", "c"))
    for n in (a, b, c):
        n.set_fault(Fault.PULL_STALL)  # each pull stops half-way and waits: they stay in flight
    m = make_manager(max_concurrent=2)

    assert m.start(pull(a), client(a)) is None
    assert m.start(pull(a, OTHER), client(a)) == f"a pull of {SMALL} is in flight on a"
    assert m.start(pull(b, OTHER), client(b)) is None
    assert m.start(pull(c), client(c)) == "max_concurrent_pulls (2) pulls are in flight"
    assert m.pulling() == {(SMALL, "a"), (OTHER, "b")}
    assert {p.node for p in m.in_flight()} == {"a", "b"}

    for n in (a, b):
        n.clear_fault()
    results = finished(m, 2)
    assert all(r.ok for r in results), [r.detail for r in results]
    assert installed(a) == {SMALL}
    assert installed(b) == {OTHER}

    m.configure(max_concurrent=1, timeout_s=30.0)
    c.clear_fault()
    assert m.start(pull(c), client(c)) is None
    [result] = finished(m)
    assert result.ok
    with pytest.raises(ValueError, match="not a pull"):
        m.start(Action(ActionKind.LOAD, "c", SMALL, ""), client(c))


# --------------------------------------------------------------------------- stalls and timeouts


def test_a_silent_stream_fails_on_the_idle_timeout(make_node: MakeNode, make_manager: MakeManager) -> None:
    node = make_node("n", (8192,), ())
    node.set_fault(Fault.PULL_STALL)
    m = make_manager(idle_timeout_s=0.5, timeout_s=60.0)
    assert m.start(pull(node), client(node)) is None
    [result] = finished(m)
    assert not result.ok
    assert not result.abandoned
    assert result.detail == "POST /api/pull: no data for 0.5s (idle timeout) reading the stream"
    assert installed(node) == set()


def test_pull_timeout_bounds_the_whole_pull(make_node: MakeNode, make_manager: MakeManager) -> None:
    size = CATALOGUE[SMALL].file_size_bytes
    node = make_node("n", (8192,), (), pull_speed_bps=size / 60)  # lines keep coming, for a minute
    m = make_manager(timeout_s=1.0)
    assert m.start(pull(node), client(node)) is None
    [result] = finished(m)
    assert not result.ok
    assert result.detail == "POST /api/pull: timed out after 1s reading the stream"
    assert result.total_bytes > 0  # it had started: the blob sizes were known


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("fault", "model", "expected"),
    [
        (Fault.PULL_ERROR, SMALL, r"max retries exceeded: unexpected EOF"),
        (
            Fault.PULL_NO_SPACE,
            SMALL,
            r"write /usr/share/ollama/\.ollama/models/blobs/sha256-[0-9a-f]{64}-partial:"
            r" no space left on device",
        ),
        (None, "no-such-model:7b", r"pull model manifest: file does not exist"),
        (Fault.HTTP500, SMALL, r"HTTP 500: POST /api/pull: .+"),
    ],
)
def test_a_failed_pull_reports_ollamas_message(
    make_node: MakeNode, make_manager: MakeManager, fault: Fault | None, model: str, expected: str
) -> None:
    node = make_node("n", (8192,), ())
    if fault is Fault.HTTP500:
        node.set_fault(fault, paths=("/api/pull",))
    elif fault is not None:
        node.set_fault(fault)
    m = make_manager()
    assert m.start(pull(node, model), client(node)) is None
    [result] = finished(m)
    assert not result.ok
    assert not result.abandoned
    assert re.fullmatch(expected, result.detail), result.detail
    assert installed(node) == set()


def test_a_node_that_refuses_fails_the_pull(make_node: MakeNode, make_manager: MakeManager) -> None:
    node = make_node("n", (8192,), ())
    node.set_fault(Fault.REFUSE)
    m = make_manager()
    assert m.start(pull(node), client(node)) is None
    [result] = finished(m)
    assert not result.ok
    assert result.detail.startswith("POST /api/pull: ")
    assert "refused" in result.detail


# --------------------------------------------------------------------------- stop


def test_stop_abandons_pulls_in_flight_at_once(make_node: MakeNode, make_manager: MakeManager) -> None:
    node = make_node("n", (8192,), ())
    node.set_fault(Fault.PULL_STALL)
    m = make_manager(idle_timeout_s=600.0, timeout_s=3600.0)  # only the stop can end this pull
    assert m.start(pull(node), client(node)) is None
    wait_until(lambda: any(p.completed_bytes for p in m.in_flight()), what="the pull part-way")

    assert m.stop(5.0) == [f"{SMALL} on n"]
    assert m.in_flight() == ()  # the thread ended within the grace: the connection was cut
    [result] = m.collect()
    assert result.abandoned
    assert not result.ok
    assert m.start(pull(node), client(node)) == "stopping"


def test_abandon_cuts_only_the_nodes_named(make_node: MakeNode, make_manager: MakeManager) -> None:
    a, b = make_node("a", (8192,), ()), make_node("b", (8192,), ())
    for n in (a, b):
        n.set_fault(Fault.PULL_STALL)
    m = make_manager(max_concurrent=2)
    assert m.start(pull(a), client(a)) is None
    assert m.start(pull(b), client(b)) is None
    assert m.abandon({"a"}) == [f"{SMALL} on a"]
    [result] = finished(m)
    assert (result.action.node, result.abandoned) == ("a", True)
    assert m.pulling() == {(SMALL, "b")}
    b.clear_fault()
    [result] = finished(m)
    assert (result.action.node, result.ok) == ("b", True)


# --------------------------------------------------------------------------- OllamaClient.pull on the wire


def _stream_server(body: bytes, status: str = "200 OK") -> RawServer:
    def handler(conn: Conn) -> None:
        if conn.read_request() is None:
            return
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        conn.send(head.encode() + chunked([body]))

    return RawServer(handler)


def _lines(*objects: object) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objects)


def test_the_client_parses_ollamas_status_lines() -> None:
    # The shape of docs/api.md@v0.12.10 "Pull a Model": completed is left out while it is 0.
    digest = "sha256:" + "ab" * 32
    body = _lines(
        {"status": "pulling manifest"},
        {"status": f"pulling {digest[7:19]}", "digest": digest, "total": 2142590208},
        {"status": f"pulling {digest[7:19]}", "digest": digest, "total": 2142590208, "completed": 241970},
        {"status": "verifying sha256 digest"},
        {"status": "writing manifest"},
        {"status": "removing any unused layers"},
        {"status": "success"},
    )
    server = _stream_server(body)
    try:
        got = list(client(server).pull(SMALL, timeout_s=5.0, idle_timeout_s=5.0))
    finally:
        server.close()
    assert got[1] == PullStatus(f"pulling {digest[7:19]}", digest, 2142590208, None)
    assert got[2].completed_bytes == 241970
    assert [s.status for s in got][-1] == "success"
    assert json.loads(server.requests[0].body) == {"model": SMALL}


@pytest.mark.parametrize(
    ("body", "status", "error", "message"),
    [
        (
            _lines({"status": "pulling manifest"}, {"error": "max retries exceeded: EOF"}),
            "200 OK",
            PullFailed,
            "max retries exceeded: EOF",
        ),
        (
            _lines({"status": "pulling manifest"}),
            "200 OK",
            BadResponse,
            "POST /api/pull: the stream ended without 'success'",
        ),
        (
            b'{"status": "pulling manifest"}\nnot json\n',
            "200 OK",
            BadResponse,
            "POST /api/pull: invalid JSON",
        ),
        (b"[1, 2]\n", "200 OK", BadResponse, "POST /api/pull: a line that is not an object"),
        (
            b'{"error":"invalid model name"}',
            "400 Bad Request",
            ApiError,
            "HTTP 400: POST /api/pull: invalid model name",
        ),
    ],
)
def test_the_client_maps_a_failed_stream(
    body: bytes, status: str, error: type[Exception], message: str
) -> None:
    server = _stream_server(body, status)
    try:
        with pytest.raises(error) as caught:
            list(client(server).pull(SMALL, timeout_s=5.0, idle_timeout_s=5.0))
    finally:
        server.close()
    assert isinstance(caught.value, (PullFailed, BadResponse, ApiError))
    assert caught.value.message.startswith(message), caught.value.message


def test_the_client_reports_nothing_listening_as_unreachable() -> None:
    server = RawServer(lambda conn: None)
    url = server.url
    server.close()
    c = OllamaClient("gone", url, timeout_s=2.0)
    with pytest.raises(NodeUnreachable, match="POST /api/pull: "):
        c.pull(SMALL, timeout_s=2.0, idle_timeout_s=2.0)
