"""Holding a password guesser to a few guesses a minute: failed operator logins, counted per source address.

Each source address has a bucket of :data:`BURST` failed logins, refilled at
:data:`PER_S` a second. A request with credentials that do not check out
takes one; while a source's bucket is empty, every request of it that
carries credentials is answered 429 with ``Retry-After`` before they are
checked, so a guesser learns nothing from the answer (a right guess is
refused too) until its bucket refills. Requests without credentials (a
client fetching its challenge) and answers that only say the nonce went
stale cost nothing: an operator who types the password right is never
slowed. A brute force from one address is thus held to :data:`PER_S` a
second (30 a minute) after its first :data:`BURST`.

Memory is bounded: at most :data:`MAX_SOURCES` addresses are remembered,
the longest-quiet forgotten first (a forgotten one starts with a full
bucket, which costs a guesser no more than its first burst again).
Used on the event loop only (no lock).
"""

from __future__ import annotations

import collections
import time
from typing import Callable

BURST = 10
PER_S = 0.5
MAX_SOURCES = 4096


class LoginThrottle:
    """Failed logins per source address (see the module docstring)."""

    def __init__(self, burst: int = BURST, per_s: float = PER_S, max_sources: int = MAX_SOURCES,
                 clock: Callable[[], float] = time.monotonic):
        self.burst = burst
        self.per_s = per_s
        self.max_sources = max_sources
        self.clock = clock
        self._sources: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        #: Requests answered 429 because their source had used up its failed logins.
        self.held = 0

    def _tokens(self, source: str, now: float) -> float:
        tokens, at = self._sources.get(source, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) * self.per_s)

    def wait(self, source: str | None) -> float | None:
        """Seconds before ``source`` may try credentials again; None if it may now."""
        if source is None or source not in self._sources:
            return None
        now = self.clock()
        tokens = self._tokens(source, now)
        if tokens >= 1.0:
            return None
        self.held += 1
        return (1.0 - tokens) / self.per_s

    def failed(self, source: str | None) -> None:
        """A request of ``source`` carried credentials that did not check out."""
        if source is None:
            return
        now = self.clock()
        tokens = self._tokens(source, now)
        self._sources[source] = (max(tokens - 1.0, 0.0), now)
        self._sources.move_to_end(source)
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
