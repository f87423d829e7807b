"""Who polled which receiver: the pilots' heartbeats shared among receivers on one PostgreSQL store.

A pilot's long-poll is its heartbeat, and the lease manager gives up a host
that has not polled for ``[pilots] lost_after`` seconds. With several
receivers, a pilot polls whichever its connection reached, while one
receiver's lease manager leads. :class:`PollNews` announces, every
:func:`interval` seconds, the pilots heard polling here since the last
announcement (through the store, :meth:`Store.announce_polls`), and the
store hands the others' announcements to this receiver's board
(:meth:`CommandBoard.heard_elsewhere`). Nothing is written to the tables:
heartbeats stay in memory, as with one receiver.
"""

from __future__ import annotations

import logging
import threading

from service_adapter.commandboard import CommandBoard
from service_adapter.store import Store

log = logging.getLogger("service_adapter.pollnews")

#: The longest between two announcements (seconds); a quarter of lost_after when that is shorter.
MAX_INTERVAL_S = 10.0


def interval(lost_after_s: float | None) -> float:
    """Seconds between announcements: short against the lost limit, so a host is never lost by the delay."""
    return MAX_INTERVAL_S if lost_after_s is None else max(0.1, min(MAX_INTERVAL_S, lost_after_s / 4))


class PollNews:
    """The thread that announces this receiver's polls to the others (start it on a PostgreSQL store only)."""

    def __init__(self, store: Store, board: CommandBoard, every_s: float):
        self.store = store
        self.board = board
        self.every_s = every_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        store.set_poll_listener(board.heard_elsewhere)

    def start(self) -> None:
        """Announce every ``every_s`` until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="poll-news", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop announcing (at once)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(30)

    def announce_once(self, since: float) -> int:
        """Announce the pilots polled here since ``since``; how many."""
        polled = self.board.polled_here_since(since)
        self.store.announce_polls(polled)
        return len(polled)

    def _run(self) -> None:
        since = self.board.clock()
        while not self._stopping.wait(self.every_s):
            now = self.board.clock()
            try:
                self.announce_once(since)
            except Exception as exc:  # the store away: the next round says it all again
                log.warning("cannot announce this receiver's polls: %s", exc)
                continue
            since = now
