"""systemd integration: sd_notify messages and journald-aware logging.

The notify protocol (sd_notify(3)): each message is one datagram of newline-separated
``KEY=VALUE`` lines, sent to the AF_UNIX socket named by ``$NOTIFY_SOCKET``. Logging goes to
stderr; under journald every line carries an ``<N>`` syslog priority prefix (sd-daemon(3)).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import unicodedata
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    import socket

__all__ = [
    "STATUS_MAX_CHARS",
    "JournalFormatter",
    "Notifier",
    "journal_stream_matches",
    "set_level",
    "setup_logging",
]

log = logging.getLogger(__name__)

#: STATUS= text is cut to this many characters; systemctl status shows one short line anyway.
STATUS_MAX_CHARS = 200

# Linux sockaddr_un.sun_path is 108 bytes; a filesystem path also needs its NUL terminator.
_SUN_PATH_MAX = 108
# Unicode categories replaced by a space in STATUS: controls, surrogates, line/paragraph separators.
_NOT_IN_LINE = frozenset({"Cc", "Cs", "Zl", "Zp"})


def _one_line(text: str, limit: int = STATUS_MAX_CHARS) -> str:
    """Replace control characters with spaces, collapse runs of spaces and cap the length."""
    # Cc covers \n, \r, \t, NUL and U+0085, Cs lone surrogates (surrogateescape'd bytes);
    # a newline would end STATUS= and start a new KEY= line in the datagram.
    cleaned = "".join(" " if unicodedata.category(ch) in _NOT_IN_LINE else ch for ch in text)
    # Only plain spaces are collapsed: U+00A0 and friends are kept as the caller wrote them.
    line = re.sub(" {2,}", " ", cleaned).strip(" ")
    if len(line) > limit:
        line = line[: limit - 3].rstrip() + "..."
    return line


def _parse_address(raw: str) -> str | None:
    """Turn a ``$NOTIFY_SOCKET`` value into a socket address, or None when unusable."""
    if raw.startswith("@"):
        # Abstract namespace: a leading NUL, no terminator; the name may not be empty.
        addr = "\0" + raw[1:]
        if len(raw) < 2 or len(os.fsencode(addr)) > _SUN_PATH_MAX:
            return None
        return addr
    if raw.startswith("/"):
        if len(os.fsencode(raw)) >= _SUN_PATH_MAX:
            return None
        return raw
    # vsock:CID:PORT (systemd >= 254, VMs) and relative paths are not supported here.
    return None


def _parse_watchdog_s(environ: Mapping[str, str], pid: int) -> float | None:
    """Return the watchdog ping interval (half of WATCHDOG_USEC) in seconds, or None."""
    raw_usec = environ.get("WATCHDOG_USEC", "").strip()
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.warning("ignoring invalid WATCHDOG_USEC=%r", raw_usec)
        return None
    if usec <= 0:
        return None
    raw_pid = environ.get("WATCHDOG_PID", "").strip()
    if raw_pid:
        # The watchdog may be meant for another process (e.g. our parent exec'd us with its env).
        try:
            if int(raw_pid) != pid:
                return None
        except ValueError:
            log.warning("ignoring watchdog: invalid WATCHDOG_PID=%r", raw_pid)
            return None
    return usec / 2 / 1_000_000


class Notifier:
    """sd_notify for the daemon: READY, STATUS, WATCHDOG, RELOADING and STOPPING messages.

    Messages are built and encoded as UTF-8 here. The ``sdnotify`` package is not used for
    sending: it reads ``os.environ`` itself (so an injected environ is ignored) and encodes
    latin-1, silently dropping any message with other characters. Without ``NOTIFY_SOCKET``
    every method is a no-op that returns False.
    """

    def __init__(
        self,
        environ: Mapping[str, str] = os.environ,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID once from ``environ``."""
        self._clock_ns = clock_ns
        self._sock: socket.socket | None = None
        self._address: str | None = None
        self._last_ping_ns: int | None = None
        self._failing = False
        raw = environ.get("NOTIFY_SOCKET", "")
        if raw:
            self._address = _parse_address(raw)
            if self._address is None:
                log.warning("NOTIFY_SOCKET=%r is not a usable AF_UNIX address; notifications disabled", raw)
        if self._address is not None:
            try:
                import socket  # here: --check-config and the report never notify systemd

                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            except OSError as exc:
                log.warning("cannot create the notify socket: %s; notifications disabled", exc)
                self._address = None
            else:
                # Non-blocking: a full receive queue must drop a message, not stall the loop.
                sock.setblocking(False)
                self._sock = sock
        self.enabled: bool = self._sock is not None
        self.watchdog_interval_s: float | None = (
            _parse_watchdog_s(environ, os.getpid()) if self.enabled else None
        )

    def _send(self, fields: list[tuple[str, str]]) -> bool:
        """Send ``fields`` as one datagram; return False (never raise) when it is not delivered."""
        sock, address = self._sock, self._address
        if sock is None or address is None:
            return False
        payload = "\n".join(f"{key}={value}" for key, value in fields).encode("utf-8", "replace")
        try:
            # sendto() per message (as libsystemd does) instead of connect(): a receiver that
            # re-binds the socket is reached again without reconnecting.
            sock.sendto(payload, address)
        except OSError as exc:
            # Socket gone (ECONNREFUSED/ENOENT) or queue full (EAGAIN): log once per failure streak.
            if not self._failing:
                log.warning("sd_notify to %r failed: %s", self._display_address(), exc)
                self._failing = True
            else:
                log.debug("sd_notify still failing: %s", exc)
            return False
        if self._failing:
            log.info("sd_notify delivered again")
            self._failing = False
        return True

    def _display_address(self) -> str:
        """Return the socket address in NOTIFY_SOCKET notation, for logs."""
        address = self._address or ""
        return "@" + address[1:] if address.startswith("\0") else address

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up (or a reload) has finished: ``READY=1`` plus an optional STATUS."""
        fields = [("READY", "1")]
        if status is not None:
            fields.append(("STATUS", _one_line(status)))
        return self._send(fields)

    def status(self, text: str) -> bool:
        """Set the one-line status shown by ``systemctl status`` (UTF-8, capped in length)."""
        return self._send([("STATUS", _one_line(text))])

    def watchdog(self) -> bool:
        """Send ``WATCHDOG=1`` when a watchdog is configured for this process."""
        if self.watchdog_interval_s is None:
            return False
        # Read the clock before sending so a slow send never makes the next ping late.
        now_ns = self._clock_ns()
        sent = self._send([("WATCHDOG", "1")])
        if sent:
            self._last_ping_ns = now_ns
        return sent

    def watchdog_due(self) -> bool:
        """Return True when a watchdog is configured and the last ping is older than the interval."""
        if self.watchdog_interval_s is None:
            return False
        if self._last_ping_ns is None:
            return True
        return (self._clock_ns() - self._last_ping_ns) >= self.watchdog_interval_s * 1e9

    def reloading(self, status: str = "Reloading configuration") -> bool:
        """Announce a configuration reload; follow it with :meth:`ready` when done, even on failure."""
        # Type=notify-reload (systemd >= 253) needs MONOTONIC_USEC from CLOCK_MONOTONIC, not
        # the injected clock, to match this RELOADING=1 to the reload it started.
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(
            [("RELOADING", "1"), ("MONOTONIC_USEC", str(monotonic_usec)), ("STATUS", _one_line(status))]
        )

    def stopping(self, status: str = "Stopping") -> bool:
        """Tell systemd the daemon is shutting down."""
        return self._send([("STOPPING", "1"), ("STATUS", _one_line(status))])

    def close(self) -> None:
        """Close the socket; afterwards every method returns False."""
        sock, self._sock = self._sock, None
        self.enabled = False
        if sock is not None:
            sock.close()

    def __enter__(self) -> Notifier:
        """Return self; the socket is closed on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the socket."""
        self.close()


# --- logging ---------------------------------------------------------------------------------

_LOGGER_NAME = "gpu_router"
_JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"
_PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_PLAIN_DATEFMT = "%Y-%m-%d %H:%M:%S"
_LEVELS = {
    "CRITICAL": logging.CRITICAL,
    "ERROR": logging.ERROR,
    "WARNING": logging.WARNING,
    "WARN": logging.WARNING,
    "INFO": logging.INFO,
    "DEBUG": logging.DEBUG,
}

_handler: logging.Handler | None = None


def journal_stream_matches(environ: Mapping[str, str] = os.environ, fd: int = 2) -> bool:
    """Return True when ``$JOURNAL_STREAM`` (``dev:ino``) names the file open on ``fd``.

    systemd.exec(5): checking that the variable is set is not enough, since a child whose
    stderr was redirected inherits it.
    """
    raw = environ.get("JOURNAL_STREAM", "")
    dev_s, sep, ino_s = raw.partition(":")
    if not sep:
        return False
    try:
        dev, ino = int(dev_s), int(ino_s)
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def _syslog_priority(levelno: int) -> int:
    """Map a logging level to a syslog priority (sd-daemon(3) ``<N>`` prefixes)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """Prefix every line with its ``<N>`` syslog priority, as journald parses each line alone."""

    def format(self, record: logging.LogRecord) -> str:
        """Format the record and prefix each line, traceback lines included."""
        prefix = f"<{_syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def _parse_level(level: str | int) -> int:
    """Return the numeric logging level for a name such as ``"info"`` or a number."""
    if isinstance(level, bool):
        raise TypeError(f"log level must be a name or a number, not {level!r}")
    if isinstance(level, int):
        return level
    try:
        return _LEVELS[level.strip().upper()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}; expected one of debug, info, warning, error, critical"
        ) from None


def _stream_is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Return True when ``stream`` writes to the journal stream named in ``environ``."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        # io.UnsupportedOperation (StringIO, pytest capture) is an OSError and a ValueError.
        return False
    return journal_stream_matches(environ, fd)


def setup_logging(
    level: str | int,
    stream: TextIO | None = None,
    environ: Mapping[str, str] = os.environ,
    force_journal: bool | None = None,
) -> logging.Handler:
    """Install one stderr handler on the ``gpu_router`` logger tree and return it.

    Under journald lines are ``<6>INFO gpu_router.x: msg`` (journald adds time and pid);
    otherwise ``2026-11-23 10:00:00 INFO gpu_router.x: msg``. A second call (a reload
    changing log_level) replaces the previous handler instead of adding another.

    Raises:
        ValueError: ``level`` is not a known level name.
    """
    global _handler
    levelno = _parse_level(level)
    out = sys.stderr if stream is None else stream
    journal = _stream_is_journal(out, environ) if force_journal is None else force_journal
    handler: logging.StreamHandler[TextIO] = logging.StreamHandler(out)
    if journal:
        handler.setFormatter(JournalFormatter(_JOURNAL_FORMAT))
    else:
        handler.setFormatter(logging.Formatter(_PLAIN_FORMAT, _PLAIN_DATEFMT))

    old = _handler
    logger = logging.getLogger(_LOGGER_NAME)
    if old is not None:
        logger.removeHandler(old)
    logger.addHandler(handler)
    _handler = handler
    if old is not None:
        old.close()
    # The root logger is left alone so other libraries stay quiet; propagation stays on so
    # pytest's caplog (a root handler) still sees records, and the root has no handler in
    # the daemon, so nothing is printed twice.
    set_level(levelno)
    return handler


def set_level(level: str | int) -> None:
    """Set the level of the ``gpu_router`` loggers.

    Raises:
        ValueError: ``level`` is not a known level name.
    """
    levelno = _parse_level(level)
    logging.getLogger(_LOGGER_NAME).setLevel(levelno)
