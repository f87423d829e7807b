"""The service's store keeper: a thread that runs a compaction pass (:mod:`service_adapter.store.compaction`)
every minute, so the store stays bounded however long the service runs.

A pass compacts a batch of leases that ended more than ``[service]
retention`` ago and gives free pages back to the file system; while a
backlog remains (after an upgrade, or a long stop) the next pass follows at
once. Each pass that did something is one log line.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from service_adapter.store import Store
from service_adapter.store.compaction import LEASES_PER_PASS
from service_adapter.store.errors import StoreClosed

log = logging.getLogger(__name__)

#: Seconds between passes when there is no backlog.
EVERY_S = 60.0


class Compactor:
    """Runs :meth:`Store.compact` every ``every_s`` seconds (at once again while leases wait) until :meth:`stop`."""

    def __init__(self, store: Store, retention_s: float, *, every_s: float = EVERY_S,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.retention_s = retention_s
        self.every_s = every_s
        self.clock = clock
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> tuple[int, int, int, int]:
        """One pass now; (leases compacted, notifications deleted, commands deleted, free pages before)."""
        done = self.store.compact(self.retention_s, self.clock())
        if done[0] or done[3]:
            log.info("store compacted: %d lease(s) past their retention (%d notifications, %d commands deleted); "
                     "%d free page(s) given back", *done)
        return done

    def start(self) -> None:
        """Start the background thread."""
        self._thread = threading.Thread(target=self._run, name="store-compactor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (a pass under way finishes first)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                leases = self.run_once()[0]
            except StoreClosed:
                return
            except Exception:
                if self.store.closed:
                    return
                log.exception("store compaction failed; trying again in %g s", self.every_s)
                leases = 0
            if self._stopping.wait(0 if leases >= LEASES_PER_PASS else self.every_s):
                return
