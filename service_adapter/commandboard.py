"""Where pilots' long-polls wait for their next command, and when each pilot was last heard polling.

The store announces, after each commit, which (slot, host) pairs got new
commands (:meth:`Store.set_command_listener`); :meth:`CommandBoard.wake`
turns that into the waiting polls' wake-up on the receiver's event loop.
No poll ever re-reads the store on a timer: a command reaches its pilot
one commit and one loop turn after it was queued.

The poll doubles as the pilot's heartbeat: :meth:`CommandBoard.seen`
records it, and the lease manager gives up a host as lost when
:meth:`CommandBoard.silent_for` grows past its limit. Heartbeats live in
memory only (a restart forgets them and counts from the restart instead).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Callable, Iterable

Target = tuple[str, str]
#: What a poll's waiter is resolved with when its deadline, not a commit, ended its wait.
DEADLINE = object()
#: Deadlines are kept to this step (a poll may wait up to this much longer than it asked): the polls parked in
#: one step share one timer, where a timer each put 10,000 entries in the event loop's heap.
DEADLINE_STEP_S = 0.25


class CommandBoard:
    """Thread-safe meeting point of the store's commits (any thread) and the long-polls (one event loop)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.started_at = clock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[Target, list[asyncio.Future]] = {}
        self._seen: dict[Target, float] = {}
        self._current: dict[Target, object] = {}  # target -> the token of its newest open poll
        self._lock = threading.Lock()
        self._closing = False
        self._deadlines: dict[float, set[asyncio.Future]] = {}  # loop time (a step) -> the waiters it ends

    # -- the event loop's side -------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve the polls of ``loop`` (the receiver's); wakes are delivered there."""
        self._loop = loop
        self._closing = False

    def close(self) -> None:
        """The receiver is shutting down (call on its loop): wake every waiting poll; none waits again.

        Without this a parked poll holds the shutdown for up to its whole
        ``wait`` (aiohttp waits for running handlers). :meth:`attach` (the
        next start) opens the board again.
        """
        self._closing = True
        self._wake_on_loop(list(self._waiters))

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` was called since the last :meth:`attach`: polls answer at once."""
        return self._closing

    def register(self, target: Target) -> asyncio.Future:
        """A future resolved at the next :meth:`wake` of ``target`` (call on the loop, before reading the store).

        Registering before the read closes the gap between "no command in
        the store" and "waiting": a commit in between wakes this future.
        """
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(target, []).append(future)
        return future

    def unregister(self, target: Target, future: asyncio.Future) -> None:
        """Forget a waiter (its poll answered or timed out)."""
        waiters = self._waiters.get(target)
        if waiters is None:
            return
        try:
            waiters.remove(future)
        except ValueError:
            pass
        if not waiters:
            del self._waiters[target]

    def end_at(self, when: float, future: asyncio.Future) -> float:
        """Resolve ``future`` with :data:`DEADLINE` at loop time ``when`` (or up to :data:`DEADLINE_STEP_S` after)
        unless it is done by then; returns the key for :meth:`forget_end` (call on the loop)."""
        step = math.ceil(when / DEADLINE_STEP_S) * DEADLINE_STEP_S
        waiting = self._deadlines.get(step)
        if waiting is None:
            waiting = self._deadlines[step] = set()
            asyncio.get_running_loop().call_at(step, self._deadline_passed, step)
        waiting.add(future)
        return step

    def forget_end(self, step: float, future: asyncio.Future) -> None:
        """``future`` no longer waits for its deadline (its poll is answered)."""
        waiting = self._deadlines.get(step)
        if waiting is not None:
            waiting.discard(future)

    def _deadline_passed(self, step: float) -> None:
        for future in self._deadlines.pop(step, ()):
            if not future.done():
                future.set_result(DEADLINE)

    def _wake_on_loop(self, targets: Iterable[Target]) -> None:
        for target in targets:
            for future in self._waiters.pop(target, ()):
                if not future.done():
                    future.set_result(None)

    # -- any thread --------------------------------------------------------------------------

    def wake(self, targets: Iterable[Target] | None) -> None:
        """Wake the polls waiting for any of ``targets`` (None: every waiting poll, each of which reads its
        commands again); safe from any thread; a no-op before :meth:`attach`."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            if targets is None:
                loop.call_soon_threadsafe(lambda: self._wake_on_loop(list(self._waiters)))
                return
            loop.call_soon_threadsafe(self._wake_on_loop, list(targets))
        except RuntimeError:  # the loop closed in between: nobody is waiting any more
            pass

    def poll_started(self, target: Target) -> object:
        """A poll of ``target`` arrived: it is alive now, and while the poll is open. Returns the poll's token.

        One poll per target waits at a time: a newer one ends the older
        (:meth:`current` is then False for the older's token and its waiter
        is woken), so a node cannot pile up waiting polls (call on the loop).
        """
        token = object()
        with self._lock:
            self._seen[target] = self.clock()
            older = target in self._current
            self._current[target] = token
        if older:
            self._wake_on_loop([target])
        return token

    def current(self, target: Target, token: object) -> bool:
        """Whether the poll of ``token`` is still ``target``'s newest (else it answers now)."""
        return self._current.get(target) is token

    def poll_ended(self, target: Target, token: object) -> None:
        """A poll of ``target`` was answered (or dropped)."""
        with self._lock:
            self._seen[target] = self.clock()
            if self._current.get(target) is token:
                del self._current[target]

    def heard_elsewhere(self, targets) -> None:
        """Another receiver heard these (slot, host) polling (:mod:`service_adapter.pollnews`): alive now."""
        now = self.clock()
        with self._lock:
            for target in targets:
                self._seen[target] = now

    def polled_here_since(self, since: float) -> list[Target]:
        """The targets heard polling here at or after ``since``, and those whose poll is open now."""
        with self._lock:
            found = {target for target, at in self._seen.items() if at >= since}
            found.update(self._current)
        return sorted(found)

    def hosts_polling(self) -> int:
        """How many (slot, host) have a poll open now."""
        with self._lock:
            return len(self._current)

    def silent_for(self, target: Target, since: float | None = None) -> float:
        """Seconds since ``target`` was last heard polling; 0 while a poll of it is open.

        Never heard (since this board started): counted from ``since`` (e.g.
        when the host reserved) or from the board's start, whichever is later,
        so a restarted service does not give up every host at once.
        """
        with self._lock:
            if target in self._current:
                return 0.0
            last = self._seen.get(target)
        if last is None:
            last = max(self.started_at, since) if since is not None else self.started_at
        return max(self.clock() - last, 0.0)

    def silent_over(self, limit_s: float, candidates: list[tuple[Target, float | None]]) -> list[tuple[Target, float]]:
        """Of ``candidates`` ((target, since) as for :meth:`silent_for`), those silent for longer than ``limit_s``,
        with their seconds: one lock and one clock reading for them all (the lease manager asks this of
        every holding host on every tick)."""
        now = self.clock()
        found = []
        with self._lock:
            current, seen, started = self._current, self._seen, self.started_at
            for target, since in candidates:
                if target in current:
                    continue
                last = seen.get(target)
                if last is None:
                    last = max(started, since) if since is not None else started
                if now - last > limit_s:
                    found.append((target, now - last))
        return found
