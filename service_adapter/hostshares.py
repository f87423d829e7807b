"""What one node may take of the service at once, so that no node crowds out the others.

Every request a pilot makes is counted against its node (the digest
account it authenticated as) once its credentials checked out:

- a request rate: a token bucket of ``burst`` requests, refilled at
  ``rate`` a second;
- requests in flight: at most ``in_flight`` at once (a parked command poll
  is one; the receiver ends a node's older poll of the same slot when a new
  one comes, :mod:`service_adapter.commandboard`);
- image downloads: at most ``downloads`` of the in-flight requests stream an
  image at once.

Over any of them the request is answered 429 with ``Retry-After`` (whole
seconds, at least 1) before anything is read or stored; the pilot waits that
long and tries again. Unauthenticated requests are not a node's: the
connection guard (:mod:`service_adapter.connections`) and the refusal log
deal with those.

Used on the receiver's event loop only (no lock).
"""

from __future__ import annotations

import math
import time
from typing import Callable

from aiohttp import web

#: Defaults: a pilot's own traffic is a few notifications a minute, one parked poll per slot and, while it fetches
#: an image, one request per chunk (4 MiB); these leave it room and hold a node that floods to them.
RATE_PER_S = 20.0
BURST = 200
IN_FLIGHT = 16
DOWNLOADS = 2
#: Hosts forgotten once their bucket is full again and nothing of theirs is in flight, checked when this many are held
#: (and, after a sweep, not again until twice as many as it kept: a sweep that frees little is not repeated per host).
_PRUNE_AT = 4096


class _Host:
    __slots__ = ("tokens", "at", "in_flight", "downloads")

    def __init__(self, tokens: float, at: float):
        self.tokens = tokens
        self.at = at
        self.in_flight = 0
        self.downloads = 0


class HostShares:
    """Per-node request rate, requests in flight and downloads; see the module docstring.

    :meth:`admit` before a node's request is served, :meth:`release` after
    (the app's :attr:`middleware` does it for requests :meth:`admit` let in).
    """

    def __init__(self, rate_per_s: float = RATE_PER_S, burst: int = BURST, in_flight: int = IN_FLIGHT,
                 downloads: int = DOWNLOADS, clock: Callable[[], float] = time.monotonic):
        if rate_per_s <= 0 or burst < 1 or in_flight < 1 or downloads < 1:
            raise ValueError("rate, burst, in_flight and downloads must be above 0")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.in_flight = in_flight
        self.downloads = downloads
        self.clock = clock
        self._hosts: dict[str, _Host] = {}
        self._prune_at = _PRUNE_AT
        #: Sweeps of quiet hosts so far (each is one pass over the table).
        self.sweeps = 0
        #: Requests answered 429, by why: "rate", "in-flight", "downloads".
        self.limited: dict[str, int] = {"rate": 0, "in-flight": 0, "downloads": 0}

    def _host(self, host: str) -> _Host:
        found = self._hosts.get(host)
        now = self.clock()
        if found is None:
            if len(self._hosts) >= self._prune_at:
                self._prune(now)
            found = self._hosts[host] = _Host(float(self.burst), now)
        else:
            found.tokens = min(float(self.burst), found.tokens + (now - found.at) * self.rate_per_s)
            found.at = now
        return found

    def _prune(self, now: float) -> None:
        self.sweeps += 1
        for host in [h for h, s in self._hosts.items()
                     if s.in_flight == 0 and s.tokens + (now - s.at) * self.rate_per_s >= self.burst]:
            del self._hosts[host]
        # Amortised: 10,000 nodes that all have a request in flight would otherwise cost a full pass each.
        self._prune_at = max(_PRUNE_AT, 2 * len(self._hosts))

    def admit(self, host: str) -> float | None:
        """None: the request is let in (and counted in flight until :meth:`release`); else the seconds the node
        should wait before trying again (its bucket is empty, or too many of its requests are in flight)."""
        share = self._host(host)
        if share.in_flight >= self.in_flight:
            self.limited["in-flight"] += 1
            return 1.0
        if share.tokens < 1.0:
            self.limited["rate"] += 1
            return (1.0 - share.tokens) / self.rate_per_s
        share.tokens -= 1.0
        share.in_flight += 1
        return None

    def release(self, host: str) -> None:
        """A request :meth:`admit` let in has been answered."""
        share = self._hosts.get(host)
        if share is not None and share.in_flight > 0:
            share.in_flight -= 1

    def start_download(self, host: str) -> bool:
        """Whether ``host`` may stream one more image now (then :meth:`end_download` after it)."""
        share = self._host(host)
        if share.downloads >= self.downloads:
            self.limited["downloads"] += 1
            return False
        share.downloads += 1
        return True

    def end_download(self, host: str) -> None:
        """An image stream :meth:`start_download` allowed has ended."""
        share = self._hosts.get(host)
        if share is not None and share.downloads > 0:
            share.downloads -= 1

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        """Release what :func:`admitted` counted for ``request``, however its handler ends."""
        try:
            return await handler(request)
        finally:
            host = request.get(_ADMITTED)
            if host is not None:
                self.release(host)


SHARES_KEY = web.AppKey("host_shares", HostShares)
#: On a request: the host it was counted against (typed where aiohttp has request keys).
_ADMITTED = web.RequestKey("host_shares_admitted", str) if hasattr(web, "RequestKey") else "host_shares.admitted"


def retry_after_header(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds (at least 1), as HTTP wants it."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def admitted(request: web.Request, host: str) -> float | None:
    """Count ``request`` against ``host``'s share (:meth:`HostShares.admit`); None when let in, else the seconds
    to wait. A request of an app without shares is always let in."""
    shares = request.app.get(SHARES_KEY)
    if shares is None:
        return None
    wait = shares.admit(host)
    if wait is None:
        request[_ADMITTED] = host
    return wait
