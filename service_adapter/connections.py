"""How many connections the service holds, and whose it gives up first.

A service that accepts until the kernel refuses (``EMFILE``) stops
answering everyone: its store, its log and the batch system's commands
need file descriptors too, and asyncio then reports each failed accept
(68,655 lines in 25 s). So:

- :func:`raise_file_limit` raises the soft ``RLIMIT_NOFILE`` to the hard
  one at start;
- :class:`ConnectionGuard` holds at most ``max_connections`` (default:
  the file limit less the descriptors open at start, :data:`FD_RESERVE`
  and :data:`ACCEPT_SLACK`). At the cap, each new connection closes one held
  connection: first the longest-quiet one that never authenticated and is
  not in a request, then the longest-quiet authenticated one between
  requests; if every connection is in a request, the new one is closed.
  A client that has once authenticated on a connection (a pilot, an
  operator) is thus never pushed out by connections that have not;
- a connection must send a whole request head within ``request_timeout_s``
  of connecting or of its last answer (aiohttp's keep-alive timer, which
  also runs before the first request), and a whole body within
  ``request_timeout_s`` of its head (:func:`read_within`): 408 otherwise;
- a client must read its answer: once the unsent part of an answer passes
  the transport's high-water mark (64 KiB), the client has
  ``request_timeout_s`` to read it down below the low-water mark, or the
  connection is aborted (the send timeout; one refusal line).

A request holds its connection's descriptor only: an image is read a
chunk at a time (:mod:`service_adapter.images.download`), never kept open
while the client reads, so the cap counts what requests really hold.

Serve through :class:`GuardedTCPSite`; the app needs
:attr:`ConnectionGuard.middleware` (``make_app`` adds both), and the
handlers call :func:`trust` once a request's digest checked out.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import resource

from aiohttp import web

log = logging.getLogger(__name__)

#: Seconds a client has for a request head (from connecting or from the last answer), and again for its body.
REQUEST_TIMEOUT_S = 30.0
#: Descriptors kept free of connections: the store, the log, the provider's subprocesses, worker threads.
FD_RESERVE = 128
#: The listen backlog, which is also how many connections asyncio accepts in one go. Those are counted
#: (and room made for them) one loop pass later, and the connections closed for room let go of their
#: descriptors one pass after that: the cap stays three batches below the file limit too.
BACKLOG = 128
ACCEPT_SLACK = 3 * BACKLOG
#: The kernel's queue of connections not yet accepted (capped by net.core.somaxconn). At 128,
#: thousands of pilots connecting within a second overflowed it and their connects were retried
#: by TCP after 1, 3, 7, 15 s (issue 17: 39,208 overflows, p50 16.7 s for 10,000 pilots).
#: asyncio still takes BACKLOG of them per loop pass, which is what ACCEPT_SLACK counts.
LISTEN_QUEUE = 8192
MIN_CONNECTIONS = 16


def raise_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (where allowed); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # Linux caps it at fs.nr_open anyway
    if soft == resource.RLIM_INFINITY or soft >= target:
        return target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft
    return target


def default_max_connections(file_limit: int) -> int:
    """The connections that fit under ``file_limit`` beside what is open now, :data:`FD_RESERVE` and :data:`ACCEPT_SLACK`."""
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 64
    return max(MIN_CONNECTIONS, file_limit - open_now - FD_RESERVE - ACCEPT_SLACK)


class _Connection:
    __slots__ = ("transport", "trusted", "stalled")

    def __init__(self, transport: asyncio.BaseTransport):
        self.transport = transport
        self.trusted = False  # a request on it passed digest authentication
        self.stalled: asyncio.TimerHandle | None = None  # the send timeout, while the client reads too little


class ConnectionGuard:
    """Counts the service's connections and closes the least valuable one when a new one would pass the cap.

    ``max_connections`` None: :func:`default_max_connections` of the file
    limit when the site starts. All methods run on the event loop's thread.
    """

    def __init__(self, max_connections: int | None = None, request_timeout_s: float = REQUEST_TIMEOUT_S):
        if max_connections is not None and max_connections < 1:
            raise ValueError("max_connections must be 1 or more")
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self._open: dict[object, _Connection] = {}  # aiohttp's RequestHandler -> its connection
        # Connections between requests, longest-quiet first: the ones never authenticated, then the others.
        self._idle_untrusted: collections.OrderedDict[object, None] = collections.OrderedDict()
        self._idle_trusted: collections.OrderedDict[object, None] = collections.OrderedDict()
        #: How many connections were closed to make room, and how many new ones were closed at once.
        self.evicted = 0
        self.turned_away = 0
        #: How many connections were aborted because their client did not read its answer (the send timeout).
        self.send_timeouts = 0

    @property
    def open_connections(self) -> int:
        """Connections held now."""
        return len(self._open)

    def limit(self) -> int:
        """The cap in force (resolved from the file limit on first use when none was given)."""
        if self.max_connections is None:
            self.max_connections = default_max_connections(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        return self.max_connections

    def protocol_factory(self, make_handler):
        """Wrap aiohttp's protocol factory (``runner.server``) so that every connection is counted."""

        def make() -> asyncio.Protocol:
            return _Counted(self, make_handler())

        return make

    # -- what the protocol wrapper reports ---------------------------------------------------------

    def _opened(self, handler, transport: asyncio.BaseTransport) -> None:
        self._open[handler] = _Connection(transport)
        self._idle_untrusted[handler] = None
        if len(self._open) > self.limit():
            self._make_room(handler)

    def _closed(self, handler) -> None:
        connection = self._open.pop(handler, None)
        if connection is not None and connection.stalled is not None:
            connection.stalled.cancel()
        self._idle_untrusted.pop(handler, None)
        self._idle_trusted.pop(handler, None)

    def _heard(self, handler) -> None:
        if handler in self._idle_untrusted:
            self._idle_untrusted.move_to_end(handler)
        elif handler in self._idle_trusted:
            self._idle_trusted.move_to_end(handler)

    def _stalled(self, handler) -> None:
        """The answer's unsent bytes passed the transport's high-water mark: the client has the send timeout
        to read them down again, or its connection is aborted (a client that never reads holds nothing long)."""
        connection = self._open.get(handler)
        if connection is not None and connection.stalled is None:
            connection.stalled = asyncio.get_running_loop().call_later(
                self.request_timeout_s, self._send_timed_out, handler)

    def _flowing(self, handler) -> None:
        connection = self._open.get(handler)
        if connection is not None and connection.stalled is not None:
            connection.stalled.cancel()
            connection.stalled = None

    def _send_timed_out(self, handler) -> None:
        connection = self._open.get(handler)
        if connection is None:
            return
        connection.stalled = None
        self.send_timeouts += 1
        from service_adapter.refusals import REFUSALS

        peer = connection.transport.get_extra_info("peername")
        REFUSALS.refused(peer[0] if peer else None, "the client read too little of its answer for %g s: connection "
                         "closed ([service] request_timeout)", self.request_timeout_s)
        connection.transport.abort()  # unsent data dropped: close() would wait to send it

    def _make_room(self, newcomer) -> None:
        for idle in (self._idle_untrusted, self._idle_trusted):
            for handler in idle:
                if handler is not newcomer:
                    self._open[handler].transport.close()
                    self._closed(handler)
                    self.evicted += 1
                    if self.evicted in (1, 10, 100) or self.evicted % 1000 == 0:
                        log.warning("at the cap of %d connections: closed %d quiet connection(s) to make room "
                                    "([service] max_connections)", self.max_connections, self.evicted)
                    return
        self._open[newcomer].transport.close()  # every other connection is in a request
        self._closed(newcomer)
        self.turned_away += 1

    # -- what the app reports ----------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        """Take the connection off the idle lists while its request is handled (so it is never closed for room)."""
        key = request.protocol
        connection = self._open.get(key)
        if connection is None:
            return await handler(request)
        self._idle_untrusted.pop(key, None)
        self._idle_trusted.pop(key, None)
        try:
            response = await handler(request)
            if response.status == 408:
                response.force_close()  # the rest of a late body is not worth reading: close after the answer
            return response
        finally:
            if key in self._open:
                (self._idle_trusted if connection.trusted else self._idle_untrusted)[key] = None

    def trust(self, request: web.Request) -> None:
        """The request's credentials checked out: its connection outranks unauthenticated ones from now on."""
        connection = self._open.get(request.protocol)
        if connection is not None:
            connection.trusted = True


GUARD_KEY = web.AppKey("connection_guard", ConnectionGuard)


def trust(request: web.Request) -> None:
    """Tell the app's :class:`ConnectionGuard` (if any) that ``request`` authenticated."""
    guard = request.app.get(GUARD_KEY)
    if guard is not None:
        guard.trust(request)


class BodyTimeout(Exception):
    """The client did not send the whole body within the request timeout."""


async def read_within(request: web.Request, reading):
    """Await ``reading`` (a read of ``request``'s body) for at most the request timeout; :class:`BodyTimeout` after.

    Answer 408 then: :attr:`ConnectionGuard.middleware` closes the
    connection after that answer (what is left of the body is not worth
    waiting for).
    """
    if request.content.is_eof():
        # The whole body came with the headers (a small one, as a notification, usually does): nothing can keep the read
        # waiting, so no timer and no task for one (asyncio.wait_for makes both, on every notification).
        return await reading
    guard = request.app.get(GUARD_KEY)
    timeout = guard.request_timeout_s if guard is not None else REQUEST_TIMEOUT_S
    try:
        return await asyncio.wait_for(reading, timeout)
    except asyncio.TimeoutError:
        raise BodyTimeout(f"the body did not arrive within {timeout:g} s") from None


class _Counted(asyncio.Protocol):
    """aiohttp's per-connection protocol, with the guard told of its opening, its data and its end."""

    __slots__ = ("_guard", "_inner")

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol):
        self._guard = guard
        self._inner = inner

    def connection_made(self, transport) -> None:
        self._inner.connection_made(transport)
        self._guard._opened(self._inner, transport)

    def data_received(self, data: bytes) -> None:
        self._guard._heard(self._inner)
        self._inner.data_received(data)

    def eof_received(self):
        return self._inner.eof_received()

    def connection_lost(self, exc) -> None:
        self._guard._closed(self._inner)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._guard._stalled(self._inner)
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._guard._flowing(self._inner)
        self._inner.resume_writing()


class GuardedTCPSite(web.TCPSite):
    """A ``web.TCPSite`` whose connections go through the app's :class:`ConnectionGuard`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, guard: ConnectionGuard, **kwargs):
        super().__init__(runner, host, port, **kwargs)
        self.guard = guard

    async def start(self) -> None:
        """Listen (as ``TCPSite.start`` does), counting each connection."""
        await web.BaseSite.start(self)  # registers the site with its runner
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.guard.protocol_factory(self._runner.server), self._host, self._port, ssl=self._ssl_context,
            backlog=BACKLOG, reuse_address=self._reuse_address, reuse_port=self._reuse_port,
        )
        for listening in self._server.sockets:
            with listening.dup() as same:  # listen() again on the same socket: only its queue grows
                same.listen(LISTEN_QUEUE)
        self._bound_port = self._server.sockets[0].getsockname()[1]
        self.guard.limit()  # resolve the cap now, from the file limit in force
        log.info("holding at most %d connections; a client has %g s for a request head, and again for its body",
                 self.guard.max_connections, self.guard.request_timeout_s)


async def start_serving(app: web.Application, host: str, port: int, *, ssl_context=None, reuse_port: bool = False,
                        **runner_kwargs) -> web.AppRunner:
    """Serve ``app`` (made by ``make_app``) on ``host:port`` with its guard and the refusal log; returns the runner.

    ``ssl_context`` (an ``ssl.SSLContext`` with the service's certificate) makes it https. ``reuse_port``: bind
    with SO_REUSEPORT, so that several receivers of the same account share the port (the kernel spreads the
    connections among them).

    aiohttp's keep-alive timer is the head timeout: it closes a connection
    that has not sent a whole request head ``request_timeout_s`` after
    connecting or after its last answer. Raises OSError when it cannot
    listen (the runner is cleaned up then).
    """
    from service_adapter import refusals

    guard = app.get(GUARD_KEY) or ConnectionGuard()  # an app of its own (a test's stand-in): counted all the same
    refusals.install(asyncio.get_running_loop())
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=guard.request_timeout_s,
                           **runner_kwargs)
    await runner.setup()
    try:
        await GuardedTCPSite(runner, host, port, guard, reuse_address=True, reuse_port=reuse_port or None,
                             ssl_context=ssl_context).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
