"""What the pilot has seen of the service lately: whether anything answers at all.

The notifier and the command poller share one :class:`ServiceReach`. Any
HTTP answer (a 503 too: something is there) marks the service as heard;
a request that got no answer because no connection could be made or kept
(refused, reset, unreachable, connect timeout) marks it silent from then
on. A read timeout changes nothing: a connection was accepted, so the
service may only be slow.

The pilot uses this at the end of a lease: once the node is restored, a
notification to a service that has been silent since *before* the stop
began is hopeless, and the pilot exits instead of retrying for its whole
grace (kill-all after a service died must not find pilots lingering).
"""

from __future__ import annotations

import time


class ServiceReach:
    """Since when the service has given no answer, if it has not answered since.

    Updated from the notifier and poller threads with plain attribute
    stores (atomic in CPython); read from any thread.
    """

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        #: Monotonic time of the first unanswered request after the last answer; None while it answers.
        self.silent_since: float | None = None

    def answered(self, sent_at: float | None = None) -> None:
        """An HTTP answer came back (any status) to a request sent at monotonic ``sent_at`` (None: now).

        An answer to a request sent before the silence began is older news than the failure that began it (the
        notifier and the poller record from their own threads, in any order): it does not end the silence.
        """
        since = self.silent_since
        if since is None or sent_at is None or sent_at >= since:
            self.silent_since = None

    def unanswered(self) -> None:
        """A request got no connection, or lost it before any answer."""
        if self.silent_since is None:
            self.silent_since = self._clock()

    def silent_before(self, moment: float) -> bool:
        """Whether the service has answered nothing since some time at or before the monotonic ``moment``."""
        since = self.silent_since
        return since is not None and since <= moment

    def describe(self) -> str:
        """How long the service has been silent, in words for a log line."""
        since = self.silent_since
        if since is None:
            return "the service answers"
        return f"the service has answered nothing for {self._clock() - since:.1f} s"
