"""Sends the pilot's notifications to the service: one thread, one HTTP session, bounded retries.

Notifications go out in the order they were queued, each with its own
seq. Each has a delivery deadline; retries (tenacity, exponential backoff)
stop at that deadline, and at once when :meth:`Notifier.close` is called,
so a slow or dead service never holds up the pilot's restore or exit.
After :meth:`Notifier.give_up_if_silent_before`, they also stop after the
first failed attempt while the service has answered nothing since that
moment (:mod:`pilot.reach`): the pilot's exit is then not worth waiting for.
A notification keeps one body across its retries, so a retry of one that
did arrive is an exact repeat, which the service accepts as such.

The first notification's first attempt goes through :mod:`pilot.firstshot`
(``http.client``), before ``requests`` is imported; everything else,
including that notification's retries, through the one ``requests`` session.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import time

from pilot.bounded import IDENTITY, AnswerTooLong, digest_auth, read_at_most
from workspace_common.protocol import (
    MAX_BODY_BYTES,
    NOTIFICATIONS_PATH,
    SIGNATURE_HEADER,
    Notification,
    format_time,
    sign,
    utc_now,
)
from pilot.credentials import PilotCredentials
from pilot.delivery import Delivery, Outcome
from pilot.reach import ServiceReach
from pilot.retryafter import retry_after_s
from workspace_common.errors import failure_words

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing on the pilot's start path
if TYPE_CHECKING:
    import requests

__all__ = ["RETRYABLE_STATUSES", "Delivery", "Notifier", "Outcome"]  # Delivery, Outcome: pilot.delivery

log = logging.getLogger(__name__)

#: Answers worth another try: the service may be restarting or overloaded.
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclasses.dataclass
class _Attempt:
    status: int | None = None
    detail: str = ""
    retry_after_s: float | None = None  # what the service asked this pilot to wait (429, 503)


class Notifier:
    """The pilot's one channel to the service for a (slot, host).

    ``notify()`` assigns the next seq and queues the notification; the
    sender thread posts it with HTTP Digest (SHA-256) and the body
    signature. ``close()`` stops all retries at once.
    """

    def __init__(
        self,
        contact: str,
        credentials: PilotCredentials,
        slot: str,
        host: str,
        *,
        request_timeout: float = 5.0,
        verify_tls: bool | str = True,
        first_seq: int = 1,
    ):
        self.url = contact.rstrip("/") + NOTIFICATIONS_PATH
        self.slot = slot
        self.host = host
        self.request_timeout = request_timeout
        self._key = credentials.sign_key
        # requests and tenacity are imported by the sender thread, beside the pilot's memory take rather than
        # before it (about two thirds of the pilot's own start was importing them); the session is ready when
        # the thread has made it.
        self._credentials = credentials
        self._verify_tls = verify_tls
        self._session: requests.Session | None = None
        self._session_made = threading.Event()
        self._session_error: BaseException | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Event()
        #: What this pilot has seen of the service; the command poller reports into it too.
        self.reach = ServiceReach()
        self._give_up_silent_before: float | None = None
        self._seq = first_seq - 1
        self._seq_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)
        self._thread.start()

    def notify(
        self,
        state: str,
        memory_mb: int,
        *,
        deliver_within: float,
        code: int = 0,
        expires_at: str | None = None,
        message: str | None = None,
        vms: list[str] | None = None,
        command: int | None = None,
        timings: dict[str, str] | None = None,
        address: str | None = None,
        usage: dict[str, dict] | None = None,
    ) -> Delivery:
        """Queue a notification; it is tried until ``deliver_within`` seconds from now.

        After :meth:`close`, the returned delivery is UNDELIVERED at once.
        """
        with self._seq_lock:
            self._seq += 1
            notification = Notification(
                slot=self.slot,
                host=self.host,
                state=state,
                seq=self._seq,
                sent_at=format_time(utc_now()),
                memory_mb=memory_mb,
                code=code,
                expires_at=expires_at,
                message=message,
                vms=vms,
                command=command,
                timings=timings,
                address=address,
                usage=usage,
            )
        delivery = Delivery(notification, time.monotonic() + deliver_within)
        if self._closing.is_set():
            delivery._finish(Outcome.UNDELIVERED, detail="notifier closed")
        else:
            self._queue.put(delivery)
        return delivery

    @property
    def session(self) -> requests.Session:
        """The one HTTP session (digest auth set) the pilot talks to the service with; the command poller shares it.

        Made by the sender thread as its first act: this waits for it.
        """
        self._session_made.wait()
        if self._session is None:
            raise RuntimeError(f"the notifier's HTTP session could not be made: {self._session_error}")
        return self._session

    def _make_session(self) -> None:
        try:
            import requests

            session = requests.Session()
            session.auth = digest_auth(self._credentials.user, self._credentials.password)
            # True: the system's CAs; a path: that CA file (an https contact with the site's own CA); False: none.
            session.verify = self._verify_tls
            session.headers["Content-Type"] = "application/json"
            self._session = session
        except BaseException as exc:  # an import that fails: every delivery then ends UNDELIVERED, said once
            self._session_error = exc
            log.error("cannot make the HTTP session: %s", exc)
        finally:
            self._session_made.set()

    @property
    def key(self) -> str:
        """This (slot, host)'s key: it signs the notification bodies and the service's command answers."""
        return self._key

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closing.is_set()

    def give_up_if_silent_before(self, moment: float) -> None:
        """From now on, end a notification UNDELIVERED after any failed attempt while the service
        has answered nothing since the monotonic ``moment`` or earlier.

        The pilot calls it when a lease ends: a service that was already
        silent when the stop began is not waited for; one that answered
        since (a restart, a 503) still gets every retry until the deadline.
        """
        self._give_up_silent_before = moment

    def close(self, wait: float = 0.5) -> None:
        """Stop retrying at once; every pending notification ends UNDELIVERED.

        Waits at most ``wait`` seconds for a request already on the wire; the
        sender is a daemon thread, so it never keeps the process alive.
        """
        self._closing.set()
        self._queue.put(None)
        self._thread.join(timeout=wait)
        if not self._thread.is_alive() and self._session is not None:
            self._session.close()

    # -- sender thread -----------------------------------------------------------

    def _run(self) -> None:
        first = self._queue.get()
        answered = first is not None and not self._closing.is_set() and self._first_shot(first)
        self._make_session()
        delivery = self._queue.get() if answered else first
        while delivery is not None:
            if self._closing.is_set():
                delivery._finish(Outcome.UNDELIVERED, detail="notifier closed")
            else:
                try:
                    self._deliver(delivery)
                except Exception as exc:  # the sender must outlive any one notification
                    log.exception("sending %s failed unexpectedly", delivery.notification.state)
                    if not delivery.done():
                        delivery._finish(Outcome.UNDELIVERED, detail=f"{type(exc).__name__}: {exc}")
            delivery = self._queue.get()
        while True:  # drain what was queued behind the close
            try:
                delivery = self._queue.get_nowait()
            except queue.Empty:
                return
            if delivery is not None:
                delivery._finish(Outcome.UNDELIVERED, detail="notifier closed")

    def _first_shot(self, delivery: Delivery) -> bool:
        """Try ``delivery`` once through :class:`pilot.firstshot.FirstShot`, before ``requests`` is imported;
        True if that ended it (delivered or refused), False to send it again through ``requests``."""
        # Loaded only now, so that not even http.client competes with the memory take.
        from pilot.firstshot import FirstShot, FirstShotFailed

        if not FirstShot.applies():
            return False
        n = delivery.notification
        body = n.to_json()
        started = time.monotonic()
        try:
            shot = FirstShot(self.url, self._credentials.user, self._credentials.password, verify_tls=self._verify_tls)
            status, detail = shot.post(body, {SIGNATURE_HEADER: sign(self._key, body)}, self._timeout(delivery.deliver_by))
        except FirstShotFailed as exc:
            log.info("first try of %s (seq %d) got no answer (%s); trying again with retries", n.state, n.seq, exc)
            return False
        except Exception:  # never worse than no first shot: the requests path takes it from here
            log.exception("first try of %s (seq %d) failed unexpectedly; trying again with retries", n.state, n.seq)
            return False
        self.reach.answered(started)
        if status == 200:
            log.info("notified %s (seq %d) in %.1f ms", n.state, n.seq, (time.monotonic() - started) * 1000)
            delivery._finish(Outcome.DELIVERED, 200)
            return True
        if status in RETRYABLE_STATUSES:
            asked = retry_after_s(status, {"Retry-After": shot.retry_after})
            if asked is not None:  # as the retries below do: the service asked for this much quiet
                self._closing.wait(min(asked, max(0.0, delivery.deliver_by - time.monotonic())))
            return False
        log.error("service refused %s (seq %d): HTTP %s %s", n.state, n.seq, status, detail)
        delivery._finish(Outcome.REFUSED, status, detail)
        return True

    def _deliver(self, delivery: Delivery) -> None:
        import requests
        from tenacity import (
            Retrying, retry_if_exception_type, retry_if_result, stop_when_event_set, wait_exponential,
        )

        if self._session is None:
            delivery._finish(Outcome.UNDELIVERED, detail=f"no HTTP session: {self._session_error}")
            return
        n = delivery.notification
        body = n.to_json()
        headers = {SIGNATURE_HEADER: sign(self._key, body)}
        started = time.monotonic()

        def past_deadline(state) -> bool:
            return time.monotonic() >= delivery.deliver_by

        retrying = Retrying(
            stop=stop_when_event_set(self._closing) | past_deadline | self._hopeless,
            wait=_honouring_retry_after(wait_exponential(multiplier=0.05, max=2.0), delivery.deliver_by),
            # Waiting on the closing event, not time.sleep, is what makes close() stop retries at once.
            sleep=self._closing.wait,
            retry=retry_if_exception_type(requests.RequestException)
            | retry_if_result(lambda a: a.status in RETRYABLE_STATUSES),
            retry_error_callback=lambda state: state,
            reraise=False,
        )
        result = retrying(self._post, body, headers, delivery.deliver_by)
        elapsed_ms = (time.monotonic() - started) * 1000
        if isinstance(result, _Attempt) and result.status == 200:
            log.info("notified %s (seq %d) in %.1f ms", n.state, n.seq, elapsed_ms)
            delivery._finish(Outcome.DELIVERED, 200)
        elif isinstance(result, _Attempt) and result.status not in RETRYABLE_STATUSES:
            log.error(
                "service refused %s (seq %d): HTTP %s %s", n.state, n.seq, result.status, result.detail
            )
            delivery._finish(Outcome.REFUSED, result.status, result.detail)
        else:
            reason = _last_failure(result)
            if self._hopeless():
                reason += f"; {self.reach.describe()}: not trying again"
            log.error(
                "could not deliver %s (seq %d) after %.0f ms: %s", n.state, n.seq, elapsed_ms, reason
            )
            delivery._finish(Outcome.UNDELIVERED, detail=reason)

    def _hopeless(self, _state=None) -> bool:
        """Whether retrying is pointless: the service was silent before the cut-off and still is (also a tenacity stop)."""
        cutoff = self._give_up_silent_before
        return cutoff is not None and self.reach.silent_before(cutoff)

    def _timeout(self, deliver_by: float) -> float:
        """One attempt's time limit: the request timeout, cut to what is left until ``deliver_by``."""
        return max(0.05, min(self.request_timeout, deliver_by - time.monotonic()))

    def _post(self, body: bytes, headers: dict, deliver_by: float) -> _Attempt:
        import requests

        timeout = self._timeout(deliver_by)
        sent_at = time.monotonic()
        try:
            # verify given per request: requests lets $REQUESTS_CA_BUNDLE override a session's CA file.
            response = self._session.post(self.url, data=body, headers={**headers, **IDENTITY}, timeout=timeout,
                                          verify=self._session.verify, stream=True)
        except requests.ConnectionError:
            self.reach.unanswered()
            raise
        self.reach.answered(sent_at)
        try:
            # The service's answers are small; one from a proxy or a rogue server costs no more than this.
            content = read_at_most(response, MAX_BODY_BYTES)
        except AnswerTooLong as exc:
            content = b""
            detail = f"({exc})"
        else:
            detail = ""
        if response.status_code != 200 and content:
            # The answer may come from a proxy, not the service: take a detail only if it is ours.
            try:
                answer = json.loads(content)
            except ValueError:
                answer = None
            detail = str(answer.get("detail", "")) if isinstance(answer, dict) else \
                content[:200].decode("utf-8", "replace")
        return _Attempt(response.status_code, detail, retry_after_s(response.status_code, response.headers))


def _honouring_retry_after(backoff, deliver_by: float):
    """A tenacity wait: the longer of ``backoff`` and the Retry-After of the last answer (429, 503), but never
    past ``deliver_by`` (monotonic)."""

    def wait(state) -> float:
        asked = None
        if state.outcome is not None and not state.outcome.failed:
            asked = state.outcome.result().retry_after_s
        return min(max(backoff(state), asked or 0.0), max(0.0, deliver_by - time.monotonic()))

    return wait


def _last_failure(state) -> str:
    from tenacity import RetryCallState

    if isinstance(state, RetryCallState) and state.outcome is not None:
        if state.outcome.failed:
            exc = state.outcome.exception()
            return f"{type(exc).__name__}: {failure_words(exc)}"
        attempt = state.outcome.result()
        return f"HTTP {attempt.status} {attempt.detail}".strip()
    if isinstance(state, RetryCallState):
        return "closed before the first attempt"
    return "no answer"
