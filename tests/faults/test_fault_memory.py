"""Bodies over their cap cost memory only while they are read, and all of them together stay bounded.

Found by the fault suite: a failed read's traceback kept its frame (and up to 16 MiB of chunks)
alive until the node's next poll, and each request could hold a whole cap at once (twice over
while zlib built its output), so three nodes sending gzip bombs took the daemon to a peak of
495 MB against the unit's ``MemoryMax=512M``. The daemon-level check is in test_fault_bodies.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import TracebackType

import pytest
from rawserver import Conn, RawServer

from gpu_router import transport
from gpu_router.emulator import EmulatedNode, Fault
from gpu_router.transport import SHARED_FROM_BYTES, BodyTooLarge, HttpClient, ProxyConfig

MIB = 1024 * 1024


@pytest.fixture
def node() -> Iterator[EmulatedNode]:
    n = EmulatedNode("hostile", (8192,), ("llama3.2:latest",))
    n.start()
    yield n
    n.stop()


def _client(url: str) -> HttpClient:
    return HttpClient(url, timeout_s=20.0, proxies=ProxyConfig(), max_idle_connections=0)


def _bytes_held_by(tb: TracebackType | None) -> int:
    """Bytes in the locals of every frame a traceback keeps alive (lists of bytes included)."""
    total = 0
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, (bytes, bytearray)):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, (bytes, bytearray)))
        tb = tb.tb_next
    return total


def _chunked_forever(conn: Conn) -> None:
    """A chunked reply with no Content-Length that never ends: only the cap stops the client."""
    conn.read_request()
    conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    block = b"x" * (64 * 1024)
    while conn.send(b"%x\r\n%s\r\n" % (len(block), block)):
        pass


def test_a_gzip_bomb_is_not_kept_alive_by_its_error(node: EmulatedNode) -> None:
    node.set_fault(Fault.GZIP_BOMB, paths=("/api/tags",))
    _assert_error_holds_little(lambda: _client(node.url).request("GET", "/api/tags"))


def test_a_chunked_body_over_the_cap_is_not_kept_alive_by_its_error() -> None:
    server = RawServer(_chunked_forever)
    try:
        _assert_error_holds_little(lambda: _client(server.url).request("GET", "/api/tags"))
    finally:
        server.close()


def _assert_error_holds_little(call: Callable[[], object]) -> None:
    with pytest.raises(BodyTooLarge) as info:
        call()
    held = _bytes_held_by(info.value.__traceback__)
    # Before: the chunks read so far (up to the 16 MiB cap) stayed reachable from the error, and the
    # poll's future keeps the error until that node's next poll.
    assert held < MIB, f"the error keeps {held / MIB:.1f} MiB of the refused body alive"


def test_large_bodies_draw_on_one_shared_budget(node: EmulatedNode, monkeypatch: pytest.MonkeyPatch) -> None:
    budget = transport._Budget(4 * MIB)  # the process-wide one, made small for the test
    monkeypatch.setattr(transport, "_BODY_BUDGET", budget)
    node.set_fault(Fault.HUGE_BODY, paths=("/api/tags",), size_bytes=3 * MIB)
    client = _client(node.url)
    try:
        # Alone, a 3 MiB body is fine: 1 MiB free, 2 MiB from the budget, given back after.
        assert len(client.request("GET", "/api/tags").body) == 3 * MIB
        assert budget.left_bytes == 4 * MIB

        # While other large bodies hold the budget, one more fails as too large...
        assert budget.take(3 * MIB)
        with pytest.raises(BodyTooLarge, match="while other large bodies hold the shared 4 MiB"):
            client.request("GET", "/api/tags")
        assert budget.left_bytes == 1 * MIB, "a failed read must give back what it took"
        # ...but an ordinary answer never draws on it.
        node.clear_fault()
        assert client.request("GET", "/api/tags").status == 200
        assert client.request("POST", "/api/show", json_body={"model": "llama3.2:latest"}).status == 200
        budget.give(3 * MIB)
    finally:
        client.close()


def test_the_budget_holds_one_body_at_the_full_cap() -> None:
    # Real answers (a few hundred KB) never reach the shared part; one legitimate body at the
    # Ollama cap always fits when nothing else large is in flight.
    assert SHARED_FROM_BYTES >= MIB
    assert transport.SHARED_BODY_BUDGET_BYTES + SHARED_FROM_BYTES >= transport.DEFAULT_MAX_BODY_BYTES
    assert transport._BODY_BUDGET.left_bytes == transport.SHARED_BODY_BUDGET_BYTES, "a read leaked budget"
