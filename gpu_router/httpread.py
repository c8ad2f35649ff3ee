"""Reading one HTTP/1.1 response off a buffered byte stream: status line, header fields, body framing.

:mod:`gpu_router.transport` used ``http.client.HTTPResponse`` for this alone. Importing it costs about
20 ms of start-up (it pulls in ``email``, ``ssl`` and ``calendar``), and its ``email`` header parser
about 50 µs per response; this reader takes a fifth of that or less (``bench/bench_http_parse.py``).

The rules are RFC 9112's. Where http.client was more lenient and nothing rides on it, its choices
stay: the same line and header limits, a Content-Length that is not a number ignored (the body then
ends when the connection does, and the connection is not reused), a chunked body whose trailer never
comes taken as whole.

The stream is an ``io.BufferedReader`` whose raw reads the caller bounds (by a deadline); nothing here
waits on its own, and whatever the raw reads raise passes through untouched. What the bytes themselves
get wrong is one of three exceptions, which never leave the transport: it maps each to a
``TransportError`` that says where and when.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import io

MAX_LINE = 65536  # http.client's _MAXLINE: a status, header, chunk-size or trailer line over this is an error
MAX_FIELDS = 100  # header lines (continuations count) in one header section, and trailer lines
_LIMIT = MAX_LINE + 1  # readline's limit: one byte more tells a line over MAX_LINE from one at it
# RFC 9110 token: what a field name is made of.
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_HEX = re.compile(rb"[0-9A-Fa-f]+")
# Field names seen before, as lower-case text: the same few (Content-Type, Date...) come in every
# response, and looking one up costs less than checking and converting it again. Bounded in count
# and length, so a server that makes up names fills it once (with 32 KiB at most) and then costs the
# full check.
_NAMES: dict[bytes, str] = {}
_MAX_NAMES = 512
_MAX_NAME_BYTES = 64

MID_HEAD = "connection closed in the middle of the response headers"
MID_BODY = "connection closed in the middle of the body"


class HttpReadError(Exception):
    """The bytes are not a complete, valid response (never raised for what the stream itself raises)."""


class NoResponse(HttpReadError):
    """The stream ended before the first byte of a status line."""


class Truncated(HttpReadError):
    """The stream ended part-way through the response; ``reason`` says where."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Malformed(HttpReadError):
    """Not valid HTTP: ``reason`` says how, ``detail`` (server text, unshortened) what was read."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


class Incoming:
    """A response whose status line and header section have been read; :meth:`read1` reads its body.

    ``headers`` maps lower-case names to values (the last line wins when a name repeats, as
    ``{k.lower(): v for k, v in resp.getheaders()}`` did); :meth:`field` joins repeated lines the way
    the framing reads them. ``length`` is the number of body bytes still due by Content-Length
    (0: no body, or all of it read), or None when the body is chunked or ends with the connection.
    ``will_close``: the connection cannot carry another request after this response.
    """

    __slots__ = (
        "_chunk_left",
        "_crlf_due",
        "_done",
        "_fp",
        "_repeated",
        "chunked",
        "headers",
        "length",
        "reason",
        "status",
        "version",
        "will_close",
    )

    def __init__(
        self,
        fp: io.BufferedReader,
        version: int,
        status: int,
        reason: str,
        headers: dict[str, str],
        repeated: dict[str, str] | None,
    ) -> None:
        self._fp = fp
        self.version = version  # 10 for HTTP/1.0 (and 0.9), 11 for HTTP/1.1 and later 1.x
        self.status = status
        self.reason = reason
        self.headers = headers
        self._repeated = repeated
        self.chunked = False
        self.length: int | None = None
        self.will_close = False
        self._chunk_left = 0
        self._crlf_due = False  # a chunk's data was read in full; the CRLF after it was not
        self._done = False

    def field(self, name: str) -> str | None:
        """The value of header ``name`` (lower case), repeated lines joined with ", " as RFC 9110 does."""
        if self._repeated is not None and name in self._repeated:
            return self._repeated[name]
        return self.headers.get(name)

    def read1(self, n: int) -> bytes:
        """Up to ``n`` bytes of the body with at most one raw read for data; b"" at its end.

        With a Content-Length, b"" while ``length`` is still above 0 means the stream ended early.
        """
        if self.chunked:
            return self._read1_chunked(n)
        length = self.length
        if length is None:
            return b"" if self._done else self._until_close(n)
        if length == 0:
            return b""
        data = self._fp.read1(min(n, length))
        self.length = length - len(data)
        return data

    def _until_close(self, n: int) -> bytes:
        data = self._fp.read1(n)
        if not data:
            self._done = True
        return data

    def _read1_chunked(self, n: int) -> bytes:
        left = self._chunk_left
        if left == 0:
            if self._done:
                return b""
            left = self._next_chunk()
            if left == 0:
                return b""
        data = self._fp.read1(min(n, left))
        if not data:
            raise Truncated(MID_BODY)
        left -= len(data)
        self._chunk_left = left
        self._crlf_due = left == 0
        return data

    def _next_chunk(self) -> int:
        """The size of the next chunk; 0 after the last one (its trailer read and dropped)."""
        fp = self._fp
        if self._crlf_due:
            # http.client tossed these two bytes unread; anything but CRLF (or a bare LF) means the
            # sizes no longer line up with the data, so what follows would be read as the wrong thing.
            end = fp.read(1)
            if end == b"\r":
                end = fp.read(1)
            if end != b"\n":
                raise Truncated(MID_BODY) if not end else Malformed("bad chunked encoding")
            self._crlf_due = False
        line = fp.readline(_LIMIT)
        if len(line) > MAX_LINE:
            raise Malformed("chunk size too long")
        if not line.endswith(b"\n"):
            raise Truncated(MID_BODY)
        # int(x, 16) alone would take "-5", "+5", "0x5" and "5_0": only hex digits are a chunk size.
        size = line.split(b";", 1)[0].strip(b" \t\r\n")
        if not _HEX.fullmatch(size):
            raise Malformed("bad chunked encoding")
        left = int(size, 16)
        if left == 0:
            self._skip_trailer()
            self._done = True
            return 0
        self._chunk_left = left
        return left

    def _skip_trailer(self) -> None:
        fp = self._fp
        for _ in range(MAX_FIELDS + 1):
            line = fp.readline(_LIMIT)
            if len(line) > MAX_LINE:
                raise Malformed("trailer line too long")
            # The end of the stream in place of the trailer's blank line is forgiven, as http.client
            # does: the body is all there (the caller sees the close and does not reuse the connection).
            if line == b"\r\n" or line == b"\n" or not line.endswith(b"\n"):
                return
        raise Malformed(f"more than {MAX_FIELDS} trailer lines")


def read_head(fp: io.BufferedReader, method: str) -> Incoming:
    """Read a response's status line and header section from ``fp``; its body is left to ``read1``.

    Interim responses (1xx but 101) are read and dropped. A 101 is returned: no request of ours asks
    for an upgrade, so the caller treats it as an error, and nothing after it is HTTP.
    """
    while True:
        line = fp.readline(_LIMIT)
        if not line:
            raise NoResponse()
        if len(line) > MAX_LINE:
            raise Malformed("status line too long")
        version, status, reason = _status_line(line)
        if not line.endswith(b"\n"):
            raise Truncated(MID_HEAD)
        if status >= 200 or status == 101:
            break
        # RFC 9110 15.2: a client must parse (and may ignore) any 1xx before the final response.
        # http.client skipped only 100 and failed the call on 102 or 103 Early Hints.
        _read_fields(fp)
    headers, repeated = _read_fields(fp)
    resp = Incoming(fp, version, status, reason, headers, repeated)
    _frame(resp, method)
    return resp


def _status_line(line: bytes) -> tuple[int, int, str]:
    # Split on any ASCII whitespace, as http.client did: a stray double space is no reason to fail.
    parts = line.split(None, 2)
    if (
        len(parts) < 2
        or not parts[0].startswith(b"HTTP/")
        or len(parts[1]) != 3
        or not parts[1].isdigit()  # bytes: ASCII digits only, so no "+20" or "2_0"
        or parts[1][:1] == b"0"
    ):
        text = line.rstrip(b"\r\n").decode("latin-1")
        raise Malformed("BadStatusLine", text or "(an empty line)")
    version = parts[0]
    if version in (b"HTTP/1.0", b"HTTP/0.9"):  # 0.9 is how some servers spell 1.0 (http.client too)
        number = 10
    elif version.startswith(b"HTTP/1."):
        number = 11
    else:
        raise Malformed("UnknownProtocol", version.decode("latin-1"))
    reason = parts[2].strip().decode("latin-1") if len(parts) == 3 else ""
    return number, int(parts[1]), reason


def _read_fields(fp: io.BufferedReader) -> tuple[dict[str, str], dict[str, str] | None]:
    """Header lines up to the blank line: (last value of each name, joined values of repeated names)."""
    fields: dict[str, str] = {}
    repeated: dict[str, str] | None = None
    name = ""
    readline = fp.readline
    names = _NAMES
    for _ in range(MAX_FIELDS + 1):
        line = readline(_LIMIT)
        if len(line) > MAX_LINE:
            raise Malformed("header line too long")
        if line.endswith(b"\r\n"):
            if len(line) == 2:
                return fields, repeated
            line = line[:-2]
        elif line.endswith(b"\n"):
            if len(line) == 1:
                return fields, repeated
            line = line[:-1]
        else:
            raise Truncated(MID_HEAD)
        if 13 in line or 0 in line:  # CR, NUL (an int is found faster than a one-byte bytes)
            # RFC 9110 5.5 / RFC 9112 2.2: replace with SP (or reject). The email parser behind
            # http.client broke lines at a bare CR, so "X: a\rContent-Length: 0" framed the body.
            line = line.replace(b"\r", b" ").replace(b"\0", b" ")
        if line[0] == 32 or line[0] == 9:  # SP, HTAB
            # obs-fold. RFC 9112 5.2 lets a server or proxy reject it but tells a user agent to
            # replace it with SP; a line before any field is dropped (2.2), as the email parser did.
            if name:
                more = line.strip(b" \t").decode("latin-1")
                fields[name] = f"{fields[name]} {more}".strip()
                if repeated is not None and name in repeated:
                    repeated[name] = f"{repeated[name]} {more}".rstrip()
            continue
        raw_name, colon, raw_value = line.partition(b":")
        known = names.get(raw_name)
        if known is not None and colon:
            name = known
        # A name that is not a token (a space before the colon, no colon at all) is not guessed at:
        # the email parser took such a line as the end of the headers and dropped the ones after it.
        elif not colon or not _TOKEN.fullmatch(raw_name):
            raise Malformed("bad header line")
        else:
            name = raw_name.decode("ascii").lower()
            if len(names) < _MAX_NAMES and len(raw_name) <= _MAX_NAME_BYTES:
                names[raw_name] = name
        value = raw_value.strip(b" \t").decode("latin-1")
        if name in fields:
            if repeated is None:
                repeated = {}
            repeated[name] = f"{repeated.get(name, fields[name])}, {value}"
        fields[name] = value
    raise Malformed(f"HTTPException got more than {MAX_FIELDS} headers")


def _frame(resp: Incoming, method: str) -> None:
    """Set how the body ends (``chunked``, ``length``) and whether the connection does (``will_close``)."""
    get = resp.headers.get if resp._repeated is None else resp.field
    status = resp.status
    connection = (get("connection") or "").lower()
    if "close" in connection:
        will_close = True
    elif resp.version == 11:
        will_close = False
    else:  # HTTP/1.0 keeps the connection only when it says so, in any of the ways http.client knew
        will_close = not (
            get("keep-alive")
            or "keep-alive" in connection
            or "keep-alive" in (get("proxy-connection") or "").lower()
        )
    if method == "HEAD" or status < 200 or status in (204, 304) or (method == "CONNECT" and status < 300):
        resp.length = 0
        resp.will_close = will_close
        return
    coding = get("transfer-encoding")
    if coding is not None:
        codings = [c for c in (p.strip().lower() for p in coding.split(",")) if c and c != "identity"]
        if codings == ["chunked"]:
            resp.chunked = True
            # Both framings at once is how responses get split (RFC 9112 6.3): chunked wins, and
            # the connection is not trusted with another request.
            resp.will_close = will_close or get("content-length") is not None
            return
        if codings:
            # Any other coding (gzip under the chunks, say) we cannot undo; http.client handed the
            # still-framed bytes back as the body.
            raise Malformed(f"unsupported Transfer-Encoding {coding[:40]!r}")
    resp.length = _content_length(get("content-length"))
    # Without a length the body ends when the connection does.
    resp.will_close = will_close or resp.length is None


def _content_length(value: str | None) -> int | None:
    """The Content-Length, or None where there is none or it is invalid (as http.client ignored it).

    Repeats of one value ("5, 5") are that value (RFC 9112 6.3); differing ones are invalid.
    """
    if value is None:
        return None
    if not (value.isdigit() and value.isascii()):
        first, *rest = (v.strip() for v in value.split(","))
        if any(v != first for v in rest) or not (first.isdigit() and first.isascii()):
            return None
        value = first
    try:
        return int(value)
    except ValueError:  # over int's digit limit: no real length, and no way to read it
        return None
