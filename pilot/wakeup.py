"""A wake-up flag that a signal handler may set, and that every signal wakes (the self-pipe trick).

Two traps sit between a signal and a thread that sleeps until it comes:

- Python runs signal handlers on the main thread, between two bytecodes
  of whatever it was doing. If that was the inside of a
  ``threading.Event`` (whose ``wait``, ``clear`` and ``set`` hold a
  plain, non-reentrant lock for a few bytecodes), a handler that calls
  ``Event.set()`` waits for a lock its own thread holds, forever. That
  is how a pilot that got its release command and SIGTERM within
  microseconds of each other used to hang with the node shrunk.
  :class:`Wakeup` has no lock: :meth:`Wakeup.set` is a plain attribute
  store and one ``write(2)`` to a non-blocking pipe.
- The kernel hands a process-directed signal to any thread that does not
  block it (the sender's own thread, or another one while the main
  thread has a signal pending). Python's C-level handler then only notes
  it there, and a main thread asleep in ``poll(2)`` sleeps on until its
  timeout (for a pilot: the lease's deadline) before the Python handler
  runs. After :func:`wake_on_signals`, every caught signal also writes a
  byte that each :meth:`Wakeup.wait` polls for.
"""

from __future__ import annotations

import math
import os
import select
import signal

_signal_read: int | None = None  # the read end of the pipe given to signal.set_wakeup_fd, once routed


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass  # empty


def wake_on_signals() -> None:
    """Make every signal that has a Python handler end the :meth:`Wakeup.wait` in progress (main thread only).

    The wait then returns early (a spurious wake); the signal's Python
    handler runs before the waiter's next Python call, so a waiter that
    re-checks its conditions in a loop sees what the handler did. Call it
    once, after installing the handlers; later calls do nothing.
    """
    global _signal_read
    if _signal_read is not None:
        return
    read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)  # a full pipe still wakes the poll
    _signal_read = read


class Wakeup:
    """Set from any thread or signal handler; waited on by one thread (the pilot's main loop).

    Like ``threading.Event`` for a single waiter, without its lock. A
    :meth:`set` that comes after a :meth:`clear` always ends the next
    :meth:`wait`; a wait may also end early (a signal arrived), so the
    waiter re-checks its own conditions after every wake (a wake may be
    spurious, never lost). The pipe lives as long as the process: a
    pilot makes two.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._flag = False
        self._poll = select.poll()  # not select(): that fails for descriptors above 1023
        self._poll.register(self._read, select.POLLIN)
        self._polls_signals = False

    def set(self) -> None:
        """Wake the waiter; safe in a signal handler (an attribute store and one write, no lock)."""
        self._flag = True  # before the byte: a waiter woken by the byte sees the flag
        try:
            os.write(self._write, b"!")
        except BlockingIOError:
            pass  # the pipe is full: a wake-up is pending anyway

    def is_set(self) -> bool:
        """Whether :meth:`set` was called since the last :meth:`clear`."""
        return self._flag

    def clear(self) -> None:
        """Forget earlier wake-ups (the waiter's thread only)."""
        self._flag = False  # before draining: a set() racing with this leaves the flag or a byte behind
        _drain(self._read)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`set`, a caught signal, or ``timeout`` seconds (None: no limit); returns :meth:`is_set`.

        A signal delivered to this thread runs its handler inside ``poll``
        (PEP 475 resumes the wait afterwards), so a handler that calls
        :meth:`set` ends the wait at once. A signal delivered to another
        thread ends the wait through :func:`wake_on_signals`' pipe; its
        handler runs right after this returns.
        """
        if self._flag:
            return True
        if timeout is not None and timeout <= 0:
            return self._flag
        if _signal_read is not None and not self._polls_signals:
            self._poll.register(_signal_read, select.POLLIN)
            self._polls_signals = True
        ready = self._poll.poll(None if timeout is None else math.ceil(timeout * 1000))
        if any(fd == _signal_read for fd, _events in ready):
            _drain(_signal_read)
        return self._flag or any(fd == self._read for fd, _events in ready)


#: The job-control signals sudo relays from its caller to the command it runs.
JOB_CONTROL = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


def ignore_job_control() -> None:
    """Let no job-control signal stop this process (SIGSTOP itself cannot be sent to it: it runs as root).

    sudo relays the SIGTSTP that its caller sends it to the command, whose default is to stop: a root
    pilot or VM-job wrapper stopped that way would hold the node lock, the memory and the node's VMs
    past its deadline, at the caller's will. The batch system suspends a job with SIGSTOP to its
    processes, which a root process still obeys.
    """
    for signum in JOB_CONTROL:
        signal.signal(signum, signal.SIG_IGN)
