"""Journald-aware logging: priority prefixes, journal detection and handler setup."""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_router import systemd
from gpu_router.systemd import JournalFormatter, journal_stream_matches, set_level, setup_logging

_LOGGERS = ("gpu_router",)


@pytest.fixture(autouse=True)
def _restore_loggers() -> Iterator[None]:
    """Undo setup_logging so other test files see the logger tree as it was."""
    saved = {
        name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers)) for name in _LOGGERS
    }
    saved_handler = systemd._handler
    yield
    for name, (level, handlers) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers[:] = handlers
    systemd._handler = saved_handler


def _record(level: int, msg: str = "hello %s", exc_info: bool = False) -> logging.LogRecord:
    """Build a record from gpu_router.daemon, optionally carrying the exception being handled."""
    args = ("world",) if "%s" in msg else ()
    return logging.LogRecord(
        "gpu_router.daemon", level, __file__, 1, msg, args, sys.exc_info() if exc_info else None
    )


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.CRITICAL, "<2>"),
        (logging.ERROR, "<3>"),
        (logging.WARNING, "<4>"),
        (logging.INFO, "<6>"),
        (logging.DEBUG, "<7>"),
        (25, "<6>"),  # a custom level between INFO and WARNING
        (5, "<7>"),
    ],
)
def test_journal_formatter_prefix_per_level(level: int, prefix: str) -> None:
    out = JournalFormatter("%(levelname)s %(name)s: %(message)s").format(_record(level))
    assert out == f"{prefix}{logging.getLevelName(level)} gpu_router.daemon: hello world"


def test_journal_formatter_prefixes_every_traceback_line() -> None:
    fmt = JournalFormatter("%(levelname)s %(name)s: %(message)s")
    try:
        try:
            raise KeyError("inner")
        except KeyError as exc:
            raise RuntimeError("outer\nsecond line") from exc
    except RuntimeError:
        out = fmt.format(_record(logging.ERROR, "cycle failed", exc_info=True))
    lines = out.split("\n")
    assert len(lines) > 6
    assert all(line.startswith("<3>") for line in lines), out
    assert lines[0] == "<3>ERROR gpu_router.daemon: cycle failed"
    assert "<3>Traceback (most recent call last):" in lines
    assert "<3>RuntimeError: outer" in lines
    assert "<3>second line" in lines
    assert "<3>KeyError: 'inner'" in lines


def test_journal_formatter_multiline_message() -> None:
    out = JournalFormatter("%(message)s").format(_record(logging.WARNING, "a\nb\n%s"))
    assert out == "<4>a\n<4>b\n<4>world"


def test_journal_stream_matches_real_file(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w") as f:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert journal_stream_matches(env, f.fileno()) is True
        with open(tmp_path / "other", "w") as g:
            assert journal_stream_matches(env, g.fileno()) is False


@pytest.mark.parametrize("value", [None, "", "garbage", "12:", ":34", "1:2:3", "a:b", "0:0"])
def test_journal_stream_mismatch_or_garbage(tmp_path: Path, value: str | None) -> None:
    env = {} if value is None else {"JOURNAL_STREAM": value}
    with open(tmp_path / "log", "w") as f:
        assert journal_stream_matches(env, f.fileno()) is False


def test_journal_stream_closed_fd(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w") as f:
        fd = f.fileno()
        st = os.fstat(fd)
    assert journal_stream_matches({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd) is False


def test_setup_logging_plain_format_has_timestamp_and_level() -> None:
    buf = io.StringIO()
    setup_logging("INFO", stream=buf, environ={})
    logging.getLogger("gpu_router.daemon").info("polled %d nodes", 3)
    line = buf.getvalue()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO gpu_router\.daemon: polled 3 nodes\n", line), (
        line
    )


def test_setup_logging_journal_format(tmp_path: Path) -> None:
    with open(tmp_path / "stderr", "w") as f:
        st = os.fstat(f.fileno())
        setup_logging("info", stream=f, environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        logging.getLogger("gpu_router.daemon").warning("node %s down", "gpu1")
    assert (tmp_path / "stderr").read_text() == "<4>WARNING gpu_router.daemon: node gpu1 down\n"


def test_setup_logging_journal_env_for_other_stream_is_plain(tmp_path: Path) -> None:
    # JOURNAL_STREAM inherited while stderr was redirected: not the journal.
    with open(tmp_path / "elsewhere", "w") as f, open(tmp_path / "stderr", "w") as out:
        st = os.fstat(f.fileno())
        setup_logging("INFO", stream=out, environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        logging.getLogger("gpu_router.x").info("m")
    assert not (tmp_path / "stderr").read_text().startswith("<")


def test_force_journal_overrides_detection() -> None:
    buf = io.StringIO()
    setup_logging(logging.DEBUG, stream=buf, environ={}, force_journal=True)
    logging.getLogger("gpu_router.x").debug("d")
    assert buf.getvalue() == "<7>DEBUG gpu_router.x: d\n"


def test_setup_logging_twice_leaves_one_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    h1 = setup_logging("INFO", stream=first, environ={})
    h2 = setup_logging("INFO", stream=second, environ={})
    logger = logging.getLogger("gpu_router")
    ours = [h for h in logger.handlers if h in (h1, h2)]
    assert ours == [h2]
    logging.getLogger("gpu_router.daemon").info("once")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1


def test_log_level_honoured_and_changed_on_reload() -> None:
    buf = io.StringIO()
    setup_logging("INFO", stream=buf, environ={})
    log = logging.getLogger("gpu_router.daemon")
    log.debug("hidden")
    log.info("shown")
    setup_logging("DEBUG", stream=buf, environ={})
    log.debug("now visible")
    set_level("warning")
    log.info("hidden again")
    log.warning("warned")
    text = buf.getvalue()
    assert "hidden" not in text
    assert "shown" in text
    assert "now visible" in text
    assert "warned" in text


def test_root_logger_untouched_and_other_libraries_quiet() -> None:
    root_handlers = list(logging.getLogger().handlers)
    buf = io.StringIO()
    setup_logging("DEBUG", stream=buf, environ={})
    assert logging.getLogger().handlers == root_handlers
    logging.getLogger("some.other.lib").warning("not ours")
    logging.getLogger("gpu_router.transport").debug("ours")
    text = buf.getvalue()
    assert "not ours" not in text
    assert "ours" in text


@pytest.mark.parametrize("bad", ["verbose", "", "10x"])
def test_unknown_level_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging(bad, stream=io.StringIO(), environ={})
    with pytest.raises(ValueError, match="unknown log level"):
        set_level(bad)


def test_default_stream_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", environ={})
    logging.getLogger("gpu_router.daemon").error("to stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "ERROR gpu_router.daemon: to stderr" in captured.err
