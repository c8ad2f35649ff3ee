"""Flags and a wake-up that a signal handler may touch safely.

Two traps, both met in testing (a reload or a SIGUSR1 never acted on):

- ``threading.Event.set`` takes the Event's lock. A Python signal handler runs in the main thread
  between two bytecodes, so if the main thread was inside that same lock (in ``wait``, ``clear`` or
  ``set``), the handler blocks on a lock its own thread holds and the loop never runs again. So the
  loop's flags are plain attributes (one store is atomic under the interpreter) and the loop sleeps
  on a self-pipe, whose ``write`` never blocks and takes no Python lock.
- The kernel may deliver a process's signal to any thread, and the Python handler only runs once
  the main thread next executes bytecode: a main thread asleep in ``poll`` for minutes would not
  notice. :meth:`Wakeup.wake_on_signals` hands the pipe to ``signal.set_wakeup_fd``, so the C-level
  handler, in whichever thread it ran, writes to the pipe and wakes the main thread at once.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from typing import Protocol


class Cancel(Protocol):
    """Anything with ``is_set()``: a :class:`Flag` or a ``threading.Event``."""

    def is_set(self) -> bool: ...


class Flag:
    """A boolean that a signal handler may set: no lock, so it can never deadlock its own thread."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = False

    def set(self) -> None:
        self._value = True

    def clear(self) -> None:
        self._value = False

    def is_set(self) -> bool:
        return self._value


class Wakeup:
    """Wake a sleeping loop from a signal handler or another thread, without a lock.

    ``set`` writes one byte to a non-blocking pipe (a full pipe already means "awake", so the byte
    is dropped); ``wait`` polls the read end with a timeout and drains it. ``poll`` rather than
    ``select``: a daemon with hundreds of node sockets can hold descriptors above 1024.
    """

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        for fd in (self._r, self._w):
            os.set_blocking(fd, False)
        self._poll = select.poll()
        self._poll.register(self._r, select.POLLIN)

    def wake_on_signals(self) -> int:
        """Have every signal with a Python handler wake this (main thread only); returns the old fd."""
        return signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)

    def set(self) -> None:
        """Wake the waiter (or make its next ``wait`` return at once)."""
        # A full pipe: a wake-up is already pending. A closed one: the owner has gone. (No
        # contextlib here: this runs in signal handlers, which should be as short as can be.)
        try:
            os.write(self._w, b"\0")
        except OSError:
            return

    def wait(self, timeout_s: float) -> bool:
        """Sleep until ``set`` or ``timeout_s``; returns whether it was woken. Clears the wake-up."""
        ready = self._poll.poll(max(0, int(timeout_s * 1000 + 0.999)))
        if not ready:
            return False
        self.clear()
        return True

    def clear(self) -> None:
        """Forget any pending wake-up."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._r, 4096):
                pass

    def __del__(self) -> None:
        # Closed only once nothing can call ``set`` any more: closing earlier would let a late
        # executor thread write into whatever file reuses the descriptor number.
        for fd in (getattr(self, "_r", None), getattr(self, "_w", None)):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
