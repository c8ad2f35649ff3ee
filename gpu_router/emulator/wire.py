"""Wire formats Ollama uses: Go durations for ``keep_alive`` and RFC 3339 timestamps. Pure."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timedelta, timezone

from gpu_router.emulator.catalogue import MAX_DURATION_NS

FOREVER_S = math.inf


# ---------------------------------------------------------------------------------------------
# keep_alive: api.Duration.UnmarshalJSON and Go's time.ParseDuration


_GO_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_GO_NUMBER = re.compile(r"([0-9]*)(?:\.([0-9]*))?")
_GO_UNIT = re.compile(r"[^0-9.]*")


def parse_go_duration(text: str) -> float:
    """Go's ``time.ParseDuration`` in seconds; raises ValueError with Go's exact message."""
    quoted = json.dumps(text, ensure_ascii=False)
    rest = text
    negative = False
    if rest[:1] in ("-", "+"):
        negative = rest[0] == "-"
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if rest == "":
        raise ValueError(f"time: invalid duration {quoted}")
    total_ns = 0.0
    while rest:
        number = _GO_NUMBER.match(rest)
        assert number is not None  # the pattern matches the empty string
        whole, frac = number.group(1), number.group(2)
        if not whole and not frac:
            raise ValueError(f"time: invalid duration {quoted}")
        rest = rest[number.end() :]
        unit_match = _GO_UNIT.match(rest)
        unit = unit_match.group(0) if unit_match else ""
        if unit == "":
            raise ValueError(f"time: missing unit in duration {quoted}")
        if unit not in _GO_UNITS_NS:
            raise ValueError(
                f"time: unknown unit {json.dumps(unit, ensure_ascii=False)} in duration {quoted}"
            )
        rest = rest[len(unit) :]
        total_ns += float(f"{whole or '0'}.{frac or '0'}") * _GO_UNITS_NS[unit]
    if total_ns > MAX_DURATION_NS:
        raise ValueError(f"time: invalid duration {quoted}")
    return -total_ns / 1e9 if negative else total_ns / 1e9


def parse_keep_alive(value: object) -> float | None:
    """A request's ``keep_alive`` in seconds: None when absent/null, ``math.inf`` for forever.

    A number is seconds (negative = forever); a string is a Go duration (negative = forever; a bare
    integer string such as ``"-1"`` is an error, as in Ollama). Raises ValueError with Go's message.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("Unsupported type: 'bool'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_go_duration(value)
    elif isinstance(value, list):
        raise ValueError("Unsupported type: '[]interface {}'")
    elif isinstance(value, dict):
        raise ValueError("Unsupported type: 'map[string]interface {}'")
    else:
        raise ValueError(f"Unsupported type: '{type(value).__name__}'")
    if seconds < 0 or math.isnan(seconds) or seconds * 1e9 >= MAX_DURATION_NS:
        return FOREVER_S
    return seconds


# ---------------------------------------------------------------------------------------------
# time formatting


def format_rfc3339nano(wall_ns: int, tz: timezone) -> str:
    """Go's ``time.RFC3339Nano``: trailing zeros of the fraction trimmed, ``Z`` for UTC."""
    seconds, frac = divmod(wall_ns, 1_000_000_000)
    dt = datetime.fromtimestamp(seconds, tz)
    text = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    offset = dt.utcoffset() or timedelta(0)
    if offset == timedelta(0):
        return text + "Z"
    total_min = int(offset.total_seconds()) // 60
    sign = "-" if total_min < 0 else "+"
    hours, minutes = divmod(abs(total_min), 60)
    return f"{text}{sign}{hours:02d}:{minutes:02d}"


def parse_env_keep_alive(text: str) -> float:
    """``envconfig.KeepAlive``: a Go duration or whole seconds; negative means forever."""
    try:
        seconds = parse_go_duration(text)
    except ValueError:
        try:
            seconds = float(int(text.strip()))
        except ValueError:
            raise ValueError(f"OLLAMA_KEEP_ALIVE={text!r} is neither a duration nor whole seconds") from None
    return FOREVER_S if seconds < 0 else seconds
