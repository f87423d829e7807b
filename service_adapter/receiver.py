"""The HTTP endpoint pilots notify: ``POST /pilot/v2/notifications``.

Checks run cheapest-first and each refusal changes nothing:
digest (401) -> size (413) -> body signature (401) -> JSON and fields (400)
-> clock skew (422) -> slot and seq, decided by the store (404, 409). A
notification is answered 200 only after the store has committed it.

aiohttp serves it: one event loop handles many pilots' keep-alive
connections cheaply, and the blocking SQLite commit runs in the store's
writer thread, not on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import timedelta

from aiohttp import web

from pilot.protocol import (
    MAX_BODY_BYTES,
    NOTIFICATIONS_PATH,
    SIGNATURE_HEADER,
    Notification,
    ProtocolError,
    parse_time,
    signature_matches,
    utc_now,
)
from service_adapter.digest import DigestVerifier
from service_adapter.store import Store, Verdict

log = logging.getLogger(__name__)

STORE_KEY = web.AppKey("store", Store)
VERIFIER_KEY = web.AppKey("verifier", DigestVerifier)
SKEW_KEY = web.AppKey("max_skew", timedelta)


def _answer(status: int, result: str, detail: str = "", headers=None) -> web.Response:
    body = {"result": result}
    if detail:
        body["detail"] = detail
    return web.json_response(body, status=status, headers=headers)


def _unauthorized(verifier: DigestVerifier, detail: str, stale: bool = False) -> web.Response:
    response = _answer(401, "unauthorized", detail)
    for challenge in verifier.challenges(stale=stale):
        response.headers.add("WWW-Authenticate", challenge)
    return response


async def handle_notification(request: web.Request) -> web.Response:
    """Verify, validate and store one notification; answer with DESIGN.md's status codes."""
    verifier = request.app[VERIFIER_KEY]
    auth = verifier.verify(request.method, request.raw_path, request.headers.get("Authorization"))
    if not auth.ok:
        if request.headers.get("Authorization"):
            log.warning("refused notification from %s: %s", request.remote, auth.reason)
        return _unauthorized(verifier, auth.reason, stale=auth.stale)
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return _answer(413, "too-large", f"body over {MAX_BODY_BYTES} bytes")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _answer(413, "too-large", f"body over {MAX_BODY_BYTES} bytes")
    if not signature_matches(auth.account.ha1_sha256, body, request.headers.get(SIGNATURE_HEADER)):
        log.warning("refused notification from %s: bad body signature", request.remote)
        return _unauthorized(verifier, "missing or wrong " + SIGNATURE_HEADER)
    try:
        notification = Notification.from_json(body)
    except ProtocolError as exc:
        log.warning("refused notification from %s: %s", request.remote, exc)
        return _answer(exc.status, "invalid", str(exc))
    skew = abs(utc_now() - parse_time(notification.sent_at))
    if skew > request.app[SKEW_KEY]:
        log.warning(
            "refused %s/%s seq %d: sent_at off by %.1f s",
            notification.slot, notification.host, notification.seq, skew.total_seconds(),
        )
        return _answer(422, "skew", f"sent_at is {skew.total_seconds():.1f} s off the service clock")
    store = request.app[STORE_KEY]
    verdict = await asyncio.wrap_future(store.record_notification(notification, body, auth.account.user))
    if verdict is Verdict.ACCEPTED:
        log.info(
            "%s/%s seq %d: %s (code %d)",
            notification.slot, notification.host, notification.seq, notification.state, notification.code,
        )
    elif verdict is not Verdict.REPEAT:
        log.warning(
            "refused %s/%s seq %d: %s",
            notification.slot, notification.host, notification.seq, verdict.name.lower(),
        )
    return _answer(verdict.status, verdict.result)


def make_app(store: Store, verifier: DigestVerifier, max_skew_s: float = 300.0) -> web.Application:
    """The receiver as an aiohttp application (bodies over the cap are refused while read)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STORE_KEY] = store
    app[VERIFIER_KEY] = verifier
    app[SKEW_KEY] = timedelta(seconds=max_skew_s)
    app.router.add_post(NOTIFICATIONS_PATH, handle_notification)
    return app


class ReceiverThread:
    """Runs the receiver on its own event loop in a background thread.

    ``start()`` returns once the socket is listening and sets ``url``;
    ``stop()`` closes the listener and waits for the thread.
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self.host = host
        self.port = port
        self.url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Start listening; returns the base URL (``http://host:port``)."""
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="receiver", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        return self.url

    async def _open(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.port = port
        self.url = f"http://{host}:{port}"

    def stop(self) -> None:
        """Stop serving and join the thread; safe to call twice."""
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None
