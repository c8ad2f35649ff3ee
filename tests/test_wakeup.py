"""The loop's flags and wake-up: safe to touch from a signal handler at any bytecode."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from daemon_helpers import MakeDaemon, MakeNode

from gpu_router.wakeup import Flag, Wakeup


def test_a_flag_sets_and_clears() -> None:
    f = Flag()
    assert not f.is_set()
    f.set()
    assert f.is_set()
    f.clear()
    assert not f.is_set()


def test_a_wakeup_set_before_the_wait_is_not_lost() -> None:
    w = Wakeup()
    w.set()
    assert w.wait(5.0) is True
    # The wait drained it: the next one sleeps out its timeout.
    assert w.wait(0.0) is False


def test_a_wakeup_from_another_thread_ends_the_wait() -> None:
    w = Wakeup()
    threading.Timer(0.05, w.set).start()
    start = time.monotonic()
    assert w.wait(30.0) is True
    assert time.monotonic() - start < 20.0  # woken, not timed out


def test_many_wakeups_fill_the_pipe_without_blocking_and_count_as_one() -> None:
    w = Wakeup()
    for _ in range(200_000):  # far past a pipe's 64 KiB
        w.set()
    assert w.wait(0.0) is True
    assert w.wait(0.0) is False


@pytest.mark.timeout(60)
def test_a_signal_storm_never_deadlocks_the_waiting_thread() -> None:
    """A timer signal every 300 µs lands inside wait() and clear() over and over; with a
    threading.Event this wedges within a few thousand rounds, here it must run to the end."""
    w = Wakeup()
    flag = Flag()
    fired = 0

    def handler(_signum: int, _frame: object) -> None:
        nonlocal fired
        fired += 1
        flag.set()
        w.set()

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0003, 0.0003)
    try:
        woken = 0
        for _ in range(20_000):
            if w.wait(0.001):
                woken += 1
            flag.clear()
            w.clear()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    assert fired > 100, fired
    assert woken > 100, woken


def test_a_signal_that_lands_on_another_thread_still_wakes_the_main_thread() -> None:
    """The kernel may hand a process's signal to any thread; the Python handler then waits for the
    main thread's next bytecode. Without the wake-up fd, this wait would sleep out its 10 s."""
    w = Wakeup()
    flag = Flag()

    def handler(_signum: int, _frame: object) -> None:
        flag.set()
        w.set()

    old_handler = signal.signal(signal.SIGUSR1, handler)
    old_fd = w.wake_on_signals()
    try:

        def from_another_thread() -> None:
            time.sleep(1.0)  # so that the main thread is asleep in poll when it lands
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

        other = threading.Thread(target=from_another_thread)
        other.start()
        woken = w.wait(10.0)
        other.join()
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGUSR1, old_handler)
    assert woken is True
    assert flag.is_set()


def _current_wakeup_fd() -> int:
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    return fd


def test_the_daemon_hands_back_the_wakeup_fd_when_its_loop_is_done(
    make_node: MakeNode, make_daemon: MakeDaemon
) -> None:
    # A wake-up fd left pointing at a closed pipe would send signal bytes into whatever file
    # takes that number next.
    daemon = make_daemon([make_node("gpu-a", models=("llama3.2:latest",))], [])
    before = _current_wakeup_fd()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)}
    try:
        daemon.install_signal_handlers()
        during = _current_wakeup_fd()
        daemon.release_wakeup_fd()
        after = _current_wakeup_fd()
    finally:
        signal.set_wakeup_fd(before)
        for s, h in saved.items():
            signal.signal(s, h)
    assert during not in (-1, before)
    assert after == before
