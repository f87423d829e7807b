"""A store that cannot be reached for now is a 503 with Retry-After, never a 500: nothing was stored, try again.

On PostgreSQL the database may restart or its network fail under a running
service. Every request that needed it then fails before anything was
committed (a write's future fails with its transaction; a read fails with
its connection). :func:`store_away_middleware` turns those failures into
one answer, ``503 {"result": "store-unavailable", ...}`` with
``Retry-After``, which pilots retry (their notifier's retryable statuses)
and operators see as one line. The store connects again by itself.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from workspace_common.errors import first_line

log = logging.getLogger("service_adapter.storeaway")

#: What a client is asked to wait before it tries again (seconds).
RETRY_AFTER_S = 5
#: At most one log line per this many seconds while the store is away (a thousand pilots retry meanwhile).
LOG_EVERY_S = 10.0


def store_away_middleware(store) -> web.middleware:
    """A middleware answering 503 for any of ``store.unavailable`` raised while a request is handled."""
    away = store.unavailable
    said = [0.0]

    @web.middleware
    async def store_away(request: web.Request, handler):
        try:
            return await handler(request)
        except away as exc:
            now = time.monotonic()
            if now - said[0] >= LOG_EVERY_S:
                said[0] = now
                log.warning("the store is away: answering 503 (%s)", first_line(exc))
            return web.json_response(
                {"result": "store-unavailable", "detail": "the service's store cannot be reached now: try again",
                 "error": "the service's store cannot be reached now: try again"},
                status=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    return store_away
