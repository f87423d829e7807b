"""A notification's pending result: :class:`Delivery`, which ends in an :class:`Outcome`."""

from __future__ import annotations

import enum
import threading

from workspace_common.protocol import Notification


class Outcome(enum.Enum):
    """How a notification ended."""

    DELIVERED = "delivered"
    """The service answered 200: it has stored it."""
    REFUSED = "refused"
    """The service answered with a final refusal (4xx); see ``Delivery.status``."""
    UNDELIVERED = "undelivered"
    """No answer in time, or the notifier was closed first."""


class Delivery:
    """The pending result of one notification; wait on it or register a callback."""

    def __init__(self, notification: Notification, deliver_by: float):
        self.notification = notification
        self.deliver_by = deliver_by
        self.outcome: Outcome | None = None
        self.status: int | None = None
        self.detail: str = ""
        self._done = threading.Event()
        self._callbacks: list = []
        self._lock = threading.Lock()

    def _finish(self, outcome: Outcome, status: int | None = None, detail: str = "") -> None:
        # The notifier's thread ends it, once; the callbacks run on that thread.
        with self._lock:
            self.outcome, self.status, self.detail = outcome, status, detail
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def add_done_callback(self, callback) -> None:
        """Call ``callback(delivery)`` when it ends (at once if it already has)."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    def done(self) -> bool:
        """Whether the notification has an outcome."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """Wait up to ``timeout`` seconds for the outcome; None if still pending."""
        self._done.wait(timeout)
        return self.outcome
