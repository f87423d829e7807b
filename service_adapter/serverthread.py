"""An aiohttp application served from a background thread of its own: the embedded site, the tests and the
benches run the receiver (or any app) this way beside their own work.
"""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from service_adapter.connections import start_serving


class ReceiverThread:
    """Runs the receiver on its own event loop in a background thread.

    ``start()`` returns once the socket is listening and sets ``url``;
    ``stop()`` closes the listener and waits for the thread.
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0, ssl_context=None):
        self.app = app
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
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
        self._runner = await start_serving(self.app, self.host, self.port, ssl_context=self.ssl_context)
        host, port = self._runner.addresses[0][:2]
        self.port = port
        self.url = f"{'https' if self.ssl_context else 'http'}://{host}:{port}"

    def stop(self) -> None:
        """Stop serving and join the thread; safe to call twice."""
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None
