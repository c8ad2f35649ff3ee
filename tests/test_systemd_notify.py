"""Notifier against a real AF_UNIX datagram socket standing in for systemd's notify socket."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_router.systemd import STATUS_MAX_CHARS, Notifier


def _recv(sock: socket.socket) -> str:
    """Receive one datagram as text (the socket has a timeout so a missing message fails, not hangs)."""
    return sock.recv(65536).decode("utf-8")


def _assert_no_more(sock: socket.socket) -> None:
    """Assert the receive queue is empty."""
    sock.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            sock.recv(65536)
    finally:
        sock.settimeout(2.0)


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a fresh abstract address; yields it and its NOTIFY_SOCKET value."""
    name = f"gpu-router-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        yield sock, "@" + name


@pytest.fixture
def notifier(listener: tuple[socket.socket, str]) -> Iterator[Notifier]:
    """A Notifier pointed at ``listener`` with a watchdog for this pid."""
    env = {"NOTIFY_SOCKET": listener[1], "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    with Notifier(environ=env) as n:
        yield n


def test_enabled_with_socket_and_watchdog_interval(notifier: Notifier) -> None:
    assert notifier.enabled is True
    assert notifier.watchdog_interval_s == pytest.approx(1.0)


def test_ready_with_status_is_one_datagram(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    sock, _ = listener
    assert notifier.ready("Polling 3 nodes every 300s") is True
    assert _recv(sock) == "READY=1\nSTATUS=Polling 3 nodes every 300s"
    _assert_no_more(sock)


def test_ready_without_status(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    assert notifier.ready() is True
    assert _recv(listener[0]) == "READY=1"


def test_status(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    assert notifier.status("2/3 nodes up") is True
    assert _recv(listener[0]) == "STATUS=2/3 nodes up"


def test_watchdog(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    assert notifier.watchdog() is True
    assert _recv(listener[0]) == "WATCHDOG=1"


def test_reloading_carries_monotonic_usec(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = _recv(listener[0]).split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert lines[2:] == ["STATUS=Reloading configuration"]


def test_reloading_custom_status(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    assert notifier.reloading("Reloading /etc/gpu-router/config.yaml") is True
    assert _recv(listener[0]).endswith("\nSTATUS=Reloading /etc/gpu-router/config.yaml")


def test_stopping(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    assert notifier.stopping() is True
    assert _recv(listener[0]) == "STOPPING=1\nSTATUS=Stopping"
    assert notifier.stopping("Stopping on SIGTERM") is True
    assert _recv(listener[0]) == "STOPPING=1\nSTATUS=Stopping on SIGTERM"


@pytest.mark.parametrize("text", ["loaded model → gpu1", "Grüße ü", "模型已加载", "a\u00a0b"])
def test_non_latin1_status_arrives_intact(
    notifier: Notifier, listener: tuple[socket.socket, str], text: str
) -> None:
    # sdnotify 0.3.2 encodes latin-1 and silently drops "→" and CJK: this must not.
    assert notifier.status(text) is True
    assert _recv(listener[0]) == f"STATUS={text}"


def test_multiline_status_becomes_one_line(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    assert notifier.ready("node a down\nnode b\r\n  up\tREADY=0\u2028x\x00y") is True
    msg = _recv(listener[0])
    assert msg == "READY=1\nSTATUS=node a down node b up READY=0 x y"
    assert msg.count("\n") == 1


def test_lone_surrogate_status_does_not_raise(
    notifier: Notifier, listener: tuple[socket.socket, str]
) -> None:
    # A file name decoded with surrogateescape cannot be encoded as UTF-8.
    assert notifier.status("config \udcff.yaml") is True
    assert _recv(listener[0]) == "STATUS=config .yaml"


def test_long_status_is_capped(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    assert notifier.status("x" * 5000) is True
    value = _recv(listener[0]).removeprefix("STATUS=")
    assert len(value) == STATUS_MAX_CHARS
    assert value.endswith("...")


def test_no_notify_socket_everything_false() -> None:
    n = Notifier(environ={"WATCHDOG_USEC": "1000000"})
    assert n.enabled is False
    assert n.watchdog_interval_s is None
    assert n.ready("x") is False
    assert n.status("x") is False
    assert n.watchdog() is False
    assert n.watchdog_due() is False
    assert n.reloading() is False
    assert n.stopping() is False
    n.close()
    n.close()


@pytest.mark.parametrize("value", ["relative/path", "vsock:2:1234", "@", "/" + "x" * 200])
def test_unusable_notify_socket_disables(value: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gpu_router"):
        n = Notifier(environ={"NOTIFY_SOCKET": value})
    assert n.enabled is False
    assert n.ready() is False
    assert "NOTIFY_SOCKET" in caplog.text


def test_watchdog_pid_of_other_process_disables_watchdog(listener: tuple[socket.socket, str]) -> None:
    env = {"NOTIFY_SOCKET": listener[1], "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    with Notifier(environ=env) as n:
        assert n.enabled is True
        assert n.watchdog_interval_s is None
        assert n.watchdog() is False
        assert n.watchdog_due() is False
        # Other messages still go out; the watchdog ping does not.
        assert n.status("ok") is True
        assert _recv(listener[0]) == "STATUS=ok"
        _assert_no_more(listener[0])


def test_no_watchdog_usec_means_no_watchdog(listener: tuple[socket.socket, str]) -> None:
    with Notifier(environ={"NOTIFY_SOCKET": listener[1]}) as n:
        assert n.watchdog_interval_s is None
        assert n.watchdog() is False
    _assert_no_more(listener[0])


@pytest.mark.parametrize("usec", ["0", "-5", "soon"])
def test_bad_watchdog_usec_means_no_watchdog(listener: tuple[socket.socket, str], usec: str) -> None:
    with Notifier(environ={"NOTIFY_SOCKET": listener[1], "WATCHDOG_USEC": usec}) as n:
        assert n.watchdog_interval_s is None


def test_watchdog_without_pid_applies_to_us(listener: tuple[socket.socket, str]) -> None:
    with Notifier(environ={"NOTIFY_SOCKET": listener[1], "WATCHDOG_USEC": "180000000"}) as n:
        assert n.watchdog_interval_s == pytest.approx(90.0)


def test_watchdog_due_follows_fake_clock(listener: tuple[socket.socket, str]) -> None:
    now = [1_000_000_000]
    env = {"NOTIFY_SOCKET": listener[1], "WATCHDOG_USEC": "10000000"}  # 10 s -> ping every 5 s
    with Notifier(environ=env, clock_ns=lambda: now[0]) as n:
        assert n.watchdog_interval_s == pytest.approx(5.0)
        assert n.watchdog_due() is True  # never pinged
        assert n.watchdog() is True
        assert n.watchdog_due() is False
        now[0] += 4_999_000_000
        assert n.watchdog_due() is False
        now[0] += 2_000_000
        assert n.watchdog_due() is True
        assert n.watchdog() is True
        assert n.watchdog_due() is False
    assert [_recv(listener[0]), _recv(listener[0])] == ["WATCHDOG=1", "WATCHDOG=1"]


def test_failed_ping_keeps_watchdog_due() -> None:
    name = f"gpu-router-test-{os.getpid()}-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    now = [0]
    with Notifier(environ={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "2"}, clock_ns=lambda: now[0]) as n:
        sock.close()
        assert n.watchdog() is False
        assert n.watchdog_due() is True


def test_receiver_gone_returns_false_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    name = f"gpu-router-test-{os.getpid()}-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    with Notifier(environ={"NOTIFY_SOCKET": "@" + name}) as n:
        assert n.ready() is True
        assert _recv(sock) == "READY=1"
        sock.close()
        with caplog.at_level(logging.DEBUG, logger="gpu_router"):
            assert n.status("a") is False
            assert n.status("b") is False
            assert n.stopping() is False
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1
        assert "sd_notify" in warnings[0].getMessage()
        # A receiver bound again at the same name is reached without reconnecting.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as again:
            again.bind("\0" + name)
            again.settimeout(2.0)
            assert n.status("back") is True
            assert _recv(again) == "STATUS=back"


def test_full_receive_queue_does_not_block(listener: tuple[socket.socket, str]) -> None:
    # Nobody reads: once the queue is full a send must fail at once instead of blocking the loop.
    with Notifier(environ={"NOTIFY_SOCKET": listener[1]}) as n:
        results = [n.status("x" * 150) for _ in range(5000)]
    assert results[0] is True
    assert results[-1] is False


def test_closed_notifier_returns_false(listener: tuple[socket.socket, str]) -> None:
    n = Notifier(environ={"NOTIFY_SOCKET": listener[1], "WATCHDOG_USEC": "1000000"})
    n.close()
    assert n.enabled is False
    assert n.ready() is False
    assert n.watchdog() is False
    _assert_no_more(listener[0])


def test_filesystem_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    if len(os.fsencode(str(path))) >= 108:
        pytest.skip(f"AF_UNIX path limit: {path} is too long")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2.0)
        with Notifier(environ={"NOTIFY_SOCKET": str(path)}) as n:
            assert n.enabled is True
            assert n.ready("path socket → ok") is True
            assert _recv(sock) == "READY=1\nSTATUS=path socket → ok"
            path.unlink()
            assert n.status("gone") is False


def test_default_environ_is_os_environ(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener[1])
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    with Notifier() as n:
        assert n.ready() is True
    assert _recv(listener[0]) == "READY=1"
