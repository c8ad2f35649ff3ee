"""The transport's own HTTP/1.1 response reader (gpu_router.httpread), at its edges.

Everything goes over real sockets on 127.0.0.1: through ``HttpClient`` against a raw server that
sends exact bytes, or (for framing the client never gets to see, such as a 304's) ``read_head`` on
one end of a loopback connection. Where the reader now differs from ``http.client``, the test says
what http.client did and why that was wrong.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawserver import Conn, RawServer, Serve

from gpu_router import httpread
from gpu_router.transport import (
    ConnectionLost,
    HttpClient,
    InvalidResponse,
    ProxyConfig,
    RedirectRefused,
    Response,
    TimedOut,
    TransportError,
)

SLACK_S = 2.0  # shared, noisy machines: only a sanity bound on "did not hang"


def answer_each(raw: bytes | Callable[[int], bytes]) -> Callable[[Conn], None]:
    """Handler: ``raw`` (or ``raw(n)`` for the nth request) to every request, on a kept-alive connection."""

    def handler(conn: Conn) -> None:
        n = 0
        while conn.read_request() is not None:
            data = raw(n) if callable(raw) else raw
            n += 1
            if not conn.send(data):
                return

    return handler


def answer_once(raw: bytes) -> Callable[[Conn], None]:
    """Handler: ``raw`` to the first request, then close."""

    def handler(conn: Conn) -> None:
        if conn.read_request() is not None:
            conn.send(raw)

    return handler


def ok(body: bytes = b"{}", *, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)


# -- the transport loads no http.client ----------------------------------------------------------------


def test_the_transport_never_imports_http_client_email_or_ssl_for_http() -> None:
    code = (
        "import sys, gpu_router.transport as t\n"
        "c = t.HttpClient('http://127.0.0.1:9', proxies=t.ProxyConfig())\n"
        "print(sorted(m for m in sys.modules if m.startswith(('http', 'email', 'ssl', 'calendar'))))\n"
        "t.HttpClient('https://127.0.0.1:9', proxies=t.ProxyConfig())\n"
        "print('ssl' in sys.modules, 'http.client' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "True False"]


# -- status lines and interim responses ----------------------------------------------------------------


def test_100_continue_before_the_real_response_is_skipped(
    serve: Serve, clients: Callable[..., HttpClient]
) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\nX-Odd: 1\r\n\r\n"
    server = serve(answer_each(interim + ok(b'{"a":1}')))
    client = clients(server.url)
    for _ in range(2):
        got = client.request("GET", "/api/ps")
        assert (got.status, got.body) == (200, b'{"a":1}')
        assert "x-odd" not in got.headers  # the interim response's fields are not the response's
    assert server.connections == 1


def test_103_early_hints_is_skipped_too(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    # http.client skipped only 100, so a 103 failed the call ("unexpected informational status HTTP
    # 103"); RFC 9110 15.2 says a client must be able to parse any 1xx before the final response.
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    server = serve(answer_each(interim + b"HTTP/1.1 102 Processing\r\n\r\n" + ok(b"{}")))
    assert clients(server.url).request("GET", "/").body == b"{}"


def test_101_is_still_an_error(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(answer_once(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"))
    with pytest.raises(InvalidResponse, match=r"^unexpected informational status HTTP 101$"):
        clients(server.url).request("GET", "/")


def test_interim_response_then_close_is_no_response(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(answer_once(b"HTTP/1.1 100 Continue\r\n\r\n"))
    with pytest.raises(ConnectionLost, match=r"^connection closed without a response$"):
        clients(server.url).request("GET", "/")


def test_a_status_line_with_no_reason_phrase(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(answer_each(b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nhi"))
    got = clients(server.url).request("GET", "/")
    assert (got.status, got.reason, got.body) == (200, "", b"hi")


def test_reason_phrase_keeps_its_inner_spaces(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(answer_each(b"HTTP/1.1 503  Service  Unavailable \r\nContent-Length: 0\r\n\r\n"))
    got = clients(server.url).request("GET", "/")
    assert (got.status, got.reason) == (503, "Service  Unavailable")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", "invalid HTTP: BadStatusLine SSH-2.0-OpenSSH_9.6"),
        (b"HTTP/1.1 +200 OK\r\n\r\n", "invalid HTTP: BadStatusLine HTTP/1.1 +200 OK"),  # int() took it
        (b"HTTP/1.1 2000 OK\r\n\r\n", "invalid HTTP: BadStatusLine HTTP/1.1 2000 OK"),
        (b"HTTP/1.1 099 Low\r\n\r\n", "invalid HTTP: BadStatusLine HTTP/1.1 099 Low"),
        (b"HTTP/1.1\r\n\r\n", "invalid HTTP: BadStatusLine HTTP/1.1"),
        (b"\r\n", "invalid HTTP: BadStatusLine (an empty line)"),
        (b"HTTP/2.0 200 OK\r\n\r\n", "invalid HTTP: UnknownProtocol HTTP/2.0"),
        (b"HTTP/1.1 200 " + b"y" * 65536 + b"\r\n\r\n", "invalid HTTP: status line too long"),
    ],
)
def test_bad_status_lines(serve: Serve, clients: Callable[..., HttpClient], raw: bytes, message: str) -> None:
    # The messages are http.client's, less the "??" that stood for the line's CRLF; the "too long"
    # one read "got more than 65536 bytes when reading status line too long".
    server = serve(answer_once(raw))
    with pytest.raises(InvalidResponse) as info:
        clients(server.url).request("GET", "/")
    assert str(info.value) == message


# -- header sections -------------------------------------------------------------------------------


def test_100_headers_are_read_and_101_are_refused(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    def fields(n: int) -> bytes:
        return b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(n - 1)) + b"Content-Length: 0\r\n"

    server = serve(answer_each(lambda n: b"HTTP/1.1 200 OK\r\n" + fields(100 + n) + b"\r\n"))
    client = clients(server.url)
    got = client.request("GET", "/")  # http.client refused this one: it counted the blank line
    assert len(got.headers) == 100
    with pytest.raises(InvalidResponse, match=r"^invalid HTTP: HTTPException got more than 100 headers$"):
        client.request("GET", "/")


def test_a_65536_byte_header_line_is_read_and_a_65537_byte_one_refused(
    serve: Serve, clients: Callable[..., HttpClient]
) -> None:
    def line(total: int) -> bytes:  # "X-Big: yyy...\r\n", ``total`` bytes with its CRLF
        return b"X-Big: " + b"y" * (total - 9) + b"\r\n"

    server = serve(
        answer_each(lambda n: b"HTTP/1.1 200 OK\r\n" + line(65536 + n) + b"Content-Length: 0\r\n\r\n")
    )
    client = clients(server.url)
    assert len(client.request("GET", "/").headers["x-big"]) == 65536 - 9
    with pytest.raises(InvalidResponse) as info:
        client.request("GET", "/")
    assert str(info.value) == "invalid HTTP: header line too long"


def test_repeated_headers_last_wins_in_the_mapping(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(answer_each(ok(extra=b"X-A: 1\r\nx-a: 2\r\nX-B:\r\nX-C:  spaced value \t\r\n")))
    got = clients(server.url).request("GET", "/")
    assert dict(got.headers) == {"x-a": "2", "x-b": "", "x-c": "spaced value", "content-length": "2"}


def test_obs_fold_is_unfolded_with_a_space(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    # RFC 9112 5.2: a server or proxy may reject obs-fold, but "a user agent that receives an obs-fold
    # in a response message ... MUST replace each received obs-fold with one or more SP octets".
    # (http.client kept the CRLF in the value: "a\r\n b".)
    raw = b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\n\t c\r\nContent-Length:\r\n 2\r\n\r\nhi"
    server = serve(answer_each(raw))
    client = clients(server.url)
    got = client.request("GET", "/")
    assert (got.headers["x-a"], got.headers["content-length"], got.body) == ("a b c", "2", b"hi")
    client.request("GET", "/")
    assert server.connections == 1  # the unfolded Content-Length framed the body


def test_a_folded_line_before_any_field_is_dropped(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    # RFC 9112 2.2: reject, or consume each such line without further processing (the email parser did).
    server = serve(answer_each(b"HTTP/1.1 200 OK\r\n Content-Length: 99\r\nContent-Length: 2\r\n\r\nhi"))
    assert clients(server.url).request("GET", "/").body == b"hi"


@pytest.mark.parametrize(
    "line",
    [b"Content-Length : 2", b"no colon here", b": empty name", b"X Y: z", b"X\xe9: z", b"X(1): z"],
)
def test_a_header_line_that_is_not_a_field_is_invalid(
    serve: Serve, clients: Callable[..., HttpClient], line: bytes
) -> None:
    # http.client's email parser took such a line as the end of the headers: every field after it,
    # Content-Length included, was dropped without a word and the body read to the close.
    server = serve(answer_once(b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 2\r\n\r\nhi"))
    with pytest.raises(InvalidResponse, match=r"^invalid HTTP: bad header line$"):
        clients(server.url).request("GET", "/")


def test_bare_cr_and_nul_in_a_field_become_spaces(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    # The email parser broke the line at the CR, so the server's "X: a\rContent-Length: 5" set the length.
    raw = b"HTTP/1.1 200 OK\r\nX: a\rContent-Length: 5\r\nY: b\x00c\r\nContent-Length: 2\r\n\r\nhi"
    server = serve(answer_each(raw))
    got = clients(server.url).request("GET", "/")
    assert (got.headers["x"], got.headers["y"], got.body) == ("a Content-Length: 5", "b c", b"hi")


def test_bare_lf_line_ends_are_accepted(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(answer_each(b"HTTP/1.1 200 OK\nContent-Length: 2\nX-A: 1\r\n\nhi"))
    got = clients(server.url).request("GET", "/")
    assert (got.body, got.headers["x-a"]) == (b"hi", "1")


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Cut: par",
    ],
)
def test_a_close_in_the_middle_of_the_headers_is_connection_lost(
    serve: Serve, clients: Callable[..., HttpClient], raw: bytes
) -> None:
    # http.client took the end of the stream as the end of the headers: a 200 with an empty body.
    server = serve(answer_once(raw))
    with pytest.raises(ConnectionLost, match=r"^connection closed in the middle of the response headers$"):
        clients(server.url).request("GET", "/")


# -- keep-alive ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "reused"),
    [
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n", True),
        (b"HTTP/1.0 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n", True),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n", False),
        (b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\nConnection: close\r\nContent-Length: 2\r\n", False),
    ],
)
def test_http_1_0_keep_alive_and_close(
    serve: Serve, clients: Callable[..., HttpClient], head: bytes, reused: bool
) -> None:
    server = serve(answer_each(head + b"\r\nhi"))
    client = clients(server.url)
    for _ in range(2):
        assert client.request("GET", "/").body == b"hi"
    assert server.connections == (1 if reused else 2)


# -- bodies --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",
    ],
    ids=["length", "chunked", "none"],
)
def test_head_has_no_body_whatever_the_framing_says(
    serve: Serve, clients: Callable[..., HttpClient], head: bytes
) -> None:
    server = serve(answer_each(head))
    client = clients(server.url)
    for _ in range(3):
        got = client.request("HEAD", "/", timeout_s=3)
        assert (got.status, got.body) == (200, b"")
    assert server.connections == 1


def test_204_has_no_body_even_with_a_content_length(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(answer_each(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"))
    client = clients(server.url)
    for _ in range(2):
        got = client.request("DELETE", "/api/delete", timeout_s=3)
        assert (got.status, got.body) == (204, b"")
    assert server.connections == 1


def loopback_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server, _ = listener.accept()
    return client, server


@pytest.mark.parametrize(
    ("status", "method", "extra"),
    [
        (304, "GET", b"Content-Length: 10\r\n"),
        (304, "GET", b"Transfer-Encoding: chunked\r\n"),
        (204, "GET", b"Transfer-Encoding: gzip\r\n"),
        (200, "HEAD", b"Transfer-Encoding: chunked\r\n"),
        (200, "CONNECT", b"Content-Length: 10\r\n"),
    ],
)
def test_no_body_framing_on_a_socket(status: int, method: str, extra: bytes) -> None:
    # A 304 never reaches a caller (the transport refuses any 3xx), so its framing is checked here.
    near, far = loopback_pair()
    with near, far:
        far.sendall(b"HTTP/1.1 %d X\r\n%s\r\nNEXT" % (status, extra))
        fp = near.makefile("rb")
        resp = httpread.read_head(fp, method)
        assert (resp.status, resp.length, resp.will_close) == (status, 0, False)
        assert resp.read1(100) == b""
        assert fp.read(4) == b"NEXT"  # nothing of what follows was taken for a body


def test_304_is_refused_without_waiting_for_a_body(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(answer_each(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n"))
    start = time.monotonic()
    with pytest.raises(RedirectRefused):
        clients(server.url).request("GET", "/", timeout_s=5)
    assert time.monotonic() - start < SLACK_S


@pytest.mark.parametrize("length", [b"abc", b"-5", b"+2", b"2_0", b"2, 3", b" "])
def test_a_content_length_that_is_not_a_number_is_ignored(
    serve: Serve, clients: Callable[..., HttpClient], length: bytes
) -> None:
    # As http.client: no usable length, so the body runs to the close and the connection is not reused.
    # ("+2" and "2_0" it took as numbers, and two differing values it read as the first one.)
    server = serve(answer_each(b"HTTP/1.1 200 OK\r\nContent-Length: %s\r\n\r\nhello" % length))
    client = clients(server.url)
    with pytest.raises(TimedOut, match=r"reading the body"):
        client.request("GET", "/", timeout_s=0.5)  # the server keeps the connection open


def test_an_invalid_content_length_reads_to_the_close(
    serve: Serve, clients: Callable[..., HttpClient]
) -> None:
    server = serve(answer_once(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\nContent-Length: 3\r\n\r\nhello"))
    got = clients(server.url).request("GET", "/")
    assert (got.body, got.headers["content-length"]) == (b"hello", "3")


def test_repeats_of_one_content_length_are_that_length(
    serve: Serve, clients: Callable[..., HttpClient]
) -> None:
    server = serve(answer_each(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nhi"))
    client = clients(server.url)
    for _ in range(2):
        assert client.request("GET", "/").body == b"hi"
    assert server.connections == 1


def test_chunk_extensions_and_trailers(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    body = (
        b'5;name="quoted; value"\r\nhello\r\n'
        b"6 ; a=1;b\r\n world\r\n"
        b"00A\r\n0123456789\r\n"
        b"0;last=yes\r\nX-Trailer: 1\r\nX-Checksum: abc\r\n\r\n"
    )
    server = serve(answer_each(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n" + body))
    client = clients(server.url)
    for _ in range(2):
        got = client.request("GET", "/")
        assert got.body == b"hello world0123456789"
        assert "x-trailer" not in got.headers  # trailers are read and dropped
    assert server.connections == 1


def test_chunked_with_bare_lf_line_ends(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    server = serve(answer_each(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nhi\n0\n\n"))
    assert clients(server.url).request("GET", "/").body == b"hi"


def test_a_chunked_body_whose_trailer_never_comes_is_kept_but_not_its_connection(
    serve: Serve, clients: Callable[..., HttpClient]
) -> None:
    server = serve(answer_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n"))
    client = clients(server.url)
    assert client.request("GET", "/").body == b"hi"  # as http.client: the body is all there
    # Not pooled: the stream ended (a pooled one would be dropped by its liveness peek anyway).
    assert client._idle == []


@pytest.mark.parametrize(
    ("chunks", "error"),
    [
        (b"zz\r\n", "invalid HTTP: bad chunked encoding"),
        (b"0x3\r\nabc\r\n0\r\n\r\n", "invalid HTTP: bad chunked encoding"),  # http.client: int("0x3", 16)
        (b"-3\r\nabc\r\n0\r\n\r\n", "invalid HTTP: bad chunked encoding"),
        (b"3\r\nabcXY0\r\n\r\n", "invalid HTTP: bad chunked encoding"),  # http.client tossed "XY" unread
        (b"\r\n", "invalid HTTP: bad chunked encoding"),
        (b"0" * 65537 + b"\r\n", "invalid HTTP: chunk size too long"),
        (b"1\r\na\r\n0\r\nX: " + b"y" * 65537 + b"\r\n\r\n", "invalid HTTP: trailer line too long"),
        (b"1\r\na\r\n0\r\n" + b"X: y\r\n" * 101 + b"\r\n", "invalid HTTP: more than 100 trailer lines"),
        (b"5\r\nhel", "connection closed in the middle of the body"),
        (b"5\r\nhello", "connection closed in the middle of the body"),
        (b"5\r\nhello\r", "connection closed in the middle of the body"),
        (b"5", "connection closed in the middle of the body"),
        (b"", "connection closed in the middle of the body"),
    ],
)
def test_broken_chunked_bodies(
    serve: Serve, clients: Callable[..., HttpClient], chunks: bytes, error: str
) -> None:
    server = serve(answer_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks))
    with pytest.raises((InvalidResponse, ConnectionLost)) as info:
        clients(server.url).request("GET", "/", timeout_s=5)
    assert str(info.value) == error


def test_transfer_encoding_other_than_chunked_is_refused(
    serve: Serve, clients: Callable[..., HttpClient]
) -> None:
    # http.client returned the still-chunked bytes as the body ("2\r\nhi\r\n0\r\n\r\n").
    server = serve(
        answer_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    )
    with pytest.raises(
        InvalidResponse, match=r"^invalid HTTP: unsupported Transfer-Encoding 'gzip, chunked'$"
    ):
        clients(server.url).request("GET", "/")


def test_chunked_and_a_content_length_chunked_wins_and_the_connection_goes(
    serve: Serve, clients: Callable[..., HttpClient]
) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    server = serve(answer_each(raw))
    client = clients(server.url)
    for _ in range(2):
        assert client.request("GET", "/").body == b"hi"
    assert server.connections == 2


def test_stream_lines_reads_a_chunked_stream_after_100_continue(
    serve: Serve, clients: Callable[..., HttpClient]
) -> None:
    release = threading.Event()

    def handler(conn: Conn) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.send(b'b;x=1\r\n{"a":1}\n{"b\r\n')
        release.wait(10)  # the first line must arrive before the rest is even sent
        conn.send(b'4\r\n":2}\r\n1\r\n\n\r\n0\r\nT: 1\r\n\r\n')

    server = serve(handler)
    with clients(server.url).stream_lines(
        "POST", "/api/pull", total_timeout_s=10, idle_timeout_s=5, max_line_bytes=100
    ) as stream:
        assert next(stream) == b'{"a":1}'
        release.set()
        assert list(stream) == [b'{"b":2}']


# -- generated responses -----------------------------------------------------------------------------

FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Built:
    """A valid response and what reading it must give."""

    raw: bytes
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names, last one wins
    body: bytes  # after framing (empty for a 204)
    complete_at: int  # bytes of ``raw`` a GET needs before the close for the whole body
    framing: str
    has_103: bool


_NAME = st.from_regex(r"X-[A-Za-z0-9-]{1,12}", fullmatch=True)
_VALUE = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=30
).map(str.strip)


@st.composite
def responses(draw: st.DrawFn) -> Built:
    status = draw(st.sampled_from([200, 200, 201, 204, 404, 500, 503]))
    reason = draw(st.sampled_from(["OK", "", "Not Found", "Some Reason"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    interim = draw(st.lists(st.sampled_from(["100", "103"]), max_size=2))
    fields = draw(st.lists(st.tuples(_NAME, _VALUE), max_size=8))
    body = draw(st.binary(max_size=20) | st.binary(min_size=1, max_size=3000)) if status != 204 else b""
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    head = b"".join(
        b"HTTP/1.1 100 Continue\r\n\r\n" if i == "100" else b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        for i in interim
    )
    head += version + b" %d" % status + (b" " + reason.encode() if reason else b"") + b"\r\n"
    for name, value in fields:
        head += name.encode() + b": " + value.encode("latin-1") + b"\r\n"
    if framing == "length":
        head += b"Content-Length: %d\r\n" % len(body)
        data = body
    elif framing == "chunked":
        head += b"Transfer-Encoding: chunked\r\n"
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=5)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
        data = b""
        for piece in pieces:
            ext = draw(st.sampled_from([b"", b";a=b", b' ; q="x;y"']))
            size = draw(st.sampled_from([b"%x", b"%X", b"00%x"])) % len(piece)
            data += size + ext + b"\r\n" + piece + b"\r\n"
        data += b"0\r\n"
        last_line_end = len(head) + 2 + len(data)
        data += draw(st.sampled_from([b"", b"X-Trailer: 1\r\n", b"A: 1\r\nB: 2\r\n"])) + b"\r\n"
    else:
        data = body
    head += b"\r\n"
    raw = head + data
    no_body = status == 204
    if no_body or framing == "close":
        complete_at = len(head)
    elif framing == "chunked":
        complete_at = last_line_end  # the trailer's blank line may be missing (as http.client allowed)
    else:
        complete_at = len(raw)
    headers = {name.lower(): value for name, value in fields}
    if framing == "length":
        headers["content-length"] = str(len(body))
    elif framing == "chunked":
        headers["transfer-encoding"] = "chunked"
    return Built(
        raw, status, reason, headers, b"" if no_body else body, complete_at, framing, "103" in interim
    )


class Canned:
    """One server for a whole generated test; each example sets what it sends."""

    def __init__(self) -> None:
        self.raw = b""
        self.hold = False  # keep the connection open after sending (or close it)
        self.server = RawServer(self._handle)

    def _handle(self, conn: Conn) -> None:
        if conn.read_request() is None:
            return
        raw, hold = self.raw, self.hold
        conn.send(raw)
        if hold:
            conn.read_request()  # until the client closes (or the test ends)

    def client(self, timeout_s: float) -> HttpClient:
        return HttpClient(self.server.url, timeout_s=timeout_s, proxies=ProxyConfig(), max_idle_connections=0)


@pytest.fixture(scope="module")
def canned() -> Iterator[Canned]:
    c = Canned()
    yield c
    c.server.close()


class _FromBytes:
    """http.client as the reference reads the same bytes from memory."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(io.BytesIO(self.raw))


@settings(FUZZ, max_examples=150)
@given(built=responses())
def test_generated_valid_responses_read_as_built_and_as_http_client_reads_them(
    canned: Canned, built: Built
) -> None:
    canned.raw, canned.hold = built.raw, False
    with canned.client(5.0) as client:
        got = client.request("GET", "/")
    assert (got.status, got.reason, dict(got.headers), got.body) == (
        built.status,
        built.reason,
        built.headers,
        built.body,
    )
    if built.has_103:
        return  # http.client fails a 103 (see test_103_early_hints_is_skipped_too)
    ref = http.client.HTTPResponse(_FromBytes(built.raw))  # type: ignore[arg-type]
    ref.begin()
    assert (ref.status, ref.reason, {k.lower(): v for k, v in ref.getheaders()}, ref.read()) == (
        got.status,
        got.reason,
        dict(got.headers),
        got.body,
    )


def _read(client: HttpClient, how: str) -> Response | list[bytes]:
    if how == "stream":
        with client.stream_lines(
            "GET", "/", total_timeout_s=client.timeout_s, idle_timeout_s=5, max_line_bytes=500
        ) as stream:
            return list(stream)
    return client.request(how, "/")


_NOISE = st.sampled_from(
    [b"\r", b"\n", b"\r\n", b" ", b":", b";", b"0", b"\x00", b"\xff", b"HTTP/1.1 ", b"\r\n\r\n"]
)


@st.composite
def hostile(draw: st.DrawFn) -> tuple[bytes, int | None, Built | None]:
    """Bytes to send: random, a valid response cut short, or one with noise in it."""
    kind = draw(st.sampled_from(["random", "cut", "noise"]))
    if kind == "random":
        prefix = draw(st.sampled_from([b"", b"HTTP/1.1 ", b"HTTP/1.1 200 OK\r\n"]))
        return prefix + draw(st.binary(max_size=300)), None, None
    built = draw(responses())
    if kind == "cut":
        # anywhere, or somewhere in the body (where the framing has most to get wrong)
        start = draw(st.sampled_from([0, len(built.raw) - len(built.body)]))
        cut = draw(st.integers(max(0, start), len(built.raw)))
        return built.raw[:cut], cut, built
    raw = bytearray(built.raw)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(raw)))
        raw[at:at] = draw(_NOISE) if draw(st.booleans()) else bytes([draw(st.integers(0, 255))])
    return bytes(raw), None, None


@settings(FUZZ, max_examples=300)
@given(case=hostile(), how=st.sampled_from(["GET", "GET", "HEAD", "stream"]))
def test_anything_a_server_sends_then_closes_is_a_response_or_a_transport_error(
    canned: Canned, case: tuple[bytes, int | None, Built | None], how: str
) -> None:
    raw, cut, built = case
    canned.raw, canned.hold = raw, False
    start = time.monotonic()
    with canned.client(3.0) as client:
        try:
            got = _read(client, how)
        except TransportError:
            got = None
    assert time.monotonic() - start < 3.0 + SLACK_S
    if built is None or cut is None or how != "GET":
        return
    # A valid response cut short: whole where enough of it arrived, an error where not.
    if cut < built.complete_at:
        assert got is None, (raw, got)
    else:
        assert isinstance(got, Response), raw
        whole = built.body[: cut - built.complete_at] if built.framing == "close" else built.body
        assert got.body == whole


@settings(FUZZ, max_examples=20)
@given(case=hostile(), how=st.sampled_from(["GET", "HEAD", "stream"]))
def test_a_server_that_sends_anything_and_keeps_the_connection_open_never_hangs_a_call(
    canned: Canned, case: tuple[bytes, int | None, Built | None], how: str
) -> None:
    canned.raw, canned.hold = case[0], True
    start = time.monotonic()
    with canned.client(0.3) as client, contextlib.suppress(TransportError):
        _read(client, how)
    assert time.monotonic() - start < 0.3 + SLACK_S


def test_json_bodies_survive_the_round_trip(serve: Serve, clients: Callable[..., HttpClient]) -> None:
    body = json.dumps({"models": [{"name": "m", "size": 1}] * 500}).encode()
    server = serve(answer_each(ok(body)))
    assert json.loads(clients(server.url).request("GET", "/api/ps").body) == json.loads(body)
