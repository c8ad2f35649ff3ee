"""Hostile and broken replies for the emulator's fault modes, built cheaply.

Pure apart from a cached gzip block: nothing here does I/O. Big bodies are generators that yield
64 KiB pieces, so a 200 MB reply never sits in memory; the gzip bomb is one 1 MiB deflate block
repeated (a full flush makes every repeat byte-identical), about 2 MB that inflates to 2 GiB.
"""

from __future__ import annotations

import functools
import json
import struct
import zlib
from collections.abc import Iterator
from typing import Any

from gpu_router.state import MIB

HUGE_BODY_BYTES = 200 * 1000 * 1000
DEEP_JSON_DEPTH = 200_000
_PIECE = 64 * 1024

# dcgm-exporter blank values: DCGM_FT_INT64_BLANK (0x7ffffffffffffff0) .. NOT_SUPPORTED (..f2).
DCGM_INT64_NOT_SUPPORTED = 0x7FFFFFFFFFFFFFF2
DCGM_INT64_BLANK = 0x7FFFFFFFFFFFFFF0

_BOMB_PREFIX = b'{"models":['
_BOMB_MIB = 2048
_BOMB_CRC32 = 0xB7ECCC00  # zlib.crc32 of _BOMB_PREFIX + 2048 MiB of spaces (checked by a test)


def huge_body(size_bytes: int = HUGE_BODY_BYTES) -> Iterator[bytes]:
    """A JSON-looking body of ``size_bytes``: an object that opens and never closes in time."""
    head = b'{"models":[{"name":"'
    yield head
    left = size_bytes - len(head)
    piece = b"x" * _PIECE
    while left > 0:
        n = min(left, _PIECE)
        yield piece[:n]
        left -= n


def deep_json(depth: int = DEEP_JSON_DEPTH) -> bytes:
    """``[`` repeated ``depth`` times: valid JSON so far, deeper than any recursive parser allows."""
    return b"[" * depth


def non_utf8_json() -> bytes:
    """A JSON body whose strings are not UTF-8 (Latin-1 and stray continuation bytes)."""
    return b'{"models":[{"name":"caf\xe9\xff\xfe:latest","model":"\x80\x81","size":1}]}'


def html_error_page(status: int) -> bytes:
    """What a reverse proxy in front of Ollama sends when its upstream is gone (nginx style)."""
    reason = {502: "Bad Gateway", 503: "Service Temporarily Unavailable", 504: "Gateway Time-out"}.get(
        status, "Error"
    )
    return (
        f"<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status} {reason}</h1></center>\r\n<hr><center>nginx/1.24.0</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()


@functools.lru_cache(maxsize=1)
def _bomb_parts() -> tuple[bytes, bytes, bytes]:
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = co.compress(_BOMB_PREFIX) + co.flush(zlib.Z_FULL_FLUSH)
    block = co.compress(b" " * MIB) + co.flush(zlib.Z_FULL_FLUSH)
    tail = co.flush(zlib.Z_FINISH)  # the final (empty) block
    return head, block, tail


def gzip_bomb() -> Iterator[bytes]:
    """A gzip body (about 2 MB) that inflates to 2 GiB of a JSON prefix and spaces, CRC correct."""
    head, block, tail = _bomb_parts()
    # RFC 1952 header: magic, deflate, no flags, mtime 0, max compression, unix.
    yield b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03" + head
    batch = block * 64
    for _ in range(_BOMB_MIB // 64):
        yield batch
    size = (len(_BOMB_PREFIX) + _BOMB_MIB * MIB) % 2**32
    yield tail + struct.pack("<II", _BOMB_CRC32, size)


def bomb_inflated_bytes() -> int:
    """How many bytes :func:`gzip_bomb` inflates to."""
    return len(_BOMB_PREFIX) + _BOMB_MIB * MIB


def ps_anomaly(kind: str, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``/api/ps`` entries bent the way broken or hostile servers bend them.

    ``duplicate``: every entry twice; ``negative``: negative sizes; ``huge``: sizes of 10**30;
    ``vram_over``: ``size_vram`` larger than ``size``.
    """
    out: list[dict[str, Any]] = []
    for entry in entries:
        e = dict(entry)
        if kind == "duplicate":
            out.extend([e, dict(e)])
            continue
        if kind == "negative":
            e["size"], e["size_vram"] = -abs(int(e["size"]) or 1), -abs(int(e["size_vram"]) or 1)
        elif kind == "huge":
            e["size"], e["size_vram"] = 10**30, 10**30
        elif kind == "vram_over":
            e["size_vram"] = int(e["size"]) * 2 + 1
        out.append(e)
    return out


def json_bytes(obj: object) -> bytes:
    """Compact JSON, as Go's encoder writes it."""
    return json.dumps(obj, separators=(",", ":")).encode()
