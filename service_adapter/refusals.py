"""Logging refused requests without letting a client fill the disk.

Each refused request (bad credentials, malformed HTTP, a bad
notification) is worth one line to an admin, but a client that sends a
thousand of them must not write a thousand lines, let alone a thousand
tracebacks. :class:`RefusalLog` writes at most one line per peer per
``interval_s`` and at most ``max_lines`` lines per interval in all, and
says how many it left out. :func:`install` routes aiohttp's and
asyncio's own error reports (``Error handling request`` with a
traceback for every malformed request; ``socket.accept() out of system
resource`` for every failed accept) through it as one short line each.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from service_adapter.safetext import printable

log = logging.getLogger("service_adapter.refused")

INTERVAL_S = 60.0
MAX_LINES = 100  # per interval, over all peers
MAX_PEERS = 4096  # peers remembered; beyond that the longest-quiet are forgotten


class RefusalLog:
    """One line per peer per interval (and ``max_lines`` per interval in all); the rest are counted.

    ``admit(peer)`` says whether a line about ``peer`` may be written now;
    ``refused(peer, format, *args)`` writes it if so. At the first line of
    a new interval, a summary says how many refusals the last one left
    unlogged. Memory is bounded by ``max_peers``; the clock is monotonic.
    """

    def __init__(self, logger: logging.Logger = log, *, interval_s: float = INTERVAL_S,
                 max_lines: int = MAX_LINES, max_peers: int = MAX_PEERS, clock=time.monotonic):
        self.logger = logger
        self.interval_s = interval_s
        self.max_lines = max_lines
        self.max_peers = max_peers
        self._clock = clock
        self._lock = threading.Lock()  # the receiver's loop and the log filter may run on different threads
        self._last: collections.OrderedDict[str, float] = collections.OrderedDict()  # peer -> its last line
        self._window_start = clock()
        self._lines = 0
        self._unlogged = 0
        self._unlogged_peers: set[str] = set()

    def admit(self, peer: object) -> bool:
        """Whether a line about ``peer`` may be written now; a no counts it for the next summary."""
        peer = str(peer)
        summary = None
        with self._lock:
            now = self._clock()
            if now - self._window_start >= self.interval_s:
                if self._unlogged:
                    summary = (self._unlogged, len(self._unlogged_peers))
                self._window_start, self._lines, self._unlogged = now, 0, 0
                self._unlogged_peers = set()
            last = self._last.get(peer)
            admitted = (last is None or now - last >= self.interval_s) and self._lines < self.max_lines
            if admitted:
                self._lines += 1
                self._last[peer] = now
                self._last.move_to_end(peer)
                while len(self._last) > self.max_peers:
                    self._last.popitem(last=False)
            else:
                self._unlogged += 1
                if len(self._unlogged_peers) < self.max_peers:
                    self._unlogged_peers.add(peer)
        if summary is not None:
            self.logger.warning(
                "%d more refused request(s) from %d peer(s) were not logged (at most one line per peer per %g s)",
                summary[0], summary[1], self.interval_s,
            )
        return admitted

    def refused(self, peer: object, message: str, *args, level: int = logging.WARNING) -> None:
        """Log ``refused <peer>: <message % args>`` unless ``peer`` had its line this interval."""
        if self.admit(peer):
            self.logger.log(level, "refused %s: " + message, printable(peer), *args)


#: The service's one refusal log (the receiver, the API and aiohttp's own reports share its budget).
REFUSALS = RefusalLog()


class _AiohttpErrors(logging.Filter):
    """On ``aiohttp.server``: a malformed request becomes one refusal line; other errors are rate-limited.

    aiohttp logs every request it cannot parse with ``logger.exception``
    (a traceback that quotes the request: ~32 KB for an 8 KB junk header).
    """

    def __init__(self, refusals: RefusalLog):
        super().__init__()
        self.refusals = refusals

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        if not record.exc_info or record.exc_info[1] is None:
            return True
        exc = record.exc_info[1]
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        if isinstance(exc, HttpProcessingError):
            text = str(exc.message or exc).strip()  # message: aiohttp's words without the code prefix
            first = text.splitlines()[0] if text else ""
            self.refusals.refused(peer, "malformed HTTP request (%s%s)", type(exc).__name__,
                                  f": {first[:120]}" if first else "", level=logging.INFO)
            return False
        return self.refusals.admit(peer)  # a real error keeps its traceback, once per peer per interval


def _asyncio_errors(refusals: RefusalLog):
    def handle(loop, context: dict) -> None:
        message = str(context.get("message", "asyncio error"))
        if not refusals.admit("asyncio: " + message):
            return
        exc = context.get("exception")
        if isinstance(exc, OSError) and "accept" in message:  # out of file descriptors: no traceback helps
            log.error("%s: %s (the connection waits in the listen queue)", message, exc)
        else:
            loop.default_exception_handler(context)

    return handle


def install(loop=None, refusals: RefusalLog = REFUSALS) -> None:
    """Route aiohttp's request errors (once per process) and ``loop``'s error reports through ``refusals``."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _AiohttpErrors) for f in server_log.filters):
        server_log.addFilter(_AiohttpErrors(refusals))
    if loop is not None:
        loop.set_exception_handler(_asyncio_errors(refusals))
