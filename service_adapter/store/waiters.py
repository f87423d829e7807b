"""How a write's caller learns its outcome: a thread-safe future, or an asyncio future settled on its loop.

The writer thread settles each committed batch's waiters with :func:`resolve`: thread-safe futures
at once, and each event loop's waiters in one ``call_soon_threadsafe`` per loop (one wake-up of the
loop per batch, and no thread-safe future per write).
"""

from __future__ import annotations

import asyncio


class LoopWaiter:
    """A write whose caller awaits it on an event loop: its asyncio future, settled on that loop together with
    the rest of its batch (one wake-up of the loop per batch, and no thread-safe future per write)."""

    __slots__ = ("loop", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future):
        self.loop = loop
        self.future = future


def _settle(outcomes: list[tuple[asyncio.Future, object, BaseException | None]]) -> None:
    """On the loop: give each waiting write its result (a caller that gave up, cancelled, is skipped)."""
    for future, value, exc in outcomes:
        if future.done():
            continue
        if exc is None:
            future.set_result(value)
        else:
            future.set_exception(exc)


def resolve(outcomes) -> None:
    """Settle a batch's futures: thread-safe ones here, each loop's waiters in one call on their loop."""
    on_loops: dict[asyncio.AbstractEventLoop, list] = {}
    for waiter, value, exc in outcomes:
        if isinstance(waiter, LoopWaiter):
            on_loops.setdefault(waiter.loop, []).append((waiter.future, value, exc))
        elif exc is None:
            waiter.set_result(value)
        else:
            waiter.set_exception(exc)
    for loop, items in on_loops.items():
        try:
            loop.call_soon_threadsafe(_settle, items)
        except RuntimeError:  # its loop is closed: nobody waits any more
            pass
